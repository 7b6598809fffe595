"""Copies of a model folder in the run's dtype, so that a streamed model loads
memory-mapped (transformers maps a safetensors file only when its dtype is the one asked
for; a cast would hold the whole model in process memory)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from edgezo.errors import ModelLoadError
from edgezo.models.gguf_cache import cache_root, check_cache_writable, file_key
from edgezo.models.loading import ResolvedModel
from edgezo.zo.stream.tensorfile import read_header

SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
SHARD_BYTES = 1 << 30  # the most a dtype conversion holds in memory at once


def _kept_in_fp32(name: str, keep: list[str]) -> bool:
    # transformers searches each tensor's name for the module patterns
    return any(k in name for k in keep)


def stream_ready_folder(folder: Path, dtype: torch.dtype, keep_fp32: list[str] | None = None
                        ) -> Path:
    """A copy of an HF folder whose floating tensors are stored in `dtype` (cached, once),
    or the folder itself when they already are.

    Why: transformers memory-maps a safetensors checkpoint whose dtype matches the
    requested one, so the weights of a streamed model are file pages the kernel can drop;
    a dtype cast instead materializes the whole model in process memory, which a model
    larger than RAM cannot survive. The copy is written one shard of at most SHARD_BYTES
    at a time. Tensors the model class keeps in fp32 (`keep_fp32`) keep their dtype.
    """
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return folder  # .bin checkpoints take transformers' own path
    keep = keep_fp32 or []

    def target(name: str, stored: str) -> torch.dtype | None:
        kind = SAFETENSORS_DTYPES.get(stored)
        if kind is None or kind == dtype or _kept_in_fp32(name, keep):
            return None  # not a float, already right, or kept
        return dtype

    headers = {f: read_header(f)[0] for f in files}
    if not any(target(n, h["dtype"]) for hs in headers.values() for n, h in hs.items()):
        return folder
    key = hashlib.sha256("".join(file_key(f) for f in files).encode()).hexdigest()[:16]
    name = str(dtype).removeprefix("torch.")
    out = cache_root() / "converted" / f"{folder.name}-{key}-{name}"
    if (out / "config.json").is_file():
        return out
    check_cache_writable("a streamed model's weights are stored into it once in the run's "
                         "dtype")
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"Storing {folder} in {name} once, into {out}, so that its streamed layers load "
          "memory-mapped ...", file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        _write_shards(files, headers, target, tmp)
        _copy_extras(folder, tmp, name)
        os.replace(tmp, out)  # atomic: a half-written copy is never used
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_shards(files: list[Path], headers: dict, target, tmp: Path) -> None:
    """Every tensor, cast where `target` says, into shards of at most SHARD_BYTES, with
    the index transformers reads."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    weight_map, shard, size, count, total = {}, {}, 0, 0, 0

    def write() -> None:
        nonlocal shard, size, count
        if shard:
            count += 1
            file = f"model-{count:05d}.safetensors"
            save_file(shard, str(tmp / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
        shard, size = {}, 0

    for f in files:
        with safe_open(str(f), framework="pt") as src:
            for tensor_name, info in headers[f].items():
                t = src.get_tensor(tensor_name)
                to = target(tensor_name, info["dtype"])
                if to is not None:
                    t = t.to(to)
                if size and size + t.nbytes > SHARD_BYTES:
                    write()
                shard[tensor_name] = t
                size += t.nbytes
                total += t.nbytes
    write()
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))


def _copy_extras(folder: Path, tmp: Path, dtype_name: str) -> None:
    """Config, tokenizer and generation config, the config saying the new dtype."""
    for extra in folder.iterdir():
        if extra.is_file() and not extra.name.endswith(".safetensors") \
                and extra.name != "model.safetensors.index.json":
            shutil.copy2(extra, tmp / extra.name)
    config = json.loads((tmp / "config.json").read_text())
    for field in ("dtype", "torch_dtype"):
        if field in config:
            config[field] = dtype_name
    (tmp / "config.json").write_text(json.dumps(config, indent=2))


def kept_in_fp32(model_class: type, dtype: torch.dtype) -> list[str]:
    """The module names transformers keeps in fp32 when loading `model_class` in `dtype`."""
    keep = []
    if dtype == torch.float16:
        keep += list(getattr(model_class, "_keep_in_fp32_modules", None) or [])
    if dtype in (torch.float16, torch.bfloat16):
        keep += list(getattr(model_class, "_keep_in_fp32_modules_strict", None) or [])
    return keep


def streamable_folder(resolved: ResolvedModel, dtype: torch.dtype) -> str:
    """Where a model that streams loads from: a folder whose safetensors are stored in
    `dtype`, so that its layers load memory-mapped (see stream_ready_folder). A hub model
    is downloaded into the hub cache first (as from_pretrained would); one without
    safetensors files, and a GGUF (converted in `dtype` already), load as they are."""
    if resolved.kind == "hub":
        from huggingface_hub import snapshot_download

        try:
            local = Path(snapshot_download(resolved.folder, allow_patterns=[
                "*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]))
        except Exception as err:  # hub errors have many types; all mean "not here"
            raise ModelLoadError(f"could not download {resolved.folder}: {err} (no network? "
                                 "pass a local folder to --model)") from None
        if not any(local.glob("*.safetensors")):
            return resolved.folder
    elif resolved.kind == "folder":
        local = Path(resolved.folder)
    else:
        return resolved.folder
    keep = kept_in_fp32(resolved.model_class, dtype)
    return str(stream_ready_folder(local, dtype, keep))
