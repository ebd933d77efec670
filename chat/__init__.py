"""lensbench chat: llama-cpp-python chat on GGUF files, shared with the llama.cpp lens."""
