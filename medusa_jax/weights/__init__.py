"""Backbone weights from disk: GGUF files, Hugging Face safetensors directories, model specs."""
