"""The OpenAI-compatible server: continuous batching on the device (`slots.py`, `coupled.py`), the host scheduler with adaptive speculation, the HTTP API and its metrics."""
