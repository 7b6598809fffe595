"""What a run attaches to a ZOEngine once it is built: data-parallel ranks, layers
streamed off the device and quantization-aware forwards (CUDA graphs attach with
edgezo.zo.graphs.attach). A mixin of `ZOEngine`, as `SeedLogSteps` is: these read the
engine's blocks, masks and perturbation.
"""

from __future__ import annotations

import torch

from edgezo.errors import ConfigError
from edgezo.zo.qat import QAT
from edgezo.zo.stream import BlockStreamer, make_streamer


class Attachments:
    """Data-parallel ranks, streamed layers and QAT on a ZOEngine."""

    def data_parallel(self) -> int:
        """Join the initialised torch.distributed group: every rank keeps a full replica,
        draws the same directions (same seed) and evaluates its shard of each batch; the
        per-example losses are gathered per query, so every rank computes the same g and
        applies the same update. (RunConfig refuses it for non-ZO runs: a backward or a jvp
        would need its gradients reduced, which is DDP's job, not this.)"""
        import torch.distributed as dist

        if not self.zo_only:
            raise RuntimeError("data-parallel ZO needs a ZO-only engine")
        self.world = dist.get_world_size()
        return self.world

    def stream(self, layers: list[int], device: torch.device | str, tier: str = "disk",
               folder: str | None = None, buffers: int | None = None,
               master_dtype: torch.dtype | None = None) -> BlockStreamer:
        """Move the given decoder layers (indices into the layer list) off the device;
        `master_dtype=torch.float32` keeps their trainable half-precision tensors' master
        copies in fp32 (see BlockStreamer). A ZO-only engine only (RunConfig's streaming
        rules): a backward or a jvp needs every weight it differentiates at once, and
        magnitude masks read every weight when drawn."""
        if not self.zo_only or (self.masks is not None and self.masks.mode == "magnitude"):
            raise RuntimeError("streaming needs a ZO-only engine without magnitude masks")
        if self.streamer is not None:
            raise RuntimeError("the engine already streams")
        units = [u for u in self.blocks.units if u.kind == "layer"]
        bad = [i for i in layers if not 0 <= i < len(units)]
        if bad:
            raise ConfigError(f"layers {bad} do not exist; the model has {len(units)} layers")
        self.perturbation.flush()
        trainable = {id(p) for p in self.blocks.params}
        self.streamer = make_streamer([units[i] for i in sorted(set(layers))], trainable,
                                      device, tier, folder, buffers, master_dtype)
        self.perturbation.streamer = self.streamer
        return self.streamer

    def enable_qat(self, fmt: str, through_adapters: bool) -> None:
        """Quantization-aware ZO: forwards see the weights quantized to `fmt` (see
        edgezo.zo.qat); an update goes to the fp32 master (with adapters: D, recomputed)."""
        self.flush()
        self.qat = QAT(self.model, self.blocks, fmt, through_adapters)
        self.perturbation.after_update = self.qat.after_update
