"""Turning inputs into embeddings: preprocessing, the encoder (ONNX Runtime) and the batcher between them."""
