"""The C heap under torch's CPU tensors: hand freed memory back to the OS.

glibc keeps freed blocks resident until a trim, which makes a CPU run's resident memory
overstate what it uses. These two controls are all edgezo needs of it; they sit apart
from `memory/` because the engine and the session call them too.
"""

from __future__ import annotations

import contextlib
import ctypes


def release_freed_memory() -> None:
    """Hand memory that glibc's malloc holds but nobody uses back to the OS (Linux only).

    After loading (a GGUF conversion, say) the heap keeps freed blocks resident; without
    this, a CPU run's resident memory overstates what it uses by that much.
    """
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
STRICT_MMAP_BYTES = 256 << 10


def _mallopt(param: int, value: int) -> bool:
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(param, value))
    except (OSError, AttributeError):  # not glibc
        return False


def strict_heap() -> bool:
    """Make glibc hand every allocation of 256 KiB or more straight back to the OS on free.

    By default glibc raises its mmap threshold to the largest block freed so far (up to
    32 MiB), after which activation-sized tensors come from the heap, and the memory they
    leave when freed stays resident until a trim. A CPU run then measures above its plan:
    a width-1024 Llama's evaluation after training read 1.2-1.9x its plan.

    Why 256 KiB and not more: a request of any size is served from a free heap chunk that
    fits before glibc considers mmap, and the small tensors a backward saves (SmolLM2's
    keys and values at batch 16 are 384 KiB each) coalesce into such chunks when the graph
    is freed. With a 1 MiB threshold, one LoRA backward left 71 MiB of them below a live
    allocation at the top of the heap; the next evaluation's tensors were carved from
    those chunks, page-faulting them back in, and read 56 MiB above the evaluation's
    start against 30 MiB without the backward. With 256 KiB: 20-29 MiB.

    A ZO forward's own sub-1 MiB tensors do the same on a smaller scale: at 1 MiB three
    LoRA evaluations of a width-1024 Llama read 1.10-1.11x their plan, at 256 KiB
    1.05-1.06x.

    The cost is page faults on every large allocation: on SmolLM2 (one thread) a ZO step
    took 2.68-2.73 s against 1.92-1.95 s with glibc's default (2.17 s at 1 MiB), and
    evaluating 128 examples 5.2-5.6 s against 3.2 s (BENCHMARKS.md). Returns False where
    the C library is not glibc.
    """
    return _mallopt(M_MMAP_THRESHOLD, STRICT_MMAP_BYTES)
