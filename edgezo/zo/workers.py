"""Thread-local buffers and parallel chunk work on the CPU. torch's CPU generator is
serial, which makes drawing z the largest cost of a ZO step after the forward passes
when it draws; independent chunks let the cores share it. On CUDA the kernels are
asynchronous already, so chunks run in order on the caller's thread.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, wait

import torch

from edgezo.zo import chunking

_BUFFERS = threading.local()


def thread_buffer(name: str, numel: int, dtype: torch.dtype, device: torch.device
                  ) -> torch.Tensor:
    """A flat buffer reused by this thread, so the hot path allocates nothing.

    Valid until the same thread asks for the same name again.
    """
    buffers = _BUFFERS.__dict__.setdefault("buffers", {})
    key = (name, dtype, device)
    found = buffers.get(key)
    if found is None or found[0].numel() < numel:
        buf = torch.empty(max(numel, chunking.CHUNK_ELEMENTS), dtype=dtype, device=device)
        found = buffers[key] = (buf, {})
    buf, views = found
    view = views.get(numel)
    if view is None:  # kept: on a GPU a slice is host time each step (benchmarks/step_ops.py)
        view = views[numel] = buf[:numel]
    return view


def held_buffers() -> list[torch.Tensor]:
    """This thread's buffers (a CUDA graph keeps the memory its kernels use alive)."""
    return [buf for buf, _ in _BUFFERS.__dict__.get("buffers", {}).values()]


_POOL: ThreadPoolExecutor | None = None


def worker_threads() -> int:
    """Threads that draw noise chunks on the CPU ($EDGEZO_NOISE_THREADS, default: torch's)."""
    return int(os.environ.get("EDGEZO_NOISE_THREADS", torch.get_num_threads()))


def pool_threads(draws: bool) -> int:
    """The noise pool's threads that CPU work of this kind uses (parallel_map): none
    when it stays on the caller's thread. The planner prices a set of buffers for each."""
    n = worker_threads()
    return n if draws and n >= 2 else 0


def parallel_map(fn: Callable[[int], None], items: Iterable[int], device: torch.device,
                 draws: bool = True) -> None:
    """Run fn over chunk indices; items must touch disjoint memory.

    `draws`: fn draws from torch's generator, which is serial, so the chunks go to worker
    threads. Work that only reads and combines tensors (the table's slices) runs on the
    caller's thread, where each operation already uses torch's intra-op
    threads: in the pool, each worker's operations would start those threads as well, more
    threads than cores, which wait for each other (BENCHMARKS.md, "Table noise off the
    noise pool, on a CPU with native bf16").
    """
    global _POOL
    items = list(items)
    threads = pool_threads(draws)
    if device.type != "cpu" or not threads or len(items) < 2:
        for item in items:
            fn(item)
        return
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="edgezo-noise")
    futures = [_POOL.submit(fn, item) for item in items]
    try:
        for future in futures:
            future.result()
    except BaseException:
        # a Ctrl-C (or an error) here must not leave workers writing into tensors the
        # caller goes on to restore or read: stop what has not started, wait for the rest
        for future in futures:
            future.cancel()
        wait(futures)
        raise
