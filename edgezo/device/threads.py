"""How many CPU threads a run computes with: the CPUs this process may use, less those
that other processes keep busy when the run starts.

A step's operations split their work across OpenMP threads that wait for each other at
the end of every operation, so a thread that shares its core with another busy process
holds all the others up, and a step slows many times over: fewer threads, each on a
core of its own, finish first (BENCHMARKS.md, "A shared CPU"). A runtime embedded in a
device's apps shares its CPU by definition, so the count is chosen from the machine's
state, not from its core count:

    CPUs usable  = the affinity mask's CPUs, capped by the cgroup's CPU quota
    CPUs taken   = other processes' busy time on those CPUs, sampled over 0.2 s (this
                   process's own time taken out), rounded: a core others keep busy half
                   the time or more is left to them, as from there the thread on it
                   finishes its share of an operation later than one thread would finish
                   the whole
    threads      = usable - taken, at least 1 and at most torch's own count

`--threads N` (or OMP_NUM_THREADS) overrides the choice.

Idle OpenMP threads spin before they sleep, on a core another process may need: 3 ms
after every operation in GNU OpenMP (torch's), which makes threads that share their cores
wait for each other far longer. Sleeping at once (OMP_WAIT_POLICY=PASSIVE) fixes that but
costs a wake-up on every operation, and a step is many short operations, so on an idle
machine the wake-ups can cost more than a second thread saves (BENCHMARKS.md, "A shared
CPU"). So edgezo's import (before torch's) shortens the spin instead
(`limit_openmp_spin`): long enough to bridge the gap between one operation and the next
within a step, short enough that a thread leaves its core soon after.

torch.set_num_threads is process-wide: a Session sets it for the whole process, and the
noise pool (edgezo.zo.workers) takes its size from it when it starts.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path

# Read by the OpenMP runtime once, when it loads (torch's import). GNU OpenMP spins
# GOMP_SPINCOUNT times before it sleeps: about 0.1 ms by its own estimate of 100000 spins
# a millisecond, where its default is 300000; Intel's OpenMP counts milliseconds
# (KMP_BLOCKTIME, default 200), and 1 is its shortest spin short of none.
OPENMP_SPIN = {"GOMP_SPINCOUNT": "10000", "KMP_BLOCKTIME": "1"}
SAMPLE_S = 0.2  # long enough for /proc/stat's 10 ms ticks, short beside a model load
RESAMPLE_S = 60.0  # Sessions built within this share one sample


def limit_openmp_spin(environ: MutableMapping[str, str] = os.environ) -> None:
    """Make OpenMP's idle threads spin briefly before they sleep, unless the user chose a
    wait policy or spin (OMP_WAIT_POLICY=PASSIVE is the politest: no spin). It must run
    before the OpenMP runtime loads, so edgezo/__init__.py calls it; a program that
    imports torch before edgezo keeps OpenMP's default."""
    if "OMP_WAIT_POLICY" in environ:  # it sets both runtimes' spin; theirs would override
        return
    for name, value in OPENMP_SPIN.items():
        environ.setdefault(name, value)


@dataclass(frozen=True)
class ThreadChoice:
    """The compute threads of a run and why (printed in its header, in report.json)."""

    threads: int
    reason: str

    def to_dict(self) -> dict:
        return {"threads": self.threads, "why": self.reason}


def choose_threads(requested: int | None, cpus: int, quota: float | None,
                   busy: float | None, ceiling: int) -> ThreadChoice:
    """The thread count from the machine's state: `cpus` the process may run on, the
    cgroup's `quota` in CPUs (None: none), the CPUs other processes keep `busy` (None: not
    measured), and torch's own count as the `ceiling`; `requested` (--threads) wins."""
    if requested is not None:
        return ThreadChoice(requested, f"{_count(requested)}, as asked (--threads)")
    limit, why = cpus, [f"{_count(cpus, 'CPU')} allowed"]
    if quota is not None and math.floor(quota) < cpus:
        limit = math.floor(quota)
        why.append(f"a cgroup quota of {quota:g} CPUs")
    if busy is None:
        why.append("their load unknown")
    else:
        limit = min(limit, cpus - math.floor(busy + 0.5))
        why.append(f"{busy:.1f} busy with other processes")
    if ceiling < limit:
        why.append(f"torch's own count {ceiling}")
    threads = max(1, min(limit, ceiling))
    return ThreadChoice(threads, f"{_count(threads)} ({', '.join(why)}; --threads sets it)")


def _count(n: int, what: str = "compute thread") -> str:
    return f"{n} {what}{'s' if n != 1 else ''}"


