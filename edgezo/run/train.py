"""The fine-tune recipe behind `edgezo finetune`: evaluate, train, evaluate, report.

Reads top to bottom (`finetune`): the device and plan lines, test accuracy before, the
training loop with a progress bar (step, loss, steps/s, ETA, memory) and periodic
validation, then validation and test accuracy after, the run folder's files and a
summary. Everything it does is set by the session's RunConfig (`train` section).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from edgezo.config.options import SECTION_OF
from edgezo.errors import ConfigError, OutOfBudgetError, RunInterrupted, TrainingError
from edgezo.run import folder as runs
from edgezo.run.display import gib, metric_name, print_plan, progress_bar, summary_table
from edgezo.run.interrupt import CtrlC, after_ctrl_c, interrupted_before_training, stopped_line
from edgezo.run.resume import rewind
from edgezo.run.selection import (
    check_selection,
    end_with_average,
    end_with_best,
    kept_as_best,
    snapshot_or_warn,
)
from edgezo.run.session import Session
from edgezo.run.snapshots import drop_best
from edgezo.run.watch import Diverged, DivergenceWatch
from edgezo.zo.result import StepResult


def _train_loop(session: Session, console: Console, metrics, watch: DivergenceWatch,
                first: int, t0: float, ctrl_c: CtrlC) -> None:
    """The steps from `first` to the configured number, each logged, snapshotted and
    watched; periodic validation printed and logged. `t0`: when the run started (a
    row's wall_s counts from it, evaluations included: time to accuracy)."""
    t = session.config.train
    steps, output = t.steps, t.output
    every = t.checkpoint_every  # resolved: the default where there is a run folder
    start, log_every = time.perf_counter(), max(1, steps // 20)
    keeps_best = t.keep_best and session.run_dir is not None
    best = runs.best_of(session.run_dir) if keeps_best else None
    with progress_bar(console) as progress:
        bar = progress.add_task("train", total=steps, loss="-", rate="-", mem="-",
                                completed=first)
        for i in range(first, steps):
            evaluates = bool(t.eval_every) and (i + 1) % t.eval_every == 0
            with ctrl_c.held():
                r = session.step()
                if evaluates:  # evaluation applies the step's update first: not torn
                    session.engine.flush()
            row = _metrics_row(session, r)
            if evaluates:  # a Ctrl-C here stops at once: the weights are a completed step's
                acc = row["validation_accuracy"] = evaluate(session, "validation",
                                                            progress.console)["score"]
                note = ""
                if keeps_best and (best is None or acc > best["validation_accuracy"]):
                    with ctrl_c.held():
                        kept = kept_as_best(session, acc, progress.console)
                    if kept:
                        best = {"step": i + 1, "validation_accuracy": acc}
                        note = " (the best so far: kept)"
                progress.console.print(f"step {i + 1}: validation {metric_name(session)} "
                                       f"{acc:.4f}{note}")
            row["wall_s"] = time.perf_counter() - t0  # evaluations included
            with ctrl_c.held():  # the step's row, snapshot and checks, whole
                if metrics is not None:
                    metrics.write(json.dumps(row) + "\n")
                    metrics.flush()
                if output is not None and every and (i + 1) % every == 0:
                    snapshot_or_warn(session, console)  # applies the pending update first
                rate = (i + 1 - first) / (time.perf_counter() - start)
                progress.update(bar, advance=1, loss=f"{r.loss:.4f}", rate=f"{rate:.2f}",
                                mem=gib(row["memory_bytes"]))
                if not console.is_terminal and ((i + 1) % log_every == 0 or i + 1 == steps):
                    console.print(f"step {i + 1}/{steps} loss {r.loss:.4f} {rate:.2f} "
                                  f"steps/s mem {gib(row['memory_bytes'])}")
                watch.see(r)
            ctrl_c.stop_if_asked()


def evaluate(session: Session, split: str, console: Console) -> dict:
    """One evaluation of the configured size (`eval_examples`), with a progress bar and
    ETA when it spans several batches (an 872-example test set takes minutes on a CPU)."""
    cap = session.config.train.eval_examples
    total = len(session.task.split(split)[:cap])
    if total <= 2 * session.eval_batch_size or not console.is_terminal:
        return session.evaluate(split, cap)
    with Progress(TextColumn(f"evaluating {split}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total} examples"), TextColumn("ETA"),
                  TimeRemainingColumn(), console=console, transient=True) as progress:
        bar = progress.add_task(split, total=total)
        return session.evaluate(split, cap, progress=lambda done, _: progress.update(
            bar, completed=done))


def _metrics_row(session: Session, r: StepResult) -> dict:
    row = {"step": r.step + 1, "loss": r.loss, "loss_plus": r.loss_plus,
           "loss_minus": r.loss_minus, "projected_grads": r.projected_grads,
           "seeds": r.seeds, "lr": r.lr, "time_s": r.time_s,
           "forward_passes": r.forward_passes, "skipped": r.skipped,
           "zero_estimates": r.zero_estimates, "memory_bytes": session.monitor.current()}
    if r.clipped:
        row["clipped"] = r.clipped
    if r.move:
        row["move"] = r.move
    return row


def _accuracy_before(session: Session, output: Path | None, console: Console
                     ) -> float | None:
    """The test score before training (kept in the run folder, so a resume reuses it);
    None when the config skips it."""
    before_file = output / "accuracy_before.json" if output is not None else None
    if before_file is not None and before_file.is_file():
        return json.loads(before_file.read_text())["accuracy"]
    if not session.config.train.eval_before:
        return None
    console.print("Evaluating the test set before training...")
    before = evaluate(session, "test", console)["score"]
    console.print(f"Test {metric_name(session)} before: {before:.4f}")
    if before_file is not None:
        before_file.write_text(json.dumps({"accuracy": before}))
    return before


def finetune(session: Session, steps: int | None = None, *, console: Console | None = None,
             **train) -> dict:
    """Run the fine-tune up to `steps` steps in all (default: the config's) and return the
    report dict (also written to the run folder). `train`: other options of the config's
    train section to change first (output, eval_every, ...). A session resumed from its
    folder continues where it stopped. A Ctrl-C during training returns the report
    (`interrupted` true, no final evaluation); one before the first step raises
    RunInterrupted (a KeyboardInterrupt), as there is no report to return."""
    t0 = time.perf_counter()
    _set_train_options(session, train if steps is None else {**train, "steps": steps})
    t = session.config.train
    output = Path(t.output) if t.output is not None else None
    if session.process_rank != 0:  # data-parallel: rank 0 alone writes the run folder and talks
        output, console = None, Console(quiet=True)
    console = console or Console()
    check_selection(session)
    first = session.engine.step_index  # > 0 when resumed
    before = _start(session, output, first, console)
    if first:
        console.print(f"Resumed at step {first} of {t.steps}.")
    stopped = _run_steps(session, console, output, first, t0)
    selected = (end_with_best(session, output, stopped, console)
                or end_with_average(session, output, stopped, console))
    report = _final_report(session, before, t0, stopped, console)
    moved = selected is not None and (selected["by"] == "average"
                                      or selected["step"] != selected["last_step"])
    _write_run_folder(session, report, output, console, stopped, snapshot=not moved)
    # with a run folder, the session goes on from its last step (a later finetune() or
    # step() continues the run, as --resume would); the kept weights are its model.
    # Without one, an averaged session keeps the mean and refuses further steps.
    if moved:
        rewind(session, selected["last_step"])
    if isinstance(stopped, KeyboardInterrupt):
        console.print(stopped_line(session, output))
        return report
    if stopped is not None:
        raise stopped  # after the model and report are safely written
    console.print(summary_table(report))
    return report


def _start(session: Session, output: Path | None, first: int, console: Console
           ) -> float | None:
    """Record into the run folder (its first snapshot when the run is new), print the
    plan and score the test set before training; returns that score. A Ctrl-C here
    stops before any step: RunInterrupted, with no stray folder."""
    fresh = output is not None and not output.exists()
    try:
        if output is not None:
            session.record(output)
            if first == 0:
                snapshot_or_warn(session, console)  # the start: what a diverged run goes back to
            best = runs.best_of(output)
            if best is not None and best["step"] > first:
                drop_best(output)  # another run's, or a path this one went back from
        print_plan(session, console)
        return _accuracy_before(session, output, console)
    except KeyboardInterrupt:
        interrupted_before_training(session, output if fresh else None, first, console)
        raise RunInterrupted from None


def _set_train_options(session: Session, train: dict) -> None:
    other = [k for k in train if SECTION_OF.get(k) != "train"]
    if other:
        raise ConfigError(f"finetune() takes the train section's options; not {other}")
    if train:
        session.config = session.config.override(**train).resolved(
            session.config.model.dtype).validate()


def _run_steps(session: Session, console: Console, output: Path | None, first: int,
               t0: float):
    """The loop, and how it ended: None, or the interruption or error that stopped it
    (the weights then are the last sound ones, snapshotted where there is a folder)."""
    metrics = None
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        # metrics.jsonl: appended on resume; rows of replayed steps are already in it
        metrics = open(output / "metrics.jsonl", "a" if first else "w")  # noqa: SIM115
    ctrl_c = CtrlC()
    try:
        with ctrl_c:
            _train_loop(session, console, metrics, DivergenceWatch(session), first, t0,
                        ctrl_c)
        return None
    except KeyboardInterrupt as stop:
        return after_ctrl_c(session, stop, ctrl_c.torn, console)
    except Diverged as stop:
        return _after_divergence(session, stop, console)
    except TrainingError as stop:
        if output is not None and snapshot_or_warn(session, console):
            console.print(f"Saved a snapshot at step {session.engine.step_index} (the skipped "
                          "steps changed no weight).")
        return stop
    except OutOfBudgetError as stop:
        console.print(f"Over budget after {len(session.history)} steps; saving the model "
                      "without the final evaluations.")
        return stop
    finally:
        if metrics is not None:
            metrics.close()


def _after_divergence(session: Session, stop: Diverged, console: Console) -> TrainingError:
    """Go back to the last sound weights (snapshot + seed log) and say so."""
    if rewind(session, stop.good_step):
        snapshot_or_warn(session, console)
        return TrainingError(f"{stop}. The run stopped and went back to step "
                             f"{stop.good_step}, before it diverged: the snapshot and the "
                             "saved model hold those weights")
    err = TrainingError(f"{stop}. The run stopped; its weights are not sound (no snapshot "
                        f"at or before step {stop.good_step} to go back to), so none were "
                        "saved")
    err.unsound = True
    return err


def _final_report(session: Session, before: float | None, t0: float, stopped,
                  console: Console) -> dict:
    """The report, after the final evaluations: its wall time counts them, as its
    evaluation time does."""
    # a run stopped by Ctrl-C is not evaluated: the user asked it to stop, and --resume
    # evaluates when the run ends
    results = ({split: evaluate(session, split, console) for split in ("validation", "test")}
               if stopped is None else {})
    report = session.report()
    if stopped is None:
        report["validation_accuracy"] = results["validation"]["score"]
        report["test_accuracy"] = results["test"]["score"]
    elif isinstance(stopped, KeyboardInterrupt):
        report["stopped"] = f"interrupted (Ctrl-C) after step {session.engine.step_index}"
    else:
        report["stopped"] = (f"over budget: {stopped}" if isinstance(stopped, OutOfBudgetError)
                             else str(stopped))
    report["accuracy_before"] = before
    report["interrupted"] = isinstance(stopped, KeyboardInterrupt)
    report["wall_time_s"] = time.perf_counter() - t0
    report["peak_memory_bytes"] = session.monitor.run_peak_bytes  # includes the final evals
    report["peak_memory_by_phase"] = dict(session.monitor.peaks)
    report["reserved_peak_memory_by_phase"] = dict(session.monitor.reserved_peaks) or None
    return report


def _write_run_folder(session: Session, report: dict, output: Path | None, console: Console,
                      stopped, snapshot: bool = True) -> None:
    """`snapshot`: False when the session holds other weights than the last step's (the
    best, or the average; the last ones are already snapshotted)."""
    if output is None:
        return
    t = session.config.train
    if not getattr(stopped, "unsound", False):
        if snapshot:
            snapshot_or_warn(session, console)
        if t.save_model is not False:
            session.save(output / "model")
    (output / "report.json").write_text(json.dumps(report, indent=2))
    if isinstance(stopped, OutOfBudgetError):
        console.print(f"Resume with: edgezo finetune --resume {output} --steps {t.steps}")


