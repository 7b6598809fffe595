"""The host tier (CUDA only): each streamed layer's tensors stay in pinned host memory and
come up on the upload stream; updated ones go down on the write-back stream."""

from __future__ import annotations

import torch

from edgezo.errors import ConfigError
from edgezo.zo.stream.base import BlockStreamer, StreamedLayer


class HostStreamer(BlockStreamer):
    tier = "host"

    def __init__(self, units, trainable, device, buffers=None, master_dtype=None):
        if torch.device(device).type != "cuda":
            raise ConfigError("the host tier streams layers to a GPU; on a CPU device, where "
                              "the weights already live in host memory, use the disk tier")
        super().__init__(units, trainable, device, buffers, master_dtype)

    def _store(self, layer: StreamedLayer) -> None:
        for t in layer.tensors:
            t.master = t.param.detach().to("cpu", t.master_dtype, copy=True).pin_memory()

    def _fetch(self, layer: StreamedLayer, slot: int) -> None:
        with torch.cuda.stream(self._up):
            for t, m in zip(layer.tensors, self._masters(layer, slot), strict=True):
                m.copy_(t.master, non_blocking=True)
            self._round_wide(layer, slot)
            layer.ready = torch.cuda.Event()
            layer.ready.record(self._up)

    def _send_back(self, layer: StreamedLayer, slot: int, dirty: list[int]) -> None:
        masters = self._masters(layer, slot)
        with torch.cuda.stream(self._down):
            for j in dirty:
                layer.tensors[j].master.copy_(masters[j], non_blocking=True)
            self._record_sent(layer, slot, dirty)
