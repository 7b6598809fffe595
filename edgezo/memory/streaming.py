"""What streaming costs and saves in a plan: which layers stream, where they live, the
buffers they need on the device and the step time their transfers bound."""

from __future__ import annotations

from typing import NamedTuple

import torch

from edgezo.device.profiles import Profile
from edgezo.zo.blocks import BlockMap


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def stream_tier(offload: str, profile: Profile, layer_total: int) -> str:
    """Where streamed layers live: pinned host memory on a GPU when it holds them (with
    10% to spare), else the disk; on a CPU the disk (the host is the device)."""
    if offload in ("host", "disk"):
        return offload
    if profile.device == "cuda" and layer_total <= 0.9 * profile.host_memory_bytes:
        return "host"
    return "disk"


def streamed_layers(n_layers: int, k: int) -> list[int]:
    """Which k of n layers stream: spread evenly, so that a streamed layer's upload can
    overlap the compute of the resident layers before it."""
    if k <= 0:
        return []
    if k >= n_layers:
        return list(range(n_layers))
    return sorted({int((j + 0.5) * n_layers / k) for j in range(k)})


class LayerBytes(NamedTuple):
    total: int  # every parameter, in its own dtype
    trainable: int  # the parameters the optimizer updates
    masters: int  # fp32 masters of its trainable fp16/bf16 tensors (4 bytes a value)

    @property
    def widen(self) -> int:
        """What the fp32 masters add to the tier over the tensors' own 2-byte copies."""
        return self.masters // 2


def layer_bytes(blocks: BlockMap) -> list[LayerBytes]:
    """The parameter bytes of each decoder layer, in order."""
    trainable = {id(p) for p in blocks.params}
    out = []
    for unit in blocks.units:
        if unit.kind == "layer":
            ps = list(unit.module.parameters())
            train = [p for p in ps if id(p) in trainable]
            out.append(LayerBytes(
                sum(_bytes(p) for p in ps), sum(_bytes(p) for p in train),
                sum(p.numel() * 4 for p in train
                    if p.dtype in (torch.float16, torch.bfloat16))))
    return out


def streaming_terms(blocks: BlockMap, profile: Profile, layers: list[int], tier: str,
                    buffers: int, flops: float, masters: str = "auto"
                    ) -> tuple[int, int, dict]:
    """(device bytes freed, buffer bytes, the plan's streaming section).

    Trainable half-precision tensors keep fp32 masters in the tier with `masters="fp32"`,
    and with "auto" whenever the tier holds them: always on disk, and in pinned host
    memory when the layers fit in 90% of the profile's host memory with them. They then
    travel as fp32 both ways, and a layer's buffer holds its fp32 masters beside its
    compute copy. "model" keeps every tensor in the model's dtype.
    """
    sizes = layer_bytes(blocks)
    chosen = [sizes[i] for i in layers]
    moved = sum(s.total for s in chosen)
    widen = sum(s.widen for s in chosen)
    room = tier == "disk" or moved + widen <= 0.9 * profile.host_memory_bytes
    fp32 = widen > 0 and (masters == "fp32" or (masters == "auto" and room))
    if not fp32:
        widen = 0
    # a layer's buffer holds its compute copy and, beside it, its fp32 masters
    slot = max((s.total + (s.masters if fp32 else 0) for s in chosen), default=0)
    buffer = min(buffers, len(layers)) * slot
    out_bytes = sum(s.trainable for s in chosen) + widen  # only trainable tensors go back
    bandwidth = (profile.host_device_bandwidth_gbps if tier == "host"
                 else profile.disk_bandwidth_gbps) * 1e9
    transfer_s = (moved + widen + out_bytes) / bandwidth if bandwidth > 0 else float("inf")
    compute_s = flops / (profile.device_tflops * 1e12) if profile.device_tflops else None
    section = {
        "tier": tier, "layers": layers, "buffers": min(buffers, len(layers)),
        "master_dtype": "fp32" if fp32 else "same",
        # on a GPU the disk tier goes through pinned host twins of the device buffers
        "host_bytes": (moved + widen if tier == "host"
                       else buffer if profile.device == "cuda" else 0),
        "disk_bytes": moved + widen if tier == "disk" else 0,
        "bytes_in_per_step": moved + widen, "bytes_out_per_step": out_bytes,
        "transfer_s": transfer_s, "compute_s": compute_s,
        "step_bound_s": max(transfer_s, compute_s or 0.0),
    }
    return moved, buffer, section
