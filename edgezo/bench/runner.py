"""Run a suite's runs (a shard of them), storing each as it finishes."""

from __future__ import annotations

import functools
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from edgezo.bench.store import Store
from edgezo.bench.suite import Run, Suite
from edgezo.errors import EdgezoError
from edgezo.models.tiny import save_tiny
from edgezo.run.session import Session
from edgezo.version import __version__


@functools.cache
def code_version() -> str:
    """edgezo's version and, in a git checkout, the commit (with '+dirty' for local edits).

    Read once per process, when the first run imports the code: a suite runs the modules
    it imported then, whatever the working tree holds by its later runs."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here,
                                capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return __version__
    return f"{__version__}+{commit}{'-dirty' if dirty.strip() else ''}" if commit else __version__


def bench_model(spec: str | None) -> str | None:
    """`tiny:<family>`: the test suite's tiny random model, written once to the cache."""
    if not spec or not spec.startswith("tiny:"):
        return spec
    family = spec.split(":", 1)[1]
    cache = Path(os.environ.get("EDGEZO_CACHE", Path.home() / ".cache" / "edgezo"))
    folder = cache / "tiny" / family
    if not (folder / "config.json").is_file():
        save_tiny(folder, family)
    return str(folder)


def shard_runs(runs: list[Run], shard: tuple[int, int]) -> list[Run]:
    i, n = shard
    if not 0 <= i < n:
        raise EdgezoError(f"--shard must be i/n with 0 <= i < n, got {i}/{n}")
    return [r for k, r in enumerate(runs) if k % n == i]


def execute(run: Run, suite: str, data_dir: str | None = None) -> dict:
    """One run: train, evaluate validation and test, and the row to store."""
    kw = run.session_kwargs
    model = bench_model(kw.pop("model", None))
    steps = int(run.settings.get("steps", 100))
    n_eval = run.settings.get("eval_examples")
    row = {"key": run.key, "suite": suite, "grp": run.group, "cell": run.cell,
           "task": run.settings["task"], "model": run.settings.get("model") or "smollm2",
           "optimizer": run.settings["optimizer"], "scheme": run.settings["scheme"],
           "lr": run.settings["lr"], "eps": run.settings.get("eps"), "steps": steps,
           "settings": run.settings, "code_version": code_version(),
           "host": platform.node(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        s = Session(model, data_dir=data_dir, **kw)
    except EdgezoError as err:  # a setting this model or task cannot take: recorded
        return {**row, "status": "failed", "error": str(err)}
    try:
        row["val_before"] = s.evaluate("validation", n_eval)["score"]
        losses = [s.step().loss for _ in range(steps)]
        val = s.evaluate("validation", n_eval)
        test = s.evaluate("test", n_eval)
        report = s.report()
        times = [r.time_s for r in s.history[1:]] or [r.time_s for r in s.history]
        row.update(
            status="ok", val_accuracy=val["score"], test_accuracy=test["score"],
            peak_bytes=report["peak_memory_bytes"],
            predicted_bytes=report["predicted_peak_memory_bytes"],
            step_s=statistics.mean(times) if times else None,
            forward_passes=report["forward_passes_per_step"],
            backward_passes=report["backward_passes_per_step"],
            trainable_params=report["trainable_parameters"], losses=losses,
            report={k: v for k, v in report.items() if k not in ("memory_samples",)})
    except EdgezoError as err:
        row.update(status="failed", error=str(err))
    finally:
        s.close()
    row["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    return row


def run_suite(suite: Suite, store: Store, *, shard: tuple[int, int] = (0, 1),
              data_dir: str | None = None, max_runs: int | None = None,
              on_run: Callable[[int, int, dict], None] | None = None) -> tuple[int, int]:
    """Run this shard's runs that the store lacks; returns (ran now, already stored)."""
    runs = shard_runs(suite.runs(), shard)
    done = store.done()
    todo = [r for r in runs if (r.key, r.group) not in done]
    if max_runs is not None:
        todo = todo[:max_runs]
    for k, run in enumerate(todo):
        row = execute(run, suite.name, data_dir)
        store.add(row)
        if on_run is not None:
            on_run(k + 1, len(todo), row)
    return len(todo), len(runs) - len([r for r in runs if (r.key, r.group) not in done])
