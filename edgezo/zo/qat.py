"""Quantization-aware ZO fine-tuning (`--qat int4|int8`, after ZeroQAT, arXiv 2509.00031).

Every forward sees the weights quantized exactly as the GGUF export will store them: the
decoder layers' linear maps in int4 as Q4_1 (blocks of 32 values along a row, an fp16
scale and minimum each) or int8 as Q8_0 (blocks of 32, an fp16 scale), the embedding and
head at Q8_0 (what the export keeps them at). The fake quantization below is
bit-for-bit gguf-py's quantize-then-dequantize (tested), so `edgezo export --format gguf
--gguf-type q4_1` of a QAT run writes the very weights it was trained and evaluated with.

ZO through a quantizer sees nothing: a perturbation ε·z far below a block's step rounds
away. So, as a straight-through estimator does for backprop, the perturbation is applied
*after* quantization and its update goes to a higher-precision master:

- full: the module's weight holds Q(master); the engine perturbs and updates that weight
  as usual (forward at Q(θ) ± εz), and after each update the change is moved into the
  fp32 master and the weight re-quantized from it (`after_update`);
- lora: each adapted linear computes with D = Q(W + s·BA) − s·BA in place of W, plus its
  adapter: unperturbed that is exactly Q(W + s·BA), the merged weight quantized; with the
  adapter perturbed, Q(W + s·BA) + s·(B'A' − BA). D is recomputed after each update.

Masters (full) and D (lora) are fp32 and live on the host when the model is on a GPU.
In bf16/fp16 the weight holds Q(master) rounded to its dtype, so the forward and the
exported file then differ by that rounding; in fp32 they are the same numbers.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edgezo.zo.blocks import BlockMap, find_layers

BLOCK = 32
CHUNK_BLOCKS = 32768  # blocks re-quantized at a time: 4 MiB of fp32, not a whole matrix
GGUF_TYPE = {"int4": "q4_1", "int8": "q8_0"}  # the export type that stores QAT's weights


def fake_quant(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """`w` (rows a multiple of 32 long) quantized to GGUF Q4_1 (int4) or Q8_0 (int8) and
    dequantized, in fp32: the same arithmetic, in the same order, as gguf-py's."""
    x = w.detach().float().reshape(-1, BLOCK)
    if fmt == "int4":
        hi = x.amax(dim=1, keepdim=True)
        lo = x.amin(dim=1, keepdim=True)
        d = (hi - lo) / 15
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        q = torch.trunc((x - lo) * inv + 0.5).clamp_(0, 15)
        out = q * d.half().float() + lo.half().float()
    elif fmt == "int8":
        d = x.abs().amax(dim=1, keepdim=True) / 127
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        v = x * inv
        a = v.abs()
        floored = torch.floor(a)
        q = torch.sign(v) * (floored + torch.floor(2 * (a - floored)))  # half away from 0
        out = q * d.half().float()
    else:
        raise ValueError(f"unknown QAT format {fmt!r}")
    return out.reshape(w.shape)


def _chunks(t: torch.Tensor) -> list[torch.Tensor]:
    """Views of `t` (contiguous, a multiple of 32 values) of CHUNK_BLOCKS blocks each, so
    that fake quantization's temporaries stay small (the embedding alone is 113 MB in fp32
    on SmolLM2, and each temporary of a whole-matrix pass is that again)."""
    flat = t.view(-1, BLOCK)
    return [flat[lo:lo + CHUNK_BLOCKS] for lo in range(0, flat.shape[0], CHUNK_BLOCKS)]


@torch.no_grad()
def requantize(weight: torch.Tensor, master: torch.Tensor, fmt: str) -> None:
    """weight ← Q(master), chunk by chunk."""
    for w, m in zip(_chunks(weight), _chunks(master), strict=True):
        w.copy_(fake_quant(m, fmt).to(w.device, w.dtype))


def quantizable(module: nn.Module) -> bool:
    """A linear map whose rows fill whole 32-value blocks (what the export quantizes)."""
    weight = getattr(module, "weight", None)
    return isinstance(module, nn.Linear) and weight is not None and weight.dim() == 2 \
        and weight.shape[1] % BLOCK == 0


def _lora_linears(model: nn.Module) -> list[nn.Module]:
    _, layers = find_layers(model)
    return [m for m in layers.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")
            and quantizable(m.base_layer)]


def quantized_tensors(model: nn.Module, fmt: str, through_adapters: bool
                      ) -> list[tuple[torch.Tensor, str]]:
    """(tensor, format) of every matrix the GGUF export quantizes, as it will: the layers'
    linear maps in `fmt`, the embedding and the LM head at Q8_0 (the export keeps them at
    8 bits at least). `through_adapters` (LoRA): the adapted linears' weights are left to
    the adapters' forward (they are quantized merged with the adapter)."""
    _, layers = find_layers(model)
    adapted = ({id(m.base_layer.weight) for m in _lora_linears(model)} if through_adapters
               else set())
    out, seen = [], set()
    for name, m in layers.named_modules():
        if "lora_" in name:  # the adapters' own matrices ship unquantized, inside the merge
            continue
        if quantizable(m) and id(m.weight) not in adapted and id(m.weight) not in seen:
            seen.add(id(m.weight))
            out.append((m.weight, fmt))
    for m in (model.get_input_embeddings(), model.get_output_embeddings()):
        w = getattr(m, "weight", None)
        if w is not None and w.dim() == 2 and w.shape[1] % BLOCK == 0 and id(w) not in seen:
            seen.add(id(w))
            out.append((w, "int8"))
    return out


