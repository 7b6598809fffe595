"""Quantized bases from two backends, and the QZO scheme that trains their scales.

Backends (`--quantize`):

- bitsandbytes: `nf4` (4-bit NormalFloat, 64-value blocks, one absmax each) and `int8`
  (LLM.int8());
- optimum-quanto: `quanto-int8` (per output row), `quanto-int4` and `quanto-int2`
  (groups of up to 128 input values, each with a scale and a shift). quanto runs on the
  CPU, CUDA and MPS, and writes safetensors.

Only the decoder layers' linear maps are quantized; embeddings, norms and the LM head
keep the compute dtype, as transformers' bitsandbytes integration does.

The `scales` scheme (QZO, arXiv 2505.13430): the integer codes stay frozen and ZO trains
the per-group scales only. Each quantized linear gets a parameter `zo_scale` that *shares
storage* with its backend's own scale tensor (quanto's `_scale`, bitsandbytes' absmax),
and a forward that dequantizes with it. The engine perturbs `zo_scale` like any other
parameter (scratch copies, never in place) and its update lands in the backend's tensor,
so the trained model saves in the backend's own format at the size it was loaded at.
bitsandbytes' double quantization would store the absmax in 8 bits; with `scales` the
absmax stays fp32 (0.5 bits a weight instead of 0.13), so that it can take small steps.
"""

from __future__ import annotations

import json
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from edgezo.errors import ConfigError, ModelLoadError
from edgezo.models.catalog import QUANTIZATIONS, scale_backends
from edgezo.zo.blocks import find_layers

QUANTO = tuple(n for n, q in QUANTIZATIONS.items() if q.backend == "quanto")
NF4_BLOCK = 64
QUANTO_MAX_GROUP = 128
QUANTO_BITS = {"quanto-int8": 8, "quanto-int4": 4, "quanto-int2": 2}
QMAP_FILE = "quanto_qmap.json"


def backend(quantize: str | None) -> str | None:
    """'bitsandbytes', 'quanto' or None."""
    if quantize is None:
        return None
    return QUANTIZATIONS[quantize].backend


def _quanto_type(quantize: str):
    try:
        from optimum import quanto
    except ImportError:
        raise ModelLoadError(f"--quantize {quantize} needs optimum-quanto: pip install "
                             "'optimum-quanto>=0.2.7'") from None
    return {"quanto-int8": quanto.qint8, "quanto-int4": quanto.qint4,
            "quanto-int2": quanto.qint2}[quantize]


def quantize_layers(model: nn.Module, quantize: str, plain: bool = False) -> nn.Module:
    """Quantize the decoder layers' linear maps with quanto and freeze them to integers.

    `plain` (the scales scheme): keep quanto's reference layout (codes, `_scale`,
    `_shift`) even where quanto would pick a packed kernel layout (TinyGemm for bf16
    int4, AWQ for fp16 on CUDA), which folds the scales into other tensors.
    """
    from optimum.quanto import freeze
    from optimum.quanto import quantize as quanto_quantize

    qtype = _quanto_type(quantize)
    _, layers = find_layers(model)
    quanto_quantize(layers, weights=qtype)
    if not plain:
        freeze(layers)
        return model
    from optimum.quanto.tensor.weights import WeightQBitsTensor, WeightQBytesTensor

    with torch.no_grad():
        for module in layers.modules():
            if getattr(module, "weight_qtype", None) is None or _is_frozen(module):
                continue
            w, group = module.weight, module.weight_group_size
            if qtype.bits == 8:
                scale = module.optimizer(w, qtype=qtype, axis=0)
                q = WeightQBytesTensor.quantize(w, qtype, 0, scale, optimized=False)
            else:
                scale, shift = module.optimizer(w, qtype=qtype, axis=0, group_size=group)
                q = WeightQBitsTensor.quantize(w, qtype, 0, group, scale, shift,
                                               optimized=False)
            module.weight = nn.Parameter(q, requires_grad=False)
    return model


