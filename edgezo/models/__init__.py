"""Model loading (HF folders, hub ids, GGUF files) and tiny random models for tests."""
