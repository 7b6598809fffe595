"""The fine-tune recipe behind `edgezo finetune`: evaluate, train, evaluate, report.

Reads top to bottom: test accuracy before, `steps` ZO steps with a progress bar (step,
loss, steps/s, ETA, memory) and optional validation evals, then validation and test
accuracy after, and a summary. With an output folder it writes metrics.jsonl (one row
per step, flushed as it goes), report.json and the fine-tuned model.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from edgezo.errors import OutOfBudgetError, TrainingError
from edgezo.profiles import GiB
from edgezo.session import Session

MAX_NONFINITE_IN_A_ROW = 5


def _gib(n: int | float | None) -> str:
    return "-" if n is None else f"{n / GiB:.2f} GiB"


def describe_device(session: Session) -> str:
    if session.emulated:
        return (f"No CUDA device: emulating profile {session.profile.name} on the CPU "
                f"(same plan and budget, {_gib(session.profile.budget_bytes)}; compute in "
                f"{session.dtype_name}).")
    return f"Running on {session.device} under profile {session.profile.name}."


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("step {task.completed}/{task.total}"), BarColumn(),
        TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} steps/s"),
        TextColumn("ETA"), TimeRemainingColumn(), TextColumn("mem {task.fields[mem]}"),
        console=console, transient=False,
    )


def _snapshot(session: Session, keep: int, console: Console) -> bool:
    """Snapshot into the run folder; a failed write (a full disk, say) is reported and
    the run goes on: the previous snapshots are untouched (they are replaced only by a
    rename once the new one is complete)."""
    try:
        session.checkpoint(keep)
        return True
    except OSError as err:
        console.print(f"[yellow]warning:[/] snapshot at step {session.engine.step_index} "
                      f"failed ({err.strerror or err}); the previous snapshot is intact and the "
                      "seed log keeps every step")
        return False


def finetune(session: Session, steps: int, *, eval_every: int = 0, output: Path | None = None,
             save_model: bool = True, console: Console | None = None,
             checkpoint_every: int = 100, keep: int = 3) -> dict:
    """Run the fine-tune up to `steps` steps in all and return the report dict (also
    written to output/). A session resumed from `output` continues where it stopped."""
    if session.rank != 0:  # data-parallel: rank 0 alone writes the run folder and talks
        output, console = None, Console(quiet=True)
    console = console or Console()
    if output is not None:
        session.record(output)
    console.print(describe_device(session))
    plan = session.plan
    console.print(f"Plan: predicted peak {_gib(plan.peak_bytes)} of "
                  f"{_gib(plan.budget_bytes)} budget, "
                  f"{'pair mode (one doubled forward)' if session.pair else 'two forwards'} "
                  f"per step, {session.engine.blocks.numel() / 1e6:.1f}M trainable parameters.")
    if "fo_gradients" in plan.components:
        console.print(f"First-order part ({session.optimizer.name}"
                      f"{'' if session.optimizer.estimator == 'fo' else ', hybrid'}): "
                      f"gradients {_gib(plan.components['fo_gradients'])}, activations kept "
                      f"for the backward {_gib(plan.components['fo_activations'])}.")
    first = session.engine.step_index  # > 0 when resumed
    before_file = output / "accuracy_before.json" if output is not None else None
    if before_file is not None and before_file.is_file():
        before = json.loads(before_file.read_text())["accuracy"]
    else:
        console.print("Evaluating the test set before training...")
        before = session.evaluate("test")["accuracy"]
        if before_file is not None:
            before_file.write_text(json.dumps({"accuracy": before}))
    console.print(f"Test accuracy before: {before:.4f}")
    if first:
        console.print(f"Resumed at step {first} of {steps}.")

    metrics = None
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        # metrics.jsonl: appended on resume; rows of replayed steps are already in it
        metrics = open(output / "metrics.jsonl", "a" if first else "w")  # noqa: SIM115
    interrupted, nonfinite_streak = False, 0
    over_budget: OutOfBudgetError | None = None
    start = time.perf_counter()
    log_every = max(1, steps // 20)
    try:
        with _progress(console) as progress:
            bar = progress.add_task("train", total=steps, loss="-", rate="-", mem="-",
                                    completed=first)
            for i in range(first, steps):
                r = session.step()
                nonfinite_streak = nonfinite_streak + 1 if r.skipped else 0
                row = {"step": r.step + 1, "loss": r.loss, "loss_plus": r.loss_plus,
                       "loss_minus": r.loss_minus, "projected_grads": r.projected_grads,
                       "seeds": r.seeds, "lr": r.lr, "time_s": r.time_s,
                       "forward_passes": r.forward_passes, "skipped": r.skipped,
                       "memory_bytes": session.monitor.current()}
                if r.move:
                    row["move"] = r.move
                if eval_every and (i + 1) % eval_every == 0:
                    row["validation_accuracy"] = session.evaluate("validation")["accuracy"]
                if metrics is not None:
                    metrics.write(json.dumps(row) + "\n")
                    metrics.flush()
                if output is not None and checkpoint_every and (i + 1) % checkpoint_every == 0:
                    _snapshot(session, keep, console)
                rate = (i + 1 - first) / (time.perf_counter() - start)
                progress.update(bar, advance=1, loss=f"{r.loss:.4f}", rate=f"{rate:.2f}",
                                mem=_gib(row["memory_bytes"]))
                if not console.is_terminal and ((i + 1) % log_every == 0 or i + 1 == steps):
                    console.print(f"step {i + 1}/{steps} loss {r.loss:.4f} {rate:.2f} steps/s "
                                  f"mem {_gib(row['memory_bytes'])}")
                if nonfinite_streak >= MAX_NONFINITE_IN_A_ROW:
                    raise TrainingError(
                        f"the loss was not finite for {nonfinite_streak} steps in a row (last "
                        f"at step {r.step + 1}); lower --lr or --eps, or use --dtype fp32")
    except KeyboardInterrupt:
        interrupted = True
        console.print(f"Interrupted at step {session.engine.step_index}; evaluating and saving.")
    except TrainingError:
        if output is not None and _snapshot(session, keep, console):
            console.print(f"Saved a snapshot at step {session.engine.step_index} (the skipped "
                          "steps changed no weight).")
        raise
    except OutOfBudgetError as err:
        over_budget = err
        console.print(f"Over budget after {len(session.history)} steps; saving the model "
                      "without the final evaluations.")
    finally:
        if metrics is not None:
            metrics.close()

    report = session.report()
    if over_budget is None:
        report["validation_accuracy"] = session.evaluate("validation")["accuracy"]
        report["test_accuracy"] = session.evaluate("test")["accuracy"]
    else:
        report["stopped"] = f"over budget: {over_budget}"
    report["accuracy_before"] = before
    report["interrupted"] = interrupted
    report["wall_time_s"] = time.perf_counter() - start
    report["peak_memory_bytes"] = session.monitor.run_peak_bytes  # includes the final evals
    report["peak_memory_by_phase"] = dict(session.monitor.peaks)
    report["reserved_peak_memory_by_phase"] = dict(session.monitor.reserved_peaks) or None
    if output is not None:
        _snapshot(session, keep, console)
        if save_model:
            session.save(output / "model")
        (output / "report.json").write_text(json.dumps(report, indent=2))
        if interrupted or over_budget is not None:
            console.print(f"Resume with: edgezo finetune --resume {output} --steps {steps}")
    if over_budget is not None:
        raise over_budget  # after the model and report are safely written
    console.print(summary_table(report))
    return report


def summary_table(report: dict) -> Table:
    table = Table(title="edgezo finetune", show_header=False)
    rows = [
        ("model", report["model"]), ("task", report["task"]),
        ("optimizer / scheme", f"{report['optimizer']} / {report['scheme']}"),
        ("profile", report["profile"] + (" (emulated on CPU)" if report["emulated_profile"]
                                         else "")),
        ("steps", str(report["steps"]) + (" (interrupted)" if report.get("interrupted") else "")),
        ("test accuracy before -> after",
         f"{report['accuracy_before']:.4f} -> {report['test_accuracy']:.4f}"),
        ("validation accuracy", f"{report['validation_accuracy']:.4f}"),
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
    for k, v in rows:
        table.add_row(k, v)
    return table
