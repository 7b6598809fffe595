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
from rich.table import Table

from edgezo.config.options import DEFAULT_CHECKPOINT_EVERY, DEFAULT_KEEP, SECTION_OF
from edgezo.device.hardware import cpu_capability
from edgezo.device.profiles import GiB
from edgezo.errors import (
    CheckpointError,
    ConfigError,
    OutOfBudgetError,
    RunInterrupted,
    TrainingError,
)
from edgezo.memory.peak import peak_summary
from edgezo.run import folder as runs
from edgezo.run.interrupt import (
    CtrlC,
    after_ctrl_c,
    interrupted_before_training,
    stopped_line,
)
from edgezo.run.session import Session
from edgezo.run.snapshots import drop_best
from edgezo.zo.result import StepResult

MAX_NONFINITE_IN_A_ROW = 5
MAX_ZERO_ESTIMATES_IN_A_ROW = 10


def _gib(n: int | float | None) -> str:
    return "-" if n is None else f"{n / GiB:.2f} GiB"


def describe_device(session: Session) -> str:
    dtype = (f"Computing in {session.dtype_name}: {session.dtype_reason}. "
             f"CPU: {session.threads.reason}.")
    if session.emulated:
        return (f"No CUDA device: emulating profile {session.profile.name} on the CPU, "
                f"{cpu_capability()} (same plan and budget, "
                f"{_gib(session.profile.budget_bytes)}). {dtype}")
    where = cpu_capability() if session.device.type == "cpu" else str(session.device)
    return f"Running on {where} under profile {session.profile.name}. {dtype}"


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("step {task.completed}/{task.total}"), BarColumn(),
        TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} steps/s"),
        TextColumn("ETA"), TimeRemainingColumn(), TextColumn("mem {task.fields[mem]}"),
        console=console, transient=False,
    )


def _snapshot(session: Session, console: Console) -> bool:
    """Snapshot into the run folder; a failed write (a full disk, say) is reported and
    the run goes on: the previous snapshots are untouched (they are replaced only by a
    rename once the new one is complete)."""
    try:
        session.checkpoint(session.config.train.keep or DEFAULT_KEEP)
        return True
    except OSError as err:
        console.print(f"[yellow]warning:[/] snapshot at step {session.engine.step_index} "
                      f"failed ({err.strerror or err}); the previous snapshot is intact and the "
                      "seed log keeps every step")
        return False


class Diverged(TrainingError):
    """The run stopped making sense; `good_step`: the last step count whose weights were
    still sound (the run goes back there when it can)."""

    def __init__(self, message: str, good_step: int):
        super().__init__(message)
        self.good_step = good_step


class DivergenceWatch:
    """Looks at each step for a run that has gone wrong: non-finite losses in a row,
    weights that became non-finite, or estimates that collapsed to exactly zero step
    after step (saturated weights: the loss no longer moves whatever the direction)."""

    def __init__(self, session: Session):
        self.session = session
        self.streak_start: int | None = None  # first step of the current suspicious run
        self.nonfinite = self.zeros = 0
        # only the cross-entropy's estimates must move: an accuracy objective is often
        # flat, and FO steps have no projected gradient
        self.zeros_matter = (session.config.estimator.objective == "ce"
                             and not session.custom_objective)

    def see(self, r: StepResult) -> None:
        zero = self.zeros_matter and r.all_zero
        if not (r.skipped or zero):
            self.streak_start, self.nonfinite, self.zeros = None, 0, 0
            return
        if self.streak_start is None:
            self.streak_start = r.step
        self.nonfinite = self.nonfinite + 1 if r.skipped else 0
        self.zeros = self.zeros + 1 if zero else 0
        good = max(0, self.streak_start - 1)  # before the update that led here
        lr = self.session.config.optimizer.lr
        if not runs.weights_finite(self.session):
            raise Diverged(f"the weights became non-finite (found at step {r.step + 1}); "
                           f"lower --lr (now {lr:g})", good)
        if self.nonfinite >= MAX_NONFINITE_IN_A_ROW:
            raise TrainingError(
                f"the loss was not finite for {self.nonfinite} steps in a row (last at step "
                f"{r.step + 1}); lower --lr or --eps, or use --dtype fp32")
        if self.zeros >= MAX_ZERO_ESTIMATES_IN_A_ROW:
            raise Diverged(
                f"the last {self.zeros} estimates were exactly 0 (L(θ+εz) = L(θ−εz), loss "
                f"{r.loss:.4f}): the weights saturated, or ε is below the loss's rounding. "
                f"Lower --lr (now {lr:g}); if the loss never moved, raise --eps or use "
                "--dtype fp32", good)


