"""`--format gguf`: the trained model as one GGUF file, for llama.cpp and the apps on it.

Written with the `gguf` package alone: `GGUFWriter` for the file, `get_tensor_name_map`
for the tensor names of each architecture, `gguf.quants` for the quantized types. The
file is streamed: tensor infos first, then one tensor at a time is converted, written
and dropped, so an export holds at most one tensor's copy beside the model.

Tensor types: 1-D tensors (norms, biases) stay F32, as llama.cpp expects; a matrix whose
rows do not fill whole quantization blocks falls back to F16; a 4- or 5-bit export keeps
the embedding and the head at Q8_0, as llama.cpp's own quantizer keeps them wider. With
no type asked, a base that came as a GGUF keeps each tensor's own type (SmolLM2: Q4_1
layers, a Q8_0 embedding); a base type `gguf.quants` cannot write (the K- and IQ-quants)
becomes the writable type with the fewest bits per weight not below it (Q4_K -> Q4_0,
Q5_K -> Q5_0, Q6_K -> Q8_0). Any other base exports as F16.
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import gguf
import numpy as np
import torch

from edgezo.errors import ConfigError, unknown_choice
from edgezo.export.gguf_meta import add_config_metadata, add_tokenizer, copy_base_metadata

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

Q = gguf.GGMLQuantizationType
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
_WRITABLE = tuple(Q[t.upper()] for t in GGUF_TYPES)


@dataclass(frozen=True)
class Family:
    """How one transformers model type maps onto a llama.cpp architecture."""

    arch: gguf.MODEL_ARCH
    interleave_rotary: bool  # llama.cpp's llama graph pairs rotary dims as (0,1),(2,3),...
    pre: str  # tokenizer.ggml.pre for an HF tokenizer (llama.cpp's split rule name)


FAMILIES = {
    "llama": Family(gguf.MODEL_ARCH.LLAMA, True, "default"),
    "qwen2": Family(gguf.MODEL_ARCH.QWEN2, False, "qwen2"),
}


def family_of(config: PretrainedConfig) -> Family:
    """The mapping for this model, or a ConfigError naming the supported ones."""
    kind = getattr(config, "model_type", None)
    if kind not in FAMILIES:
        raise ConfigError(f"cannot export a {kind} model as GGUF; supported architectures: "
                          f"{', '.join(sorted(FAMILIES))} (use --format merged or onnx)")
    return FAMILIES[kind]


def _bits(qtype: gguf.GGMLQuantizationType) -> float:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return size * 8 / block


def writable_type(qtype: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """`qtype` if gguf.quants writes it, else the writable type with the fewest bits per
    weight not below it (precision is never lost to the substitution)."""
    if qtype in _WRITABLE:
        return qtype
    wider = [t for t in _WRITABLE if t not in (Q.BF16, Q.F32) and _bits(t) >= _bits(qtype)]
    return min(wider, key=_bits) if wider else Q.F16


def parse_type(name: str | None) -> gguf.GGMLQuantizationType | None:
    """--gguf-type as a ggml type (None: not asked); a ConfigError listing the valid ones."""
    if name is None:
        return None
    if name.lower() not in GGUF_TYPES:
        raise unknown_choice("GGUF type", name, GGUF_TYPES)
    return Q[name.upper()]


_EMBEDDINGS = ("token_embd.weight", "output.weight")


def tensor_type(name: str, shape: tuple[int, ...], asked: gguf.GGMLQuantizationType | None,
                base: gguf.GGMLQuantizationType | None) -> gguf.GGMLQuantizationType:
    """One tensor's type: F32 for vectors, else the asked type, the base's (made writable)
    or F16; F16 where the rows do not fill whole blocks; and at least Q8_0 for the
    embedding and the head in a 4- or 5-bit export, which llama.cpp's own quantizer also
    keeps wider: every token reads the embedding and, where the head is the embedding (as
    in SmolLM2), every logit does too, so 4-bit rounding there costs the model far more
    than in a layer (BENCHMARKS.md, "Export: GGUF and ONNX")."""
    if len(shape) == 1:
        return Q.F32
    qtype = asked if asked is not None else writable_type(base) if base is not None else Q.F16
    if asked is not None and name in _EMBEDDINGS and _bits(qtype) < _bits(Q.Q8_0):
        qtype = Q.Q8_0
    if shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return Q.F16  # rows must fill whole blocks
    return qtype


def _interleave(w: np.ndarray, heads: int) -> np.ndarray:
    """HF keeps each head's rotary pairs as two halves (x_i, x_{i+d/2}); llama.cpp's llama
    graph reads them as neighbours. transformers' GGUF reader undoes exactly this."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2
                                                                               ).reshape(w.shape)


