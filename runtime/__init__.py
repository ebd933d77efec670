"""The ground floor: running a model and reading or writing its nodes while it runs.

`runtime.llama_cpp` holds one loaded llama.cpp model per GGUF file (shared by chat and every
llama.cpp technique), the small contexts techniques run on, and llama.cpp's eval callback with
read and write access to graph nodes. `runtime.ggml` binds the few ggml functions needed (graph
nodes, quantized matmul, the GGUF header). Nothing here imports `chat` or a tracing technique;
both sit on top. It uses only the torch-free leaf modules `tracing.errors` (the error types a
person can cause) and `tracing.models` (where models come from, what a GGUF header says, memory).
"""
