"""What `edgezo finetune` prints: the run's header (device, learning rate, task, plan), its
progress bar, and the summary table of its report.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from edgezo.device.hardware import cpu_capability
from edgezo.device.profiles import GiB
from edgezo.memory.peak import peak_summary
from edgezo.run.session import Session


def gib(n: int | float | None) -> str:
    return "-" if n is None else f"{n / GiB:.2f} GiB"


def describe_device(session: Session) -> str:
    dtype = (f"Computing in {session.dtype_name}: {session.dtype_reason}. "
             f"CPU: {session.threads.reason}.")
    if session.emulated:
        return (f"No CUDA device: emulating profile {session.profile.name} on the CPU, "
                f"{cpu_capability()} (same plan and budget, "
                f"{gib(session.profile.budget_bytes)}). {dtype}")
    where = cpu_capability() if session.device.type == "cpu" else str(session.device)
    graphs = f" CUDA graphs {session.graphs}." if session.graphs else ""
    return f"Running on {where} under profile {session.profile.name}. {dtype}{graphs}"


def progress_bar(console: Console) -> Progress:
    return Progress(
        TextColumn("step {task.completed}/{task.total}"), BarColumn(),
        TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} steps/s"),
        TextColumn("ETA"), TimeRemainingColumn(), TextColumn("mem {task.fields[mem]}"),
        console=console, transient=False,
    )


def describe_task(session: Session) -> str | None:
    """The task line of a run's header: which prompt it trains with matters as much as
    the optimizer, as the prompt sets the zero-shot accuracy the run starts from
    (BENCHMARKS.md, "SST-2's prompt, chosen on validation"), so a run says which it took."""
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


def print_plan(session: Session, console: Console) -> None:
    console.print(describe_device(session))
    if session.lr_reason:
        console.print(session.lr_reason + ".")
    line = describe_task(session)
    if line:
        console.print(line)
    plan = session.plan
    console.print(f"Plan: predicted peak {peak_summary(plan)}, budget "
                  f"{gib(plan.budget_bytes)}, "
                  f"{'pair mode (one doubled forward)' if session.pair else 'two forwards'} "
                  f"per step, {session.engine.blocks.numel() / 1e6:.1f}M trainable parameters.")
    if "fo_gradients" in plan.components:
        console.print(f"First-order part ({session.optimizer.name}"
                      f"{'' if session.optimizer.method.backprops else ', hybrid'}): "
                      f"gradients {gib(plan.components['fo_gradients'])}, activations kept "
                      f"for the backward {gib(plan.components['fo_activations'])}.")


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
         f"{gib(report['peak_memory_bytes'])} / {gib(report['predicted_peak_memory_bytes'])}"),
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
