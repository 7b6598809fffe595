"""Block streaming: decoder layers whose weights do not fit on the compute device live in
a slower tier and are brought in one at a time, just before they compute.

Tiers:

- ``host`` (CUDA only): the master copy of each streamed layer stays in pinned host
  memory. Layers come up on a side CUDA stream (uploads) into one of a few device
  buffers (two by default: one computing, one arriving), ordered by CUDA events, so the
  copy of the next streamed layer overlaps the compute of the current one. Updated
  tensors go back on a second side stream (write-backs), which waits for its layer's
  compute without holding up the next upload.
- ``disk``: each streamed layer is a safetensors file, read with ``preadv`` and its
  trainable tensors written back in place with ``pwrite``. Reads go through the OS page
  cache but not into the process's resident memory, so the run holds only the buffers.
  With two or more buffers the file I/O runs on one worker thread, so the next layer is
  read while the current one computes, and write-backs do not stall the forward; one
  thread keeps reads and writes in order, so a layer is never read before its last
  write-back lands. On a GPU each buffer has a pinned host twin (the staging buffer):
  the worker reads into it and queues the upload on the upload stream, and write-backs
  come down into it before they go to disk. On the CPU (where the compute device *is*
  the host) this is the only tier, and it is what the test suite exercises.

How it meets the ZO step: the engine's wrapper for a layer holds the layer for the
duration of its forward (`hold`). Inside, the step's deferred update is applied to the
layer's trainable tensors, both halves of the pair forward run, and on leaving only
tensors that were updated travel back; a frozen base (LoRA, prefix, prompt, quantized
weights) never travels device→host. Each streamed layer therefore moves once per step in
each direction at most. Outside a hold, a streamed parameter's ``.data`` is a NaN
placeholder of the right shape, so any use that bypasses the streamer fails loudly.

The master copy: with ``master_dtype=torch.float32``, a trainable fp16/bf16 tensor is kept
in its tier in fp32. While its layer is held, the buffer has both the fp32 master and the
half-precision view the forward computes with (the master rounded to nearest). Updates go
to the master (`master_view`), and `mark_updated` re-rounds the compute view. A ZO update
is often below half an ulp of a bf16 weight, so a half-precision master would lose it
(round-to-nearest, ZO2's failure) or keep it only in expectation (stochastic rounding,
what a resident bf16 run does). The cost: trainable tensors travel as fp32, both ways.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from edgezo.errors import ConfigError
from edgezo.zo.blocks import Unit

TIERS = ("host", "disk")
HALF = (torch.float16, torch.bfloat16)
ALIGN = 64  # bytes: every tensor view in a buffer starts on a 64-byte boundary


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _bytes_view(t: torch.Tensor):
    """A writable byte-level numpy view of a contiguous CPU tensor (any dtype)."""
    return t.view(-1).view(torch.uint8).numpy()


def _read_exact(fd: int, out, offset: int) -> None:
    view, done = memoryview(out), 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise OSError(f"unexpected end of offload file at byte {offset + done}")
        done += n


def _write_exact(fd: int, data, offset: int) -> None:
    view, done = memoryview(data), 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


@dataclass
class _Tensor:
    param: nn.Parameter
    name: str  # local name inside the layer
    shape: torch.Size
    dtype: torch.dtype
    nbytes: int
    buffer_offset: int  # where its view starts in a device buffer
    trainable: bool
    master_dtype: torch.dtype  # of the tier's copy: `dtype`, or fp32 for a wide master
    master_offset: int = -1  # a wide master's view in the device buffer (-1: none)
    master: torch.Tensor | None = None  # host tier
    file_offset: int = 0  # disk tier: byte offset of its data in the layer's file

    @property
    def wide(self) -> bool:
        return self.master_dtype != self.dtype

    @property
    def master_nbytes(self) -> int:
        return self.shape.numel() * self.master_dtype.itemsize


@dataclass
class _Layer:
    unit: Unit
    index: int  # position among the streamed layers (forward order)
    tensors: list[_Tensor]
    nbytes: int
    path: Path | None = None
    slot: int | None = None  # the buffer it occupies, while held or prefetched
    ready: object = None  # CUDA event: its upload finished
    reading: Future | None = None  # disk tier with a worker: its read, until acquired
    written: object = None  # CUDA event: its last write-back left the device
    dirty: set[int] = field(default_factory=set)  # tensors updated while held


class BlockStreamer:
    """Keeps `units` (decoder layers) off the compute device between their forwards."""

    def __init__(self, units: list[Unit], trainable: set[int], device: torch.device,
                 tier: str = "disk", folder: str | os.PathLike | None = None,
                 buffers: int | None = None, master_dtype: torch.dtype | None = None):
        """`trainable`: ids of the parameters the optimizer updates (written back).
        `buffers`: layer-sized device buffers; by default two on a GPU (one computing,
        one arriving) and one on a CPU, where reads are not overlapped.
        `master_dtype`: torch.float32 keeps trainable fp16/bf16 tensors' masters in fp32;
        None keeps every tensor in its own dtype."""
        device = torch.device(device)
        buffers = buffers if buffers is not None else (2 if device.type == "cuda" else 1)
        if tier not in TIERS:
            raise ConfigError(f"unknown offload tier {tier!r}; valid: {', '.join(TIERS)}")
        if tier == "host" and device.type != "cuda":
            raise ConfigError("the host tier streams layers to a GPU; on a CPU device, where "
                              "the weights already live in host memory, use the disk tier")
        if buffers < 1:
            raise ConfigError(f"streaming needs at least one layer buffer, got {buffers}")
        if master_dtype not in (None, torch.float32):
            raise ConfigError(f"a streamed master copy is fp32 or the weights' own dtype, "
                              f"not {master_dtype}")
        self.device, self.tier, self.buffers = device, tier, buffers
        self.master_dtype = master_dtype
        self._fills: dict[torch.dtype, torch.Tensor] = {}
        self._tmp = None
        if tier == "disk":
            if folder is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="edgezo-offload-")
                folder = self._tmp.name
            self.folder = Path(folder)
            self.folder.mkdir(parents=True, exist_ok=True)
        self.layers: list[_Layer] = []
        for k, unit in enumerate(units):
            self.layers.append(self._offload(unit, k, trainable))
        self._by_module = {id(layer.unit.module): layer for layer in self.layers}
        self._by_param = {id(t.param): (layer, j) for layer in self.layers
                          for j, t in enumerate(layer.tensors)}
        self.slot_bytes = max((layer.nbytes for layer in self.layers), default=0)
        self._slots = [torch.empty(self.slot_bytes, dtype=torch.uint8, device=device)
                       for _ in range(min(buffers, len(self.layers)))]
        self._free = list(range(len(self._slots)))
        self._slot_free_event: dict[int, object] = {}
        self._cuda = device.type == "cuda"
        # uploads and write-backs on separate side streams: a write-back waits for its
        # layer's compute, and an upload queued behind it would wait too
        self._up = torch.cuda.Stream(device) if self._cuda else None
        self._down = torch.cuda.Stream(device) if self._cuda else None
        disk = tier == "disk"
        # pinned host twins of the device buffers, which disk reads and writes go through
        self._staging = ([torch.empty(self.slot_bytes, dtype=torch.uint8, pin_memory=True)
                          for _ in self._slots] if disk and self._cuda else None)
        self._staging_busy: dict[int, object] = {}  # slot -> last copy through its twin
        self._io = (ThreadPoolExecutor(1, thread_name_prefix="edgezo-stream-io")
                    if disk and (self._cuda or len(self._slots) > 1) else None)
        self._writes: list[Future] = []
        self.held = 0  # layers materialized right now (held or prefetched)
        self.max_held = 0
        self.bytes_in = 0  # traffic, for the report and the benchmark
        self.bytes_out = 0
        self.loads = 0

    # -- setup ------------------------------------------------------------------------------
    def _placeholder(self, p: torch.Tensor) -> torch.Tensor:
        one = self._fills.get(p.dtype)
        if one is None:
            fill = float("nan") if p.dtype.is_floating_point else 0
            one = self._fills[p.dtype] = torch.full((1,), fill, dtype=p.dtype,
                                                    device=self.device)
        return one.expand(p.shape)

    def _offload(self, unit: Unit, k: int, trainable: set[int]) -> _Layer:
        tensors, offset = [], 0
        for name, p in unit.module.named_parameters():
            if not p.is_contiguous():
                raise ConfigError(f"cannot stream {unit.name}.{name}: not contiguous")
            nbytes = p.numel() * p.element_size()
            train = id(p) in trainable
            wide = self.master_dtype is not None and train and p.dtype in HALF
            tensors.append(_Tensor(p, name, p.shape, p.dtype, nbytes, offset, train,
                                   self.master_dtype if wide else p.dtype))
            offset = _aligned(offset + nbytes)
        for t in tensors:  # wide masters after the compute views
            if t.wide:
                t.master_offset = offset
                offset = _aligned(offset + t.master_nbytes)
        layer = _Layer(unit, k, tensors, offset)
        if self.tier == "host":
            for t in tensors:
                t.master = t.param.detach().to("cpu", t.master_dtype, copy=True).pin_memory()
        else:
            layer.path = self.folder / f"layer-{k:04d}.safetensors"
            save_file({t.name: t.param.detach().to("cpu", t.master_dtype).contiguous()
                       for t in tensors}, str(layer.path))
            layer_offsets = self._file_offsets(layer.path)
            for t in tensors:
                t.file_offset = layer_offsets[t.name]
        for t in tensors:  # the device copy is released now
            t.param.data = self._placeholder(t.param)
        return layer

    @staticmethod
    def _file_offsets(path: Path) -> dict[str, int]:
        """Absolute byte offset of each tensor's data in a safetensors file."""
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        return {k: 8 + n + v["data_offsets"][0] for k, v in header.items()
                if k != "__metadata__"}

    # -- the lifecycle --------------------------------------------------------------------
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

    def _views(self, layer: _Layer, slot: int) -> list[torch.Tensor]:
        buf = self._slots[slot]
        return [buf[t.buffer_offset:t.buffer_offset + t.nbytes].view(t.dtype).view(t.shape)
                for t in layer.tensors]

    def _master_view(self, t: _Tensor, slot: int) -> torch.Tensor:
        buf = self._slots[slot]
        return (buf[t.master_offset:t.master_offset + t.master_nbytes]
                .view(t.master_dtype).view(t.shape))

    @staticmethod
    def _tier_views(layer: _Layer, buf: torch.Tensor) -> list[torch.Tensor]:
        """Where each tensor's tier copy sits in a layer-sized byte buffer (a device
        buffer or its staging twin): its master view when wide, else its compute view."""
        out = []
        for t in layer.tensors:
            start, n = ((t.master_offset, t.master_nbytes) if t.wide
                        else (t.buffer_offset, t.nbytes))
            out.append(buf[start:start + n].view(t.master_dtype).view(t.shape))
        return out

    def _masters(self, layer: _Layer, slot: int) -> list[torch.Tensor]:
        return self._tier_views(layer, self._slots[slot])

    def _load(self, layer: _Layer) -> None:
        """Start bringing `layer` into a free buffer (asynchronous on CUDA, and on the
        disk tier's worker thread when there is one)."""
        slot = self._take_slot()
        layer.slot = slot
        if layer.written is not None:
            self._up.wait_event(layer.written)  # its masters hold the last update
        if self.tier == "host":
            views, masters = self._views(layer, slot), self._masters(layer, slot)
            with torch.cuda.stream(self._up):
                for t, m in zip(layer.tensors, masters, strict=True):
                    m.copy_(t.master, non_blocking=True)
                self._round_wide(layer, views, masters)
                layer.ready = torch.cuda.Event()
                layer.ready.record(self._up)
        elif self._io is not None:
            layer.reading = self._io.submit(self._read, layer, slot)
        else:
            self._read(layer, slot)
        self.held += 1
        self.max_held = max(self.max_held, self.held)
        self.bytes_in += sum(t.master_nbytes for t in layer.tensors)
        self.loads += 1

    def _read(self, layer: _Layer, slot: int) -> None:
        """Disk tier: the layer's file into its buffer (through the staging twin on a
        GPU, then uploaded on the upload stream)."""
        target = self._staging[slot] if self._staging is not None else self._slots[slot]
        if self._cuda:
            busy = self._staging_busy.pop(slot, None)
            if busy is not None:
                busy.synchronize()  # the twin's last upload or download has finished
        fd = os.open(layer.path, os.O_RDONLY)
        try:
            for t, m in zip(layer.tensors, self._tier_views(layer, target), strict=True):
                _read_exact(fd, _bytes_view(m), t.file_offset)
        finally:
            os.close(fd)
        views, masters = self._views(layer, slot), self._masters(layer, slot)
        if not self._cuda:
            self._round_wide(layer, views, masters)
            return
        with torch.cuda.stream(self._up):
            self._slots[slot][:layer.nbytes].copy_(target[:layer.nbytes], non_blocking=True)
            self._round_wide(layer, views, masters)
            ready = torch.cuda.Event()
            ready.record(self._up)
        self._staging_busy[slot] = layer.ready = ready

    def _write(self, layer: _Layer, dirty: list[int], sources: list[torch.Tensor],
               after: object = None) -> None:
        """Disk tier: updated tensors back into the layer's file (`after`: a CUDA event
        their download into the staging twin records)."""
        if after is not None:
            after.synchronize()
        try:
            fd = os.open(layer.path, os.O_WRONLY)
            try:
                for j in dirty:
                    _write_exact(fd, _bytes_view(sources[j]), layer.tensors[j].file_offset)
            finally:
                os.close(fd)
        except OSError as err:
            raise OSError(f"writing {layer.unit.name}'s updated weights back to {layer.path} "
                          f"failed ({err}); free disk space or pick another --offload-dir"
                          ) from err

    def _check_writes(self, wait: bool = False) -> None:
        """Raise a failed background write-back here, on the training thread."""
        while self._writes and (wait or self._writes[0].done()):
            self._writes.pop(0).result()

    @staticmethod
    def _round_wide(layer: _Layer, views, masters) -> None:
        for t, v, m in zip(layer.tensors, views, masters, strict=True):
            if t.wide:
                v.copy_(m)  # round to nearest: what a resident half-precision copy holds

    def _acquire(self, layer: _Layer) -> None:
        if layer.slot is None:
            self._load(layer)
        if layer.reading is not None:
            reading, layer.reading = layer.reading, None
            reading.result()  # a failed read raises here
        self._check_writes()
        if self._cuda:
            torch.cuda.current_stream(self.device).wait_event(layer.ready)
        for t, v in zip(layer.tensors, self._views(layer, layer.slot), strict=True):
            t.param.data = v
        layer.dirty = set()
        if len(self._slots) > 1 and (self._cuda or self._io is not None):
            nxt = self.layers[(layer.index + 1) % len(self.layers)]
            if nxt.slot is None and self._free:
                self._load(nxt)  # prefetch: overlaps this layer's compute

    def _release(self, layer: _Layer) -> None:
        slot = layer.slot
        masters = self._masters(layer, slot)  # what travels back: the tier's copy
        dirty = sorted(layer.dirty)
        if self._cuda:
            computed = torch.cuda.Event()
            computed.record(torch.cuda.current_stream(self.device))
            self._down.wait_event(computed)
            staged = (self._tier_views(layer, self._staging[slot])
                      if self._staging is not None else None)
            with torch.cuda.stream(self._down):
                for j in dirty:
                    into = layer.tensors[j].master if staged is None else staged[j]
                    into.copy_(masters[j], non_blocking=True)
                done = torch.cuda.Event()
                done.record(self._down)
            self._slot_free_event[slot] = done
            if dirty:
                layer.written = done
            if staged is not None:
                self._staging_busy[slot] = done
                if dirty:
                    self._writes.append(self._io.submit(self._write, layer, dirty, staged, done))
        elif dirty and self._io is not None:
            # the worker writes from the buffer before any later read can refill it
            self._writes.append(self._io.submit(self._write, layer, dirty, masters))
        elif dirty:
            self._write(layer, dirty, masters)
        self.bytes_out += sum(layer.tensors[j].master_nbytes for j in dirty)
        for t in layer.tensors:
            t.param.data = self._placeholder(t.param)
        self._free.append(slot)
        layer.slot, layer.dirty = None, set()
        self.held -= 1

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

    def close(self) -> None:
        if self._io is not None:
            self._io.shutdown(wait=True)  # every write-back lands before the files go
            self._check_writes(wait=True)
        if self._cuda:
            torch.cuda.synchronize(self.device)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def stats(self) -> dict:
        wide = [t for layer in self.layers for t in layer.tensors if t.wide]
        return {"tier": self.tier, "streamed_layers": len(self.layers),
                "master_dtype": str(self.master_dtype or "same").removeprefix("torch."),
                "wide_master_tensors": len(wide),
                "buffers": len(self._slots), "buffer_bytes": self.slot_bytes,
                "max_layers_held": self.max_held, "loads": self.loads,
                "bytes_in": self.bytes_in, "bytes_out": self.bytes_out}
