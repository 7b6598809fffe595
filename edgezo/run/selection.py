"""The weights a run ends with, when not its last step's: the best on validation
(--keep-best) or the mean of the last steps' weights, rebuilt from the seed log
(--average-last). The last step's weights stay in the snapshots either way.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from edgezo.errors import CheckpointError, ConfigError
from edgezo.run import folder as runs
from edgezo.run.display import metric_name
from edgezo.run.resume import rewind
from edgezo.run.session import Session


def snapshot_or_warn(session: Session, console: Console) -> bool:
    """Snapshot into the run folder; a failed write (a full disk, say) is reported and
    the run goes on: the previous snapshots are untouched (they are replaced only by a
    rename once the new one is complete)."""
    try:
        session.checkpoint()
        return True
    except OSError as err:
        console.print(f"[yellow]warning:[/] snapshot at step {session.engine.step_index} "
                      f"failed ({err.strerror or err}); the previous snapshot is intact and the "
                      "seed log keeps every step")
        return False


def kept_as_best(session: Session, acc: float, console: Console) -> bool:
    """Snapshot the weights as the run's best; False (and a warning) when they are not
    finite (a diverging step scores like the class prior) or the write failed."""
    if not runs.weights_finite(session):
        return False
    try:
        runs.checkpoint_best(session, acc)
        return True
    except OSError as err:
        console.print(f"[yellow]warning:[/] could not keep step {session.engine.step_index} "
                      f"as the best ({err.strerror or err}); the run goes on")
        return False


def check_selection(session: Session) -> None:
    """Refuse --keep-best and --average-last where they cannot act (checked again here:
    a Session may get its run folder only from finetune())."""
    t = session.config.train
    if t.keep_best and t.output is None:
        raise ConfigError("--keep-best keeps the best weights in the run folder: add "
                          "--output DIR (finetune(output=...))")
    if t.keep_best and session.world > 1:
        raise ConfigError("--keep-best is single-process for now (the other ranks cannot "
                          "read rank 0's best snapshot): drop it, or run one process")
    if t.average_last:
        if (why := session.engine.averaging_problem()) is not None:
            raise ConfigError(f"--average-last cannot average this run's weights: {why}")
        if session.world > 1:
            raise ConfigError("--average-last is single-process for now: drop it, or run "
                              "one process")


def end_with_best(session: Session, output: Path | None, stopped, console: Console
               ) -> dict | None:
    """With --keep-best, go back to the weights that scored best on validation, so the
    final evaluations and the saved model are theirs. The last step's weights are
    snapshotted first: --resume goes on from them. None: nothing selected (off, no run
    folder, no validation yet, or a run that stopped unsound or over budget)."""
    if not session.config.train.keep_best or output is None or stopped is not None:
        return None
    best = runs.best_of(output)
    if best is None:
        return None
    last = session.engine.step_index
    selected = {"by": "validation", "step": best["step"],
                "validation_accuracy": best["validation_accuracy"], "last_step": last}
    if best["step"] != last:
        if not snapshot_or_warn(session, console) and not session.engine.replayable:
            console.print("[yellow]warning:[/] keeping the last step's weights instead of "
                          "the best: they could not be snapshotted, and this run's seed "
                          "log cannot rebuild them")
            return None
        try:
            runs.restore_best(session)
        except (CheckpointError, OSError) as err:
            rewind(session, last)  # whatever restore_best had put in
            console.print(f"[yellow]warning:[/] keeping the last step's weights: the best "
                          f"snapshot could not be read ({err})")
            return None
        console.print(f"Keeping step {best['step']}'s weights, the best on validation "
                      f"({metric_name(session)} {best['validation_accuracy']:.4f}); --resume "
                      "goes on from step "
                      f"{last}.")
    session.selected = selected
    return selected


def end_with_average(session: Session, output: Path | None, stopped, console: Console
                  ) -> dict | None:
    """With --average-last N, move to the mean of the weights after each of the last N
    steps, so the final evaluations and the saved model are theirs. The last step's
    weights are snapshotted first: --resume goes on from them. None: off, or a run that
    stopped unsound or over budget."""
    n = session.config.train.average_last
    if not n or stopped is not None or session.engine.step_index == 0:
        return None
    last = session.engine.step_index
    if output is not None:
        snapshot_or_warn(session, console)
    start = time.perf_counter()
    try:
        count = session.average_last(n)
    except ConfigError as err:  # a seed log that cannot rebuild the steps: keep the last
        console.print(f"[yellow]warning:[/] keeping the last step's weights: {err}")
        return None
    console.print(f"Averaged the weights after each of steps {last - count + 1}-{last} "
                  f"({time.perf_counter() - start:.1f} s)"
                  + (f"; --resume goes on from step {last}." if output is not None else "."))
    return session.selected
