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
    leave when freed stays resident until a trim. A CPU run then measures above its plan,
    which counts tensors, not the heap's free space.

    Why 256 KiB and not more: a request of any size is served from a free heap chunk that
    fits before glibc considers mmap, and the small tensors a backward saves (SmolLM2's
    keys and values at batch 16 are 384 KiB each) coalesce into such chunks when the graph
    is freed. Below a live allocation at the top of the heap those chunks cannot be
    returned; the next evaluation's tensors are carved from them, page-faulting them back
    in, and the evaluation reads above its plan. A threshold under those tensors' size
    maps them instead, so their memory goes back to the OS on free. A ZO forward's own
    tensors under a higher threshold do the same on a smaller scale.

    The cost is a page fault on every large allocation, so steps and evaluations run
    slower than with glibc's default (BENCHMARKS.md, "Planner accuracy"). Returns False
    where the C library is not glibc.
    """
    return _mallopt(M_MMAP_THRESHOLD, STRICT_MMAP_BYTES)