def _encode(array: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    if qtype == Q.F32:
        return np.ascontiguousarray(array, dtype=np.float32)
    if qtype == Q.F16:
        return np.ascontiguousarray(array, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype)


@dataclass
class _Planned:
    name: str  # the GGUF name
    source: torch.Tensor
    qtype: gguf.GGMLQuantizationType
    heads: int = 0  # > 0: interleave the rotary rows of this many heads


def plan_tensors(state: dict[str, torch.Tensor], config: PretrainedConfig, family: Family,
                 asked: gguf.GGMLQuantizationType | None,
                 base_types: dict[str, gguf.GGMLQuantizationType]) -> list[_Planned]:
    """Every tensor the file will hold, named and typed (no data converted yet)."""
    names = gguf.get_tensor_name_map(family.arch, config.num_hidden_layers)
    tied = getattr(config, "tie_word_embeddings", False)
    heads = {"attn_q": config.num_attention_heads,
             "attn_k": getattr(config, "num_key_value_heads", None) or config.num_attention_heads}
    planned = []
    for key, tensor in state.items():
        if tied and key == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when output.weight is absent
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ConfigError(f"{key} has no GGUF name in the {family.arch.name.lower()} "
                              "mapping of the gguf package; export with --format merged")
        part = name.split(".")[-2]
        n = heads.get(part, 0) if family.interleave_rotary else 0
        qtype = tensor_type(name, tuple(tensor.shape), asked, base_types.get(name))
        planned.append(_Planned(name, tensor, qtype, n))
    return planned


def _file_type(planned: list[_Planned]) -> int:
    """general.file_type: the type most of the matrices have."""
    counts = collections.Counter(p.qtype for p in planned if p.source.dim() > 1)
    qtype = counts.most_common(1)[0][0] if counts else Q.F32
    return int(gguf.LlamaFileType.ALL_F32 if qtype == Q.F32
               else gguf.LlamaFileType[f"MOSTLY_{qtype.name}"])


def _label(file_type: int) -> str:
    """The file type as a file-name part: q4_1, f16, f32."""
    name = gguf.LlamaFileType(file_type).name
    return name.removeprefix("MOSTLY_").removeprefix("ALL_").lower()


def _array(p: _Planned) -> np.ndarray:
    """The tensor as llama.cpp lays it out, in fp32 (what gguf.quants quantizes from)."""
    array = p.source.detach().to(torch.float32).cpu().numpy()
    return _interleave(array, p.heads) if p.heads else array


def _add_info(writer: gguf.GGUFWriter, p: _Planned) -> None:
    shape = tuple(p.source.shape)
    if p.qtype in (Q.F32, Q.F16):
        dtype = np.dtype(np.float32 if p.qtype == Q.F32 else np.float16)
        writer.add_tensor_info(p.name, shape, dtype, int(np.prod(shape)) * dtype.itemsize)
        return
    byte_shape = gguf.quant_shape_to_byte_shape(shape, p.qtype)
    writer.add_tensor_info(p.name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)),
                           raw_dtype=p.qtype)


def base_tensor_types(base_gguf: str | Path | None) -> tuple[gguf.GGUFReader | None, dict]:
    """The base file's reader and each of its tensors' type (none without a base)."""
    if base_gguf is None:
        return None, {}
    reader = gguf.GGUFReader(str(base_gguf))
    return reader, {t.name: t.tensor_type for t in reader.tensors}


def write_gguf(state: dict[str, torch.Tensor], config: PretrainedConfig,
               tokenizer: PreTrainedTokenizerBase, path: str | Path, *,
               gguf_type: str | None = None, base_gguf: str | Path | None = None,
               name: str | None = None) -> Path:
    """Write `state` (a transformers state dict of a supported family) as one GGUF file:
    `path` itself when it ends in .gguf, else `path/model-<type>.gguf`. Returns the file.

    `gguf_type` (f16, bf16, f32, q8_0, q5_1, q5_0, q4_1, q4_0) applies to every matrix;
    None keeps each tensor's type in `base_gguf`, or F16 without one. With `base_gguf`,
    its metadata (tokenizer, chat template, hyperparameters) is copied; without, it is
    built from `config` and `tokenizer`.
    """
    family = family_of(config)
    asked = parse_type(gguf_type)
    reader, base_types = base_tensor_types(base_gguf)
    planned = plan_tensors(state, config, family, asked, base_types)
    file_type = _file_type(planned)
    path = Path(path)
    if path.suffix != ".gguf":
        path = path / f"model-{_label(file_type)}.gguf"
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")  # renamed once whole
    writer = gguf.GGUFWriter(str(partial), gguf.MODEL_ARCH_NAMES[family.arch])
    try:
        if reader is not None:
            copy_base_metadata(writer, reader, config)
        else:
            add_config_metadata(writer, config, name or path.stem)
            add_tokenizer(writer, tokenizer, config, family.pre)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for p in planned:
            _add_info(writer, p)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for p in planned:  # one tensor converted at a time
            writer.write_tensor_data(_encode(_array(p), p.qtype))
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)  # no half-written file left behind
        raise
    writer.close()
    os.replace(partial, path)
    return path