# -- the machine's state ----------------------------------------------------------------
def allowed_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity mask; all of them where the OS has
    no such mask)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def cgroup_quota(root: Path = Path("/sys/fs/cgroup"),
                 own: Path = Path("/proc/self/cgroup")) -> float | None:
    """The CPUs the process's cgroups let it use (v2 cpu.max of its cgroup and those
    above it, else v1's cfs quota), None where none is set: a container limited to 2
    CPUs still sees every CPU of its host."""
    try:
        path = next(line[3:] for line in own.read_text().splitlines()
                    if line.startswith("0::"))
    except (OSError, StopIteration):
        path = "/"
    folder, quotas = root / path.strip("/"), []
    for where in (folder, *folder.parents):
        try:
            quota, period = (where / "cpu.max").read_text().split()[:2]
            if quota != "max":
                quotas.append(int(quota) / int(period))
        except (OSError, ValueError):
            pass
        if where == root:
            break
    if quotas:
        return min(quotas)
    for v1 in ("cpu", "cpu,cpuacct"):
        try:
            quota = int((root / v1 / "cpu.cfs_quota_us").read_text())
            period = int((root / v1 / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if quota <= 0 else quota / period
    return None


def _busy_ticks(cpus: list[int], stat: Path) -> tuple[int, int] | None:
    """(busy, total) clock ticks of the given CPUs since boot, from /proc/stat's cpuN
    lines; steal time counts as busy (another guest had the core)."""
    try:
        lines = stat.read_text().splitlines()
    except OSError:
        return None
    wanted, busy, total = {f"cpu{c}" for c in cpus}, 0, 0
    for line in lines:
        name, *ticks = line.split()
        if name in wanted:
            values = [int(t) for t in ticks[:8]]  # guest time is inside user already
            idle = values[3] + values[4]  # idle, iowait
            busy += sum(values) - idle
            total += sum(values)
    return (busy, total) if total else None


def busy_cpus(cpus: list[int], seconds: float = SAMPLE_S,
              stat: Path = Path("/proc/stat")) -> float | None:
    """How many of `cpus` other processes keep busy now: the CPUs' busy time over a short
    sample, less this process's own. The 1-minute load average (the fallback where there
    is no /proc/stat) lags, and counts this process's own start-up, so one is taken off."""
    before, own, start = _busy_ticks(cpus, stat), time.process_time(), time.monotonic()
    if before is None:
        if not hasattr(os, "getloadavg"):
            return None
        return max(0.0, os.getloadavg()[0] - 1.0)
    time.sleep(seconds)
    after = _busy_ticks(cpus, stat)
    if after is None or after[1] <= before[1]:
        return None
    share = (after[0] - before[0]) / (after[1] - before[1])  # of the CPUs' time
    mine = (time.process_time() - own) / max(time.monotonic() - start, 1e-3)
    return max(0.0, share * len(cpus) - mine)


_sample: tuple[float, float | None] | None = None  # (when, busy CPUs)
_TORCH: dict[str, int] = {}  # torch's count before edgezo set one, and the one it set


def _busy_now(cpus: list[int]) -> float | None:
    """busy_cpus, sampled once a minute at most: a process building several Sessions
    (an app, a test suite) does not wait for a sample each time."""
    global _sample
    if _sample is None or time.monotonic() - _sample[0] >= RESAMPLE_S:
        _sample = (time.monotonic(), busy_cpus(cpus))
    return _sample[1]


def set_compute_threads(requested: int | None, on_cpu: bool) -> ThreadChoice:
    """Choose the run's compute threads and set torch's to them. On a GPU the CPU only
    feeds it: torch's count stays unless --threads is given."""
    import torch

    now = torch.get_num_threads()
    if now != _TORCH.get("set"):  # not edgezo's own choice: the user's, or torch's default
        _TORCH["ceiling"] = now
    ceiling, omp = _TORCH["ceiling"], os.environ.get("OMP_NUM_THREADS")
    if requested is None and not on_cpu:
        choice = ThreadChoice(now, f"{_count(now)}, torch's default (the GPU computes)")
    elif requested is None and omp:
        choice = ThreadChoice(ceiling, f"{_count(ceiling)}, as OMP_NUM_THREADS={omp} sets")
    else:
        cpus = allowed_cpus()
        busy = _busy_now(cpus) if requested is None else None
        choice = choose_threads(requested, len(cpus), cgroup_quota(), busy, ceiling)
    torch.set_num_threads(choice.threads)
    _TORCH["set"] = choice.threads
    return choice
