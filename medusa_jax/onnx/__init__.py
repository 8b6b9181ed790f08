"""ONNX export of the decoder and Medusa heads (`graph.py`, `export.py`), and greedy tree decoding
on onnxruntime (`runner.py`)."""