def _is_frozen(module: nn.Module) -> bool:
    return hasattr(module.weight, "__tensor_flatten__")


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor really holds: a quantized tensor subclass (quanto) is counted by its
    inner tensors (codes, scales, shifts), not by its logical shape."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def quanto_group(in_features: int, bits: int) -> int | None:
    """quanto's group size for a row of `in_features` (QModuleMixin's rule): None (one
    scale per row) at 8 bits, for rows of at most 128, or where none of 128, 96, 64, 32
    divides the row; else the first of those that does."""
    if bits == 8 or in_features <= QUANTO_MAX_GROUP:
        return None
    for size in (128, 96, 64, 32):
        if in_features % size == 0:
            return size
    return None


def scale_count(shape: torch.Size | tuple[int, ...], quantize: str) -> int:
    """How many scales a (out, in) weight has in the backend's format (what QZO trains)."""
    out, fan_in = shape[0], int(torch.Size(shape[1:]).numel())
    if quantize == "nf4":
        return -(-out * fan_in // NF4_BLOCK)
    if quantize == "int8":
        return out
    group = quanto_group(fan_in, QUANTO_BITS[quantize])
    return out if group is None else out * fan_in // group


def stored_bytes(shape: torch.Size | tuple[int, ...], quantize: str, scales: str) -> int:
    """Bytes of one quantized (out, in) weight: codes, scales and shifts. `scales` is
    'trained' when QZO keeps them (bitsandbytes' absmax then stays fp32)."""
    n = int(torch.Size(shape).numel())
    if quantize == "nf4":
        if scales == "trained":
            return n // 2 + 4 * scale_count(shape, quantize)
        return n // 2 + n // NF4_BLOCK + 4 * (n // (NF4_BLOCK * 256) + 1)
    if quantize == "int8":
        return n + 4 * shape[0]
    bits = QUANTO_BITS[quantize]
    groups = scale_count(shape, quantize)
    # quanto keeps scales (and, below 8 bits, shifts) in the weights' dtype; priced fp32
    return n * bits // 8 + 4 * groups * (1 if bits == 8 else 2)


# -- the scales scheme ---------------------------------------------------------------
def _is_quanto_linear(module: nn.Module) -> bool:
    return type(module).__name__ == "QLinear" and hasattr(module.weight, "_scale")


def _is_nf4_linear(module: nn.Module) -> bool:
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    return state is not None and getattr(state, "quant_type", None) == "nf4"


def quantized_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules()
            if _is_quanto_linear(m) or _is_nf4_linear(m)]


def _quanto_weight(module: nn.Module, scale: torch.Tensor) -> torch.Tensor:
    """The dense weight of a quanto linear, dequantized with `scale` in place of its own
    (quanto's arithmetic: scale · codes, minus the scaled shift below 8 bits)."""
    from optimum.quanto.tensor.grouped import ungroup

    w = module.weight
    data = w._data.unpack() if hasattr(w._data, "unpack") else w._data
    shift = getattr(w, "_shift", None)
    if shift is not None and not shift.dtype.is_floating_point:
        data = data.to(torch.int8) - shift.to(torch.int8)
    dense = scale * data.to(scale.dtype)
    if shift is not None and shift.dtype.is_floating_point:
        dense = dense - shift
    if getattr(w, "_group_size", None) is None or w.axis is None:
        return dense.reshape(w.shape)
    return ungroup(dense, axis=w.axis, orig_shape=w.shape)


def _nf4_weight(module: nn.Module, scale: torch.Tensor) -> torch.Tensor:
    import copy

    import bitsandbytes.functional as BF

    state = copy.copy(module.weight.quant_state)
    state.absmax = scale.float() if scale.dtype != torch.float32 else scale
    return BF.dequantize_4bit(module.weight.data, state)


def _scaled_forward(self, x: torch.Tensor) -> torch.Tensor:
    """A quantized linear's forward with the weight dequantized from `self.zo_scale`
    (which the engine replaces by θ ± εz while it perturbs)."""
    dequant = _quanto_weight if _is_quanto_linear(self) else _nf4_weight
    weight = dequant(self, self.zo_scale).to(x.dtype)
    bias = self.bias.to(x.dtype) if self.bias is not None else None
    return F.linear(x, weight, bias)


