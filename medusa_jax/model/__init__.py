"""The backbone: config, layers, attention, RoPE, the Llama model, its KV cache, sharding rules, tokenizers."""
