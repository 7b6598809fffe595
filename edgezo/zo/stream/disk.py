"""The disk tier: each streamed layer is a safetensors file, read with ``preadv`` and its
trainable tensors written back in place with ``pwrite``.

Reads go through the OS page cache but not into the process's resident memory, so the run
holds only the buffers. With two or more buffers the file I/O runs on one worker thread,
so the next layer is read while the current one computes and write-backs do not stall the
forward; one thread keeps reads and writes in order, so a layer is never read before its
last write-back lands. On a GPU each buffer has a pinned host twin (the staging buffer):
the worker reads into it and queues the upload on the upload stream, and write-backs come
down into it before they go to disk. On the CPU (where the compute device *is* the host)
this is the only tier, and it is what the test suite exercises.
"""

from __future__ import annotations

import os
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import save_file

from edgezo.zo.stream.base import BlockStreamer, StreamedLayer
from edgezo.zo.stream.tensorfile import read_header


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


class DiskStreamer(BlockStreamer):
    tier = "disk"

    def __init__(self, units, trainable, device, folder: str | os.PathLike | None = None,
                 buffers=None, master_dtype=None):
        self._tmp = None
        if folder is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="edgezo-offload-")
            folder = self._tmp.name
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        super().__init__(units, trainable, device, buffers, master_dtype)
        # pinned host twins of the device buffers, which a GPU's reads and writes go through
        self._staging = ([torch.empty(self.slot_bytes, dtype=torch.uint8, pin_memory=True)
                          for _ in self._slots] if self._cuda else None)
        self._staging_busy: dict[int, object] = {}  # slot -> last copy through its twin
        self._io = (ThreadPoolExecutor(1, thread_name_prefix="edgezo-stream-io")
                    if self._cuda or len(self._slots) > 1 else None)
        self._writes: list[Future] = []

    @property
    def _prefetches(self) -> bool:
        return len(self._slots) > 1 and (self._cuda or self._io is not None)

    def _store(self, layer: StreamedLayer) -> None:
        layer.path = self.folder / f"layer-{layer.index:04d}.safetensors"
        save_file({t.name: t.param.detach().to("cpu", t.master_dtype).contiguous()
                   for t in layer.tensors}, str(layer.path))
        header, start = read_header(layer.path)
        for t in layer.tensors:
            t.file_offset = start + header[t.name]["data_offsets"][0]

    def _fetch(self, layer: StreamedLayer, slot: int) -> None:
        if self._io is not None:
            layer.reading = self._io.submit(self._read, layer, slot)
        else:
            self._read(layer, slot)

    def _read(self, layer: StreamedLayer, slot: int) -> None:
        """The layer's file into its buffer (through the staging twin on a GPU, then
        uploaded on the upload stream)."""
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
        if not self._cuda:
            self._round_wide(layer, slot)
            return
        with torch.cuda.stream(self._up):
            self._slots[slot][:layer.nbytes].copy_(target[:layer.nbytes], non_blocking=True)
            self._round_wide(layer, slot)
            ready = torch.cuda.Event()
            ready.record(self._up)
        self._staging_busy[slot] = layer.ready = ready

    def _arrive(self, layer: StreamedLayer) -> None:
        if layer.reading is not None:
            reading, layer.reading = layer.reading, None
            reading.result()  # a failed read raises here
        self._check_writes()
        super()._arrive(layer)

    def _send_back(self, layer: StreamedLayer, slot: int, dirty: list[int]) -> None:
        masters = self._masters(layer, slot)
        if self._cuda:
            staged = self._tier_views(layer, self._staging[slot])
            with torch.cuda.stream(self._down):
                for j in dirty:
                    staged[j].copy_(masters[j], non_blocking=True)
            done = self._record_sent(layer, slot, dirty)
            self._staging_busy[slot] = done
            if dirty:
                self._writes.append(self._io.submit(self._write, layer, dirty, staged, done))
        elif dirty and self._io is not None:
            # the worker writes from the buffer before any later read can refill it
            self._writes.append(self._io.submit(self._write, layer, dirty, masters))
        elif dirty:
            self._write(layer, dirty, masters)

    def _write(self, layer: StreamedLayer, dirty: list[int], sources: list[torch.Tensor],
               after: object = None) -> None:
        """Updated tensors back into the layer's file (`after`: a CUDA event their
        download into the staging twin records)."""
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

    def close(self) -> None:
        if self._io is not None:
            self._io.shutdown(wait=True)  # every write-back lands before the files go
            self._check_writes(wait=True)
        super().close()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
