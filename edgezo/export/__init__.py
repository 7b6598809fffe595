"""Shipping a fine-tune: `run` exports a run folder or a model in memory, one module per
format that needs more than a few lines (`gguf`, `onnx`, `weights`)."""