def train_scales(model: nn.Module) -> nn.Module:
    """Freeze everything, then make each quantized linear's scales the trainable
    parameter `zo_scale` (sharing the backend's storage, see the module docstring)."""
    linears = quantized_linears(model)
    if not linears:
        raise ConfigError("--scheme scales trains the scales of a quantized base: add "
                          f"--quantize with one of {', '.join(scale_backends())}")
    for p in model.parameters():
        p.requires_grad_(False)
    for _, module in linears:
        if _is_quanto_linear(module):
            own = module.weight._scale
        else:
            state = module.weight.quant_state
            if state.nested:
                raise ConfigError("the NF4 base was double-quantized: its 8-bit absmax "
                                  "cannot take ZO steps; load it with --scheme scales so "
                                  "edgezo keeps the absmax in fp32")
            own = state.absmax
        if not own.is_floating_point():
            raise ConfigError(f"{type(module).__name__} keeps integer scales; --scheme "
                              "scales needs floating-point ones")
        module.zo_scale = nn.Parameter(own, requires_grad=True)  # the same storage
        module.forward = types.MethodType(_scaled_forward, module)
    return model


def add_scale_placeholders(model: nn.Module, quantize: str) -> nn.Module:
    """On a meta model (planning from a config): freeze it and give each decoder-layer
    linear a `zo_scale` of the size its backend's format has, so the planner prices
    exactly the trainable scales."""
    for p in model.parameters():
        p.requires_grad_(False)
    _, layers = find_layers(model)
    for module in layers.modules():
        if isinstance(module, nn.Linear):
            count = scale_count(module.weight.shape, quantize)
            module.zo_scale = nn.Parameter(torch.empty(count, 1, device="meta"))
    return model


@contextmanager
def without_scale_params(model: nn.Module) -> Iterator[None]:
    """The model as its backend knows it (no `zo_scale`, the backend's forward), for
    saving; the trained values are already in the backend's tensors."""
    held = []
    for _, module in model.named_modules():
        if "zo_scale" in module._parameters:
            held.append((module, module._parameters.pop("zo_scale"),
                         module.__dict__.pop("forward", None)))
    try:
        yield
    finally:
        for module, param, forward in held:
            module._parameters["zo_scale"] = param
            if forward is not None:
                module.forward = forward


def save_quantized(model: nn.Module, folder: Path, tokenizer=None) -> Path:
    """The quantized model in its backend's format: bitsandbytes through transformers'
    save_pretrained; quanto as a safetensors state dict with quanto's quantization map
    (transformers cannot serialize quanto models), read back by load_quantized."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    with without_scale_params(base):
        if any(_is_quanto_linear(m) for m in base.modules()):
            from optimum.quanto import quantization_map
            from safetensors.torch import save_file

            state = {k: v.contiguous() for k, v in base.state_dict().items()}
            tied = getattr(base.config, "tie_word_embeddings", False)
            if tied:
                state.pop("lm_head.weight", None)
            save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
            (folder / QMAP_FILE).write_text(json.dumps(quantization_map(base), indent=1))
            base.config.save_pretrained(folder)
        else:
            base.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


ALIGNMENT = 64  # bytes: an AVX-512 register


def aligned(t: torch.Tensor) -> torch.Tensor:
    """`t`, copied when its data does not start on a 64-byte boundary. safetensors places
    tensors at any offset of its buffer, and torch's CPU int8 x bf16 kernel
    (_weight_int8pack_mm, which quanto int8 uses for bf16 activations) crashed the process
    on AVX-512 machines with such weights; torch's own allocations are aligned."""
    if t.device.type != "cpu" or t.data_ptr() % ALIGNMENT == 0:
        return t
    return t.clone()


def load_quantized(folder: str | Path, device: str = "cpu") -> nn.Module:
    """A model saved by save_quantized, quantized as it was saved."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    if not (folder / QMAP_FILE).is_file():
        return AutoModelForCausalLM.from_pretrained(folder, device_map={"": device}).eval()
    from optimum.quanto import requantize
    from safetensors.torch import load_file

    config = AutoConfig.from_pretrained(folder)
    # built on the CPU, not on meta: buffers that no state dict holds (rotary
    # frequencies) must be computed, and quanto's requantize leaves meta ones empty
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(config, "dtype", None))
    state = {name: aligned(t) for name, t in
             load_file(folder / "model.safetensors", device=device).items()}
    qmap = json.loads((folder / QMAP_FILE).read_text())
    requantize(model, state_dict=state, quantization_map=qmap, device=torch.device(device))
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval()
