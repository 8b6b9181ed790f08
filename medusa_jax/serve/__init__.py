"""The OpenAI-compatible server: continuous batching on the device (`decode/slots.py`), the host scheduler with adaptive speculation, the HTTP API and its metrics."""