def extra_bytes(model: nn.Module, through_adapters: bool) -> int:
    """What QAT keeps besides the model: an fp32 master per trainable quantized matrix,
    or (`through_adapters`) an fp32 D per adapted linear."""
    if through_adapters:
        return 4 * sum(m.base_layer.weight.numel() for m in _lora_linears(model))
    return 4 * sum(t.numel() for t, _ in quantized_tensors(model, "int4", False)
                   if t.requires_grad)


def _lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """An adapted linear computing with D + s·B·A (see the module docstring)."""
    name = self.active_adapters[0]
    a, b = self.lora_A[name], self.lora_B[name]
    bias = self.base_layer.bias
    out = F.linear(x, self._edgezo_qat_d.to(x.device, x.dtype), bias)
    return out + b(a(x.to(a.weight.dtype))).to(out.dtype) * self.scaling[name]


@dataclass
class _Adapted:
    module: nn.Module
    indices: tuple[int, ...]  # the block map's parameter indices of its A and B


class QAT:
    """Installs quantization-aware forwards and keeps what they need in step with the
    updates; the engine calls after_update() with the parameters it just updated."""

    def __init__(self, model: nn.Module, blocks: BlockMap, fmt: str, through_adapters: bool):
        if fmt not in GGUF_TYPE:
            raise ValueError(f"unknown QAT format {fmt!r}")
        self.fmt = fmt
        index_of = {id(p): i for i, p in enumerate(blocks.params)}
        self.params = blocks.params
        self.adapted: dict[int, _Adapted] = {}
        self.masters: dict[int, tuple[torch.Tensor, str]] = {}  # index -> (master, format)
        host = torch.device("cpu")
        with torch.no_grad():
            for tensor, tfmt in quantized_tensors(model, fmt, through_adapters):
                i = index_of.get(id(tensor))
                if i is None:  # frozen: quantized once, in place
                    requantize(tensor, tensor, tfmt)
                    continue
                master = tensor.detach().to(host, torch.float32, copy=True)
                self.masters[i] = (master, tfmt)
                requantize(tensor, master, tfmt)
            if through_adapters:
                for module in _lora_linears(model):
                    name = module.active_adapters[0]
                    idx = tuple(index_of[id(p)] for p in (module.lora_A[name].weight,
                                                          module.lora_B[name].weight))
                    entry = _Adapted(module, idx)
                    for i in idx:
                        self.adapted[i] = entry
                    module._edgezo_qat_d = torch.empty(module.base_layer.weight.shape,
                                                       dtype=torch.float32, device=host)
                    self._refresh(entry)
                    module.forward = types.MethodType(_lora_forward, module)

    @torch.no_grad()
    def _refresh(self, entry: _Adapted) -> None:
        m = entry.module
        name = m.active_adapters[0]
        delta = (m.lora_B[name].weight.float() @ m.lora_A[name].weight.float()).cpu() \
            * m.scaling[name]
        merged = m.base_layer.weight.detach().float().cpu() + delta
        m._edgezo_qat_d.copy_(fake_quant(merged, self.fmt) - delta)

    @torch.no_grad()
    def after_update(self, indices) -> None:
        """Move each updated weight's change into its master and re-quantize (full), or
        recompute the adapted linears' D (lora)."""
        refreshed = set()
        for i in indices:
            if i in self.masters:
                p, (master, fmt) = self.params[i], self.masters[i]
                for w, m in zip(_chunks(p.detach()), _chunks(master), strict=True):
                    # what w held before the update: Q(master) in w's dtype (a bf16
                    # weight rounds it), so the difference is the update alone
                    before = fake_quant(m, fmt).to(w.dtype).float()
                    m += w.float().to(m.device) - before
                    w.copy_(fake_quant(m, fmt).to(w.device, w.dtype))
            elif i in self.adapted and id(self.adapted[i]) not in refreshed:
                refreshed.add(id(self.adapted[i]))
                self._refresh(self.adapted[i])

    # -- snapshots ------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The masters (full); lora's D is a function of the weights and is recomputed."""
        return {f"qat.master.{i}": m for i, (m, _) in self.masters.items()}

    @torch.no_grad()
    def load_state_tensors(self, stored: dict[str, torch.Tensor]) -> None:
        for i, (m, fmt) in self.masters.items():
            m.copy_(stored[f"qat.master.{i}"])
            requantize(self.params[i].detach(), m, fmt)
        for entry in {id(e): e for e in self.adapted.values()}.values():
            self._refresh(entry)

    def remove(self) -> None:
        """The LoRA modules' own forwards back (the weights of full QAT stay quantized)."""
        for entry in {id(e): e for e in self.adapted.values()}.values():
            entry.module.__dict__.pop("forward", None)
