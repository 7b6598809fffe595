"""Model formats: GGUF files transformers cannot read fail with a message naming the fix."""

import gguf
import numpy as np
import pytest
import torch

from edgezo.errors import ModelLoadError
from edgezo.models.loading import resolve_model


def test_gguf_of_an_unsupported_architecture_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEZO_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), arch="madeupformer")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="madeupformer is not supported.*HF folder"):
        resolve_model(str(path), torch.float32)
    assert not any((tmp_path / "cache").rglob("config.json"))  # nothing half-cached
