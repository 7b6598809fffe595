"""The streaming lifecycle every tier shares: a layer's tensors live in the tier, come into
a layer-sized buffer on the compute device just before the layer computes, and the ones
an update touched go back after.

    hold(layer):  acquire  -> the forward (and the deferred update) -> release
    acquire:      a free buffer; the tier fetches into it (maybe ahead, during the previous
                  layer's compute); the parameters point at views of the buffer
    release:      updated tensors go back to the tier (`mark_updated` said which); the
                  parameters become NaN placeholders again; the buffer is free

Only trainable tensors ever go back, so a frozen base (LoRA, prefix, prompt, quantized
weights) travels device→tier never. Each streamed layer moves once per step in each
direction at most. Outside a hold, a streamed parameter's ``.data`` is a NaN placeholder
of the right shape, so any use that bypasses the streamer fails loudly.

The master copy: with ``master_dtype=torch.float32``, a trainable fp16/bf16 tensor is kept
in its tier in fp32. While its layer is held, the buffer has both the fp32 master and the
half-precision view the forward computes with (the master rounded to nearest). Updates go
to the master (`master_view`), and `mark_updated` re-rounds the compute view. A ZO update
is often below half an ulp of a bf16 weight, so a half-precision master would lose it
(round-to-nearest, ZO2's failure) or keep it only in expectation (stochastic rounding,
what a resident bf16 run does). The cost: trainable tensors travel as fp32, both ways.

On a GPU, uploads run on a side CUDA stream, ordered by events, so the next layer's
upload overlaps the current layer's compute; write-backs run on a second side stream,
which waits for its layer's compute without holding up the next upload. The tiers
(`host.py`, `disk.py`) say only where a layer's bytes come from and go to.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from edgezo.errors import ConfigError
from edgezo.zo.blocks import Unit

HALF = (torch.float16, torch.bfloat16)
ALIGN = 64  # bytes: every tensor view in a buffer starts on a 64-byte boundary


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass
class StreamedTensor:
    param: nn.Parameter
    name: str  # local name inside the layer
    shape: torch.Size
    dtype: torch.dtype
    nbytes: int
    buffer_offset: int  # where its view starts in a device buffer
    trainable: bool
    master_dtype: torch.dtype  # of the tier's copy: `dtype`, or fp32 for a wide master
    master_offset: int = -1  # a wide master's view in the device buffer (-1: none)
    master: torch.Tensor | None = None  # host tier: the pinned copy
    file_offset: int = 0  # disk tier: byte offset of its data in the layer's file

    @property
    def wide(self) -> bool:
        return self.master_dtype != self.dtype

    @property
    def master_nbytes(self) -> int:
        return self.shape.numel() * self.master_dtype.itemsize


@dataclass
class StreamedLayer:
    unit: Unit
    index: int  # position among the streamed layers (forward order)
    tensors: list[StreamedTensor]
    nbytes: int
    path: object = None  # disk tier: the layer's safetensors file
    slot: int | None = None  # the buffer it occupies, while held or prefetched
    ready: object = None  # CUDA event: its upload finished
    reading: object = None  # disk tier with a worker: its read (a Future), until acquired
    written: object = None  # CUDA event: its last write-back left the device
    dirty: set[int] = field(default_factory=set)  # tensors updated while held


class BlockStreamer(ABC):
    """Keeps `units` (decoder layers) off the compute device between their forwards."""

    tier = ""

    def __init__(self, units: list[Unit], trainable: set[int], device: torch.device,
                 buffers: int | None = None, master_dtype: torch.dtype | None = None):
        """`trainable`: ids of the parameters the optimizer updates (written back).
        `buffers`: layer-sized device buffers; by default two on a GPU (one computing,
        one arriving) and one on a CPU. `master_dtype`: torch.float32 keeps trainable
        fp16/bf16 tensors' masters in fp32; None keeps every tensor in its own dtype."""
        device = torch.device(device)
        buffers = buffers if buffers is not None else (2 if device.type == "cuda" else 1)
        if buffers < 1:
            raise ConfigError(f"streaming needs at least one layer buffer, got {buffers}")
        if master_dtype not in (None, torch.float32):
            raise ConfigError(f"a streamed master copy is fp32 or the weights' own dtype, "
                              f"not {master_dtype}")
        self.device, self.master_dtype = device, master_dtype
        self._cuda = device.type == "cuda"
        self._fills: dict[torch.dtype, torch.Tensor] = {}
        self.layers = [self._offload(unit, k, trainable) for k, unit in enumerate(units)]
        self._by_module = {id(layer.unit.module): layer for layer in self.layers}
        self._by_param = {id(t.param): (layer, j) for layer in self.layers
                          for j, t in enumerate(layer.tensors)}
        self.slot_bytes = max((layer.nbytes for layer in self.layers), default=0)
        self._slots = [torch.empty(self.slot_bytes, dtype=torch.uint8, device=device)
                       for _ in range(min(buffers, len(self.layers)))]
        self._free = list(range(len(self._slots)))
        self._slot_free_event: dict[int, object] = {}
        # uploads and write-backs on separate side streams: a write-back waits for its
        # layer's compute, and an upload queued behind it would wait too
        self._up = torch.cuda.Stream(device) if self._cuda else None
        self._down = torch.cuda.Stream(device) if self._cuda else None
        self.held = 0  # layers materialized right now (held or prefetched)
        self.max_held = 0
        self.bytes_in = 0  # traffic, for the report and the benchmark
        self.bytes_out = 0
        self.loads = 0

    # -- what a tier provides -------------------------------------------------------------
    @abstractmethod
    def _store(self, layer: StreamedLayer) -> None:
        """Put the layer's tensors (masters in their master dtype) into the tier."""

    @abstractmethod
    def _fetch(self, layer: StreamedLayer, slot: int) -> None:
        """Start bringing the layer's tier copies into buffer `slot` (asynchronously where
        the tier can); `_arrive` waits for it."""

    @abstractmethod
    def _send_back(self, layer: StreamedLayer, slot: int, dirty: list[int]) -> None:
        """Start writing the dirty tensors' tier copies (`self._masters`) back."""

    def _arrive(self, layer: StreamedLayer) -> None:
        """Wait until the layer's fetch has landed in its buffer."""
        if self._cuda:
            torch.cuda.current_stream(self.device).wait_event(layer.ready)

    @property
    def _prefetches(self) -> bool:
        """Whether the next layer is fetched while the current one computes."""
        return len(self._slots) > 1 and self._cuda

    def close(self) -> None:
        if self._cuda:
            torch.cuda.synchronize(self.device)

    # -- setup ------------------------------------------------------------------------------
    def _placeholder(self, p: torch.Tensor) -> torch.Tensor:
        one = self._fills.get(p.dtype)
        if one is None:
            fill = float("nan") if p.dtype.is_floating_point else 0
            one = self._fills[p.dtype] = torch.full((1,), fill, dtype=p.dtype,
                                                    device=self.device)
        return one.expand(p.shape)

    def _offload(self, unit: Unit, k: int, trainable: set[int]) -> StreamedLayer:
        """Lay the layer out in a buffer (compute views, then wide masters), store it in
        the tier and release its device copy."""
        tensors, offset = [], 0
        for name, p in unit.module.named_parameters():
            if not p.is_contiguous():
                raise ConfigError(f"cannot stream {unit.name}.{name}: not contiguous")
            nbytes = p.numel() * p.element_size()
            train = id(p) in trainable
            wide = self.master_dtype is not None and train and p.dtype in HALF
            tensors.append(StreamedTensor(p, name, p.shape, p.dtype, nbytes, offset, train,
                                          self.master_dtype if wide else p.dtype))
            offset = _aligned(offset + nbytes)
        for t in tensors:
            if t.wide:
                t.master_offset = offset
                offset = _aligned(offset + t.master_nbytes)
        layer = StreamedLayer(unit, k, tensors, offset)
        self._store(layer)
        for t in tensors:
            t.param.data = self._placeholder(t.param)
        return layer

    # -- views into a buffer ------------------------------------------------------------------
    def _views(self, layer: StreamedLayer, slot: int) -> list[torch.Tensor]:
        buf = self._slots[slot]
        return [buf[t.buffer_offset:t.buffer_offset + t.nbytes].view(t.dtype).view(t.shape)
                for t in layer.tensors]

    def _master_view(self, t: StreamedTensor, slot: int) -> torch.Tensor:
        buf = self._slots[slot]
        return (buf[t.master_offset:t.master_offset + t.master_nbytes]
                .view(t.master_dtype).view(t.shape))

    @staticmethod
    def _tier_views(layer: StreamedLayer, buf: torch.Tensor) -> list[torch.Tensor]:
        """Where each tensor's tier copy sits in a layer-sized byte buffer (a device
        buffer or its staging twin): its master view when wide, else its compute view."""
        out = []
        for t in layer.tensors:
            start, n = ((t.master_offset, t.master_nbytes) if t.wide
                        else (t.buffer_offset, t.nbytes))
            out.append(buf[start:start + n].view(t.master_dtype).view(t.shape))
        return out

    def _masters(self, layer: StreamedLayer, slot: int) -> list[torch.Tensor]:
        return self._tier_views(layer, self._slots[slot])

    def _round_wide(self, layer: StreamedLayer, slot: int) -> None:
        """Round each wide master into its compute view: what a resident half-precision
        copy would hold (on the upload stream on a GPU)."""
        views, masters = self._views(layer, slot), self._masters(layer, slot)
        for t, v, m in zip(layer.tensors, views, masters, strict=True):
            if t.wide:
                v.copy_(m)

    # -- the lifecycle ----------------------------------------------------------------------
    def streams(self, module: nn.Module) -> bool:
        return id(module) in self._by_module

    @contextmanager
    def hold(self, module: nn.Module) -> Iterator[None]:
        """The layer's weights are on the device inside; updated tensors go back after."""
        layer = self._by_module[id(module)]
        self._acquire(layer)
        try:
            yield
        finally:
            self._release(layer)

    def master_view(self, param: nn.Parameter) -> torch.Tensor:
        """What an update of `param` writes to: its fp32 master while its layer is held,
        when it has one; otherwise the parameter itself. Call mark_updated after."""
        found = self._by_param.get(id(param))
        if found is None or not found[0].tensors[found[1]].wide:
            return param.detach()
        layer, j = found
        if layer.slot is None:
            raise RuntimeError(f"{layer.unit.name}.{layer.tensors[j].name}'s master was "
                               "asked for while its layer is not held by the streamer")
        return self._master_view(layer.tensors[j], layer.slot)

    def mark_updated(self, param: nn.Parameter) -> None:
        """The engine updated `param` (or its master view) in place: it must travel back
        on release, and a wide master's compute view is rounded from it again."""
        found = self._by_param.get(id(param))
        if found is not None:
            layer, j = found
            if layer.slot is None:
                raise RuntimeError(f"{layer.unit.name}.{layer.tensors[j].name} was updated "
                                   "while not held by the streamer")
            t = layer.tensors[j]
            if t.wide:
                param.detach().copy_(self._master_view(t, layer.slot))
            layer.dirty.add(j)

    def _take_slot(self) -> int:
        if not self._free:
            raise RuntimeError("every streaming buffer is in use; a streamed layer ran inside "
                               "another, which edgezo's block map does not produce")
        slot = self._free.pop(0)
        event = self._slot_free_event.pop(slot, None)
        if event is not None:
            self._up.wait_event(event)  # its previous layer computed and went back
        return slot

    def _load(self, layer: StreamedLayer) -> None:
        slot = self._take_slot()
        layer.slot = slot
        if layer.written is not None:
            self._up.wait_event(layer.written)  # its masters hold the last update
        self._fetch(layer, slot)
        self.held += 1
        self.max_held = max(self.max_held, self.held)
        self.bytes_in += sum(t.master_nbytes for t in layer.tensors)
        self.loads += 1

    def _acquire(self, layer: StreamedLayer) -> None:
        if layer.slot is None:
            self._load(layer)
        self._arrive(layer)
        for t, v in zip(layer.tensors, self._views(layer, layer.slot), strict=True):
            t.param.data = v
        layer.dirty = set()
        if self._prefetches:
            nxt = self.layers[(layer.index + 1) % len(self.layers)]
            if nxt.slot is None and self._free:
                self._load(nxt)  # overlaps this layer's compute

    def _release(self, layer: StreamedLayer) -> None:
        slot, dirty = layer.slot, sorted(layer.dirty)
        if self._cuda:  # write-backs wait for the layer's compute, on their own stream
            computed = torch.cuda.Event()
            computed.record(torch.cuda.current_stream(self.device))
            self._down.wait_event(computed)
        self._send_back(layer, slot, dirty)
        self.bytes_out += sum(layer.tensors[j].master_nbytes for j in dirty)
        for t in layer.tensors:
            t.param.data = self._placeholder(t.param)
        self._free.append(slot)
        layer.slot, layer.dirty = None, set()
        self.held -= 1

    def _record_sent(self, layer: StreamedLayer, slot: int, dirty: list[int]) -> object:
        """On a GPU, after queueing a write-back on the down stream: the event that frees
        the slot and that the layer's next upload waits for."""
        done = torch.cuda.Event()
        done.record(self._down)
        self._slot_free_event[slot] = done
        if dirty:
            layer.written = done
        return done

    # -- whole-model access -----------------------------------------------------------------
    @contextmanager
    def materialized(self) -> Iterator[None]:
        """Every streamed layer's weights as plain CPU tensors (for saving or export)."""
        self.restore("cpu")
        try:
            yield
        finally:
            for layer in self.layers:
                for t in layer.tensors:
                    t.param.data = self._placeholder(t.param)

    def restore(self, device: torch.device | str) -> None:
        """Give every streamed parameter a real tensor again, on `device`."""
        for layer in self.layers:
            with self.hold(layer.unit.module):
                copies = [t.param.detach().to(device, copy=True) for t in layer.tensors]
            for t, c in zip(layer.tensors, copies, strict=True):
                t.param.data = c

    def stats(self) -> dict:
        wide = [t for layer in self.layers for t in layer.tensors if t.wide]
        return {"tier": self.tier, "streamed_layers": len(self.layers),
                "master_dtype": str(self.master_dtype or "same").removeprefix("torch."),
                "wide_master_tensors": len(wide),
                "buffers": len(self._slots), "buffer_bytes": self.slot_bytes,
                "max_layers_held": self.max_held, "loads": self.loads,
                "bytes_in": self.bytes_in, "bytes_out": self.bytes_out}
