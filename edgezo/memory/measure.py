"""Measured memory, per phase: CUDA peak statistics on a GPU, sampled RSS on the CPU.

On CUDA the allocator's peak counters are reset at the start of every phase (load,
train, eval), so each phase reports its own peak. On the CPU there are no allocator
statistics; a background thread samples the process's resident set size, and the
reported figure is the peak above the RSS measured before the model was loaded (Python,
torch and the tokenizer are not the run's memory).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psutil
import torch

from edgezo.device.heap import release_freed_memory

TRIM_EVERY_S = 0.25
TRIM_MAX_WAIT_S = 8.0  # the longest wait between trims that free little


def next_trim_wait(wait: float, before: int, after: int, limit: int) -> float:
    """Seconds until the next trim of a phase over its plan: the shortest again when the
    last trim freed at least half the excess, else twice as long (up to TRIM_MAX_WAIT_S):
    memory truly over the plan frees little, and must not be trimmed in a loop."""
    if before - after >= (before - limit) / 2:
        return TRIM_EVERY_S
    return max(wait, min(2 * wait, TRIM_MAX_WAIT_S))


class MemoryMonitor:
    def __init__(self, device: torch.device, interval_s: float = 0.01):
        self.device = torch.device(device)
        self.interval_s = interval_s
        self._proc = psutil.Process()
        self.baseline_rss = self._proc.memory_info().rss
        self.samples: list[tuple[float, str, int]] = []  # (time, phase, bytes above baseline)
        self.peaks: dict[str, int] = {}
        # CUDA only: the caching allocator's reserved peak per phase (allocated plus the
        # cached blocks it holds), what the per-process cap is checked against
        self.reserved_peaks: dict[str, int] = {}
        # CPU: each phase's planned bytes; above them the sampler hands glibc's freed heap
        # back to the OS (at most every TRIM_EVERY_S), so that heap it holds after
        # batches of changing shapes does not take the process over its plan
        self.limits: dict[str, int] = {}
        self.trims = 0
        self._phase = self._last = "idle"
        self._phase_peak = 0
        self._t0 = time.perf_counter()
        self._stop = threading.Event()
        # The device the first phase ran on, read on the calling thread: the current CUDA
        # device is per thread, and the sampler must neither initialise CUDA nor read
        # another rank's GPU.
        self._cuda_index: int | None = None
        # On the CPU the samples are also the peaks; on CUDA the allocator keeps exact
        # peaks and the samples only draw memory over time.
        self._thread = threading.Thread(target=self._sample_loop, daemon=True,
                                        name="edgezo-memory")
        self._thread.start()

    def current(self) -> int:
        if self.device.type == "cuda":
            index = self._cuda_index if self._cuda_index is not None else self.device
            return torch.cuda.memory_allocated(index)
        return max(0, self._proc.memory_info().rss - self.baseline_rss)

    def _sample_loop(self) -> None:
        last_record, last_trim, wait = 0.0, float("-inf"), TRIM_EVERY_S
        while not self._stop.wait(self.interval_s):
            if self.device.type == "cuda" and self._cuda_index is None:
                continue  # no phase has started: CUDA may not be initialised yet
            value = self.current()
            self._phase_peak = max(self._phase_peak, value)
            now = time.perf_counter() - self._t0
            limit = self.limits.get(self._phase)
            if (self.device.type == "cpu" and limit and value > limit
                    and now - last_trim >= wait):
                release_freed_memory()
                self.trims += 1
                last_trim = now
                wait = next_trim_wait(wait, value, self.current(), limit)
            if now - last_record >= 0.25:  # keep the time series small
                self.samples.append((now, self._phase, value))
                last_record = now

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Measure the peak of one phase; phases of the same name keep the larger peak."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            if self._cuda_index is None:
                self._cuda_index = (self.device.index if self.device.index is not None
                                    else torch.cuda.current_device())
        elif name != self._last:
            # The CPU's counterpart of resetting the peak: heap the previous phase freed
            # goes back to the OS, or it would count in this phase's peak. Only when the
            # phase changes: a trim per step would make every step fault its pages in again.
            release_freed_memory()
        self._phase, self._last, self._phase_peak = name, name, self.current()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                peak = torch.cuda.max_memory_allocated(self.device)
                reserved = torch.cuda.max_memory_reserved(self.device)
                self.reserved_peaks[name] = max(self.reserved_peaks.get(name, 0), reserved)
            else:
                peak = max(self._phase_peak, self.current())
            self.peaks[name] = max(self.peaks.get(name, 0), peak)
            self._phase = "idle"

    @property
    def peak_bytes(self) -> int:
        """The peak of every phase, loading included."""
        return max(self.peaks.values(), default=0)

    @property
    def run_peak_bytes(self) -> int:
        """The peak while training and evaluating: what the plan predicts.

        Loading is reported as its own phase; converting a GGUF file the first time, for
        instance, briefly holds the quantized and the dequantized weights together.
        """
        work = [v for k, v in self.peaks.items() if k != "load"]
        return max(work, default=self.peak_bytes)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)