def _train_loop(session: Session, console: Console, metrics, watch: DivergenceWatch,
                first: int, t0: float, ctrl_c: CtrlC) -> None:
    """The steps from `first` to the configured number, each logged, snapshotted and
    watched; periodic validation printed and logged. `t0`: when the run started (a
    row's wall_s counts from it, evaluations included: time to accuracy)."""
    t = session.config.train
    steps, output = t.steps, t.output
    every = t.checkpoint_every if t.checkpoint_every is not None else DEFAULT_CHECKPOINT_EVERY
    start, log_every = time.perf_counter(), max(1, steps // 20)
    keeps_best = t.keep_best and session.run_dir is not None
    best = runs.best_of(session.run_dir) if keeps_best else None
    with _progress(console) as progress:
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
                        kept = _kept_as_best(session, acc, progress.console)
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
                    _snapshot(session, console)  # applies the pending update first
                rate = (i + 1 - first) / (time.perf_counter() - start)
                progress.update(bar, advance=1, loss=f"{r.loss:.4f}", rate=f"{rate:.2f}",
                                mem=_gib(row["memory_bytes"]))
                if not console.is_terminal and ((i + 1) % log_every == 0 or i + 1 == steps):
                    console.print(f"step {i + 1}/{steps} loss {r.loss:.4f} {rate:.2f} "
                                  f"steps/s mem {_gib(row['memory_bytes'])}")
                watch.see(r)
            ctrl_c.stop_if_asked()


def _kept_as_best(session: Session, acc: float, console: Console) -> bool:
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


def describe_task(session: Session) -> str | None:
    """The task line of a run's header: which prompt it trains with matters as much as
    the optimizer (SST-2 on SmolLM2 starts at 0.79 test with one prompt, 0.52 with
    another), so a run says which it took."""
    task = session.task
    if task is None:
        return None
    task.split("train")  # the splits are made once, on first use; the run needs them
    info = task.split_info
    sizes = "/".join(str(info.get(k, "?")) for k in ("train", "validation", "test"))
    chosen = " (the task's default; --template to change)" \
        if session.config.data.template == "auto" else ""
    return f"Task {task.name}: template {task.template}{chosen}, train/validation/test " \
           f"{sizes} examples."


def _print_plan(session: Session, console: Console) -> None:
    console.print(describe_device(session))
    if session.lr_reason:
        console.print(session.lr_reason + ".")
    line = describe_task(session)
    if line:
        console.print(line)
    plan = session.plan
    console.print(f"Plan: predicted peak {peak_summary(plan)}, budget "
                  f"{_gib(plan.budget_bytes)}, "
                  f"{'pair mode (one doubled forward)' if session.pair else 'two forwards'} "
                  f"per step, {session.engine.blocks.numel() / 1e6:.1f}M trainable parameters.")
    if "fo_gradients" in plan.components:
        console.print(f"First-order part ({session.optimizer.name}"
                      f"{'' if session.optimizer.estimator == 'fo' else ', hybrid'}): "
                      f"gradients {_gib(plan.components['fo_gradients'])}, activations kept "
                      f"for the backward {_gib(plan.components['fo_activations'])}.")


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
    if session.rank != 0:  # data-parallel: rank 0 alone writes the run folder and talks
        output, console = None, Console(quiet=True)
    console = console or Console()
    _check_selection(session)
    first = session.engine.step_index  # > 0 when resumed
    before = _start(session, output, first, console)
    if first:
        console.print(f"Resumed at step {first} of {t.steps}.")
    stopped = _run_steps(session, console, output, first, t0)
    selected = (_keep_best(session, output, stopped, console)
                or _average_last(session, output, stopped, console))
    report = _final_report(session, before, t0, stopped, console)
    moved = selected is not None and (selected["by"] == "average"
                                      or selected["step"] != selected["last_step"])
    _write_run_folder(session, report, output, console, stopped, snapshot=not moved)
    # with a run folder, the session goes on from its last step (a later finetune() or
    # step() continues the run, as --resume would); the kept weights are its model.
    # Without one, an averaged session keeps the mean and refuses further steps.
    if moved:
        runs.rewind(session, selected["last_step"])
    if isinstance(stopped, KeyboardInterrupt):
        console.print(stopped_line(session, output))
        return report
    if stopped is not None:
        raise stopped  # after the model and report are safely written
    console.print(summary_table(report))
    return report


def _check_selection(session: Session) -> None:
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
                _snapshot(session, console)  # the start: what a diverged run goes back to
            best = runs.best_of(output)
            if best is not None and best["step"] > first:
                drop_best(output)  # another run's, or a path this one went back from
        _print_plan(session, console)
        return _accuracy_before(session, output, console)
    except KeyboardInterrupt:
        interrupted_before_training(session, output if fresh else None, first, console)
        raise RunInterrupted from None


def _set_train_options(session: Session, train: dict) -> None:
    other = [k for k in train if SECTION_OF.get(k) != "train"]
    if other:
        raise ConfigError(f"finetune() takes the train section's options; not {other}")
    if train:
        session.config = session.config.override(**train).validate()


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
        if output is not None and _snapshot(session, console):
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


def _keep_best(session: Session, output: Path | None, stopped, console: Console
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
        if not _snapshot(session, console) and not session.engine.replayable:
            console.print("[yellow]warning:[/] keeping the last step's weights instead of "
                          "the best: they could not be snapshotted, and this run's seed "
                          "log cannot rebuild them")
            return None
        try:
            runs.restore_best(session)
        except (CheckpointError, OSError) as err:
            runs.rewind(session, last)  # whatever restore_best had put in
            console.print(f"[yellow]warning:[/] keeping the last step's weights: the best "
                          f"snapshot could not be read ({err})")
            return None
        console.print(f"Keeping step {best['step']}'s weights, the best on validation "
                      f"({metric_name(session)} {best['validation_accuracy']:.4f}); --resume "
                      "goes on from step "
                      f"{last}.")
    session.selected = selected
    return selected


def _average_last(session: Session, output: Path | None, stopped, console: Console
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
        _snapshot(session, console)
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


def _after_divergence(session: Session, stop: Diverged, console: Console) -> TrainingError:
    """Go back to the last sound weights (snapshot + seed log) and say so."""
    if runs.rewind(session, stop.good_step):
        _snapshot(session, console)
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
            _snapshot(session, console)
        if t.save_model is not False:
            session.save(output / "model")
    (output / "report.json").write_text(json.dumps(report, indent=2))
    if isinstance(stopped, OutOfBudgetError):
        console.print(f"Resume with: edgezo finetune --resume {output} --steps {t.steps}")


def metric_name(session: Session) -> str:
    """How the task's score reads in a sentence: accuracy, F1 (written answers) or log
    likelihood (texts)."""
    return _metric_text({"metric": session.task.metric})


def _metric_text(report: dict) -> str:
    metric = report.get("metric") or "accuracy"
    return "F1" if metric == "f1" else metric.replace("_", " ")


def _acc(value: float | None) -> str:
    return "not evaluated" if value is None else f"{value:.4f}"


def _examples(report: dict, split: str) -> str:
    ev = report["evaluations"].get(split, {})
    return f" ({ev['examples']} of {ev['of']})" if ev.get("examples") != ev.get("of") else ""


def _kept(selected: dict) -> str:
    if selected["by"] == "average":
        return f"the mean of the last {selected['steps']} steps'"
    return f"step {selected['step']}'s, the best on validation"


def summary_table(report: dict) -> Table:
    table = Table(title="edgezo finetune", show_header=False)
    rows = [
        ("model", report["model"]), ("task", report["task"]),
        ("optimizer / scheme", f"{report['optimizer']} / {report['scheme']}"),
        ("profile", report["profile"] + (" (emulated on CPU)" if report["emulated_profile"]
                                         else "")),
        ("steps", str(report["steps"]) + (" (interrupted)" if report.get("interrupted") else "")),
        *([("weights kept", _kept(report["selected"]))] if report.get("selected") else []),
        (f"test {_metric_text(report)} before -> after",
         f"{_acc(report['accuracy_before'])} -> {report['test_accuracy']:.4f}"
         + _examples(report, "test")),
        (f"validation {_metric_text(report)}", f"{report['validation_accuracy']:.4f}"
         + _examples(report, "validation")),
        ("peak memory measured / predicted",
         f"{_gib(report['peak_memory_bytes'])} / {_gib(report['predicted_peak_memory_bytes'])}"),
        ("mean step time",
         "-" if report["step_time_s"] is None else f"{report['step_time_s']:.3f} s"),
        ("forward (+backward) passes per step",
         f"{report['forward_passes_per_step']}"
         + (f" (+{report['backward_passes_per_step']})"
            if report.get("backward_passes_per_step") else "")),
    ]
    if report.get("skipped_steps"):
        rows.append(("skipped (non-finite) steps", str(report["skipped_steps"])))
    if report.get("zero_estimates"):
        rows.append(("estimates exactly 0 (L+ = L-)",
                     f"{report['zero_estimates']} of {report['queries']} queries"))
    if report.get("clipped_estimates"):
        rows.append(("estimates clipped (--g-clip)",
                     f"{report['clipped_estimates']} of {report['queries']} queries"))
    rows.append(("time in evaluations", f"{report['eval_time_s']:.0f} s of "
                 f"{report['wall_time_s']:.0f} s"))
    for k, v in rows:
        table.add_row(k, v)
    return table


