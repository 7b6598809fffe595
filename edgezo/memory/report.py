"""`edgezo report RUN_DIR`: how a run's memory was spent, predicted against measured.

Reads the run's report.json and writes, next to it:

- memory.json: the plan's components, the measured peak per phase, the profile's
  budget and the ratio measured / predicted;
- memory.md: the same as Markdown tables;
- memory.png: predicted components beside the measured phase peaks, and memory over time
  with the budget drawn on it.

On CUDA the measured figures are the allocator's peaks, reset per phase: allocated (what
the plan predicts: live tensors) and reserved (allocated plus the blocks the caching
allocator keeps, what the per-process cap holds); on the CPU they are the sampled
resident memory above the pre-load baseline.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgezo.device.profiles import human_bytes
from edgezo.errors import ConfigError

MiB = 1024**2


def _load(run_dir: Path) -> dict:
    path = run_dir / "report.json"
    if not path.is_file():
        raise ConfigError(f"{run_dir} has no report.json: pass the --output folder of "
                          "`edgezo finetune`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON ({err.msg}); was the run cut off?") from None


def memory_summary(report: dict) -> dict:
    plan = report.get("plan") or {}
    predicted = plan.get("peak_bytes", report.get("predicted_peak_memory_bytes"))
    measured = report.get("peak_memory_bytes")
    return {
        "profile": report.get("profile"),
        "device": report.get("device"),
        "emulated_profile": report.get("emulated_profile"),
        "budget_bytes": plan.get("budget_bytes"),
        "predicted_components": plan.get("components", {}),
        "predicted_eval_components": plan.get("eval_components"),
        "predicted_peak_by_phase": plan.get("phases", {}),
        "predicted_peak_bytes": predicted,
        "runtime_overhead_bytes": plan.get("runtime_overhead_bytes", 0),
        "measured_peak_by_phase": report.get("peak_memory_by_phase", {}),
        "measured_reserved_peak_by_phase": report.get("reserved_peak_memory_by_phase") or {},
        "measured_peak_bytes": measured,
        "measured_over_predicted": (measured / predicted) if measured and predicted else None,
        "samples": report.get("memory_samples", []),
    }


def _markdown(s: dict) -> str:
    train, evals = s["predicted_components"], s["predicted_eval_components"] or {}
    lines = [f"# Memory: profile {s['profile']} on {s['device']}"
             + (" (emulated on the CPU)" if s["emulated_profile"] else ""), ""]
    if evals:
        lines += ["| predicted component | train step | eval |", "| --- | ---: | ---: |"]
        lines += [f"| {k.replace('_', ' ')} | {human_bytes(train.get(k, 0))} | "
                  f"{human_bytes(evals[k]) if k in evals else '-'} |"
                  for k in dict.fromkeys([*train, *evals])]
    else:
        lines += ["| predicted component | train step |", "| --- | ---: |"]
        lines += [f"| {k.replace('_', ' ')} | {human_bytes(v)} |" for k, v in train.items()]
    reserved = s["measured_reserved_peak_by_phase"]
    lines += [f"| **predicted peak** | **{human_bytes(s['predicted_peak_bytes'] or 0)}** |", "",
              "| phase | predicted | measured | measured / predicted |"
              + (" reserved (CUDA) |" if reserved else ""),
              "| --- | ---: | ---: | ---: |" + (" ---: |" if reserved else "")]
    planned = s["predicted_peak_by_phase"]
    for k, v in s["measured_peak_by_phase"].items():
        p = planned.get(k)
        lines.append(f"| {k} | {human_bytes(p) if p else '-'} | {human_bytes(v)} | "
                     f"{f'{v / p:.2f}' if p else '-'} |"
                     + (f" {human_bytes(reserved[k]) if k in reserved else '-'} |"
                        if reserved else ""))
    ratio = s["measured_over_predicted"]
    lines += ["", f"Measured peak (train and eval): {human_bytes(s['measured_peak_bytes'] or 0)}"
              + (f", {ratio:.2f}x the prediction" if ratio else "")
              + f"; budget {human_bytes(s['budget_bytes'] or 0)}."]
    return "\n".join(lines) + "\n"


def _plot(s: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    bottom = 0.0
    for name, size in s["predicted_components"].items():
        left.bar(["predicted"], [size / MiB], bottom=[bottom], label=name.replace("_", " "))
        bottom += size / MiB
    phases = s["measured_peak_by_phase"]
    left.bar([f"measured\n{k}" for k in phases], [v / MiB for v in phases.values()],
             color="grey")
    reserved = {k: v for k, v in s["measured_reserved_peak_by_phase"].items() if k in phases}
    if reserved:
        left.scatter([f"measured\n{k}" for k in reserved], [v / MiB for v in reserved.values()],
                     marker="_", s=900, linewidths=2, color="black", zorder=3,
                     label="reserved (CUDA allocator)")
    planned = {k: v for k, v in s["predicted_peak_by_phase"].items() if k in phases}
    if planned:
        left.scatter([f"measured\n{k}" for k in planned], [v / MiB for v in planned.values()],
                     marker="_", s=900, linewidths=2, color="green", zorder=3,
                     label="predicted, per phase")
    if s["budget_bytes"]:
        left.axhline(s["budget_bytes"] / MiB, color="red", linestyle="--", label="budget")
    left.set_ylabel("MiB")
    left.set_title("peak: predicted components vs measured phases")
    left.legend(fontsize=7)
    samples = s["samples"]
    if samples:
        right.plot([t for t, _, _ in samples], [v / MiB for _, _, v in samples], lw=1)
    if s["budget_bytes"]:
        right.axhline(s["budget_bytes"] / MiB, color="red", linestyle="--", label="budget")
    if s["predicted_peak_bytes"]:
        right.axhline(s["predicted_peak_bytes"] / MiB, color="green", linestyle=":",
                      label="predicted peak")
    right.set_xlabel("seconds")
    right.set_ylabel("MiB")
    right.set_title("memory over time")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_memory_report(run_dir: str | Path) -> dict[str, Path]:
    """Write memory.json, memory.md and memory.png into the run folder."""
    run_dir = Path(run_dir)
    summary = memory_summary(_load(run_dir))
    paths = {"json": run_dir / "memory.json", "markdown": run_dir / "memory.md",
             "plot": run_dir / "memory.png"}
    paths["json"].write_text(json.dumps(summary, indent=2))
    paths["markdown"].write_text(_markdown(summary))
    _plot(summary, paths["plot"])
    return paths
