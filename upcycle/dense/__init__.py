"""The Qwen2 dense model on megatron-core: config translation, layer spec, tokenizer, HF interop."""
