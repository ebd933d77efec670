"""lensbench chat: streaming chat with any GGUF model through llama-cpp-python.

    from chat import stream_chat, model_facts
    print(model_facts(None).summary)                      # what the model is, whether it fits
    for delta in stream_chat(None, [{"role": "user", "content": "Hi"}]):
        print(delta, end="")

`runtime.llama_cpp` holds one loaded `llama_cpp.Llama` per GGUF path, shared with the llama.cpp lens.
Terminal: `python -m chat [--model PATH]`.
"""

from .engine import ChatNotice, ChatStream, ModelFacts, chat, load, model_facts, stream_chat

__all__ = ["ChatNotice", "ChatStream", "ModelFacts", "chat", "load", "model_facts", "stream_chat"]
