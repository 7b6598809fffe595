"""Tables and plots of a suite's stored runs, in ZO-Bench's layout.

Selection: within each cell (task, model, optimizer, scheme[, study variant]) the grid
point with the best *validation* accuracy is selected (ties: the first in grid order);
only its test accuracy is reported. Test accuracy never chooses anything.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgezo.tasks.make import TASKS

MiB = 1024**2


def select(rows: list[dict]) -> dict[tuple[str, str], dict]:
    """(group, cell) -> the stored run selected on validation accuracy."""
    best: dict[tuple[str, str], dict] = {}
    for r in rows:
        if r["status"] != "ok":
            continue
        k = (r["grp"], r["cell"])
        if k not in best or r["val_accuracy"] > best[k]["val_accuracy"]:
            best[k] = r
    return best


def _order(values, preferred):
    """`values` in the suite's order (first appearance), then any others sorted."""
    seen = [v for v in dict.fromkeys(preferred) if v in values]
    return seen + sorted(v for v in values if v not in seen)


def _table(title: str, rows_by: list[str], cols_by: list[str], cell) -> str:
    lines = [f"**{title}**", "", "| | " + " | ".join(cols_by) + " |",
             "| --- |" + " ---: |" * len(cols_by)]
    for r in rows_by:
        lines.append(f"| {r} | " + " | ".join(cell(r, c) for c in cols_by) + " |")
    return "\n".join(lines) + "\n"


def _metric(task: str) -> str:
    """The name a task's score takes in a table: accuracy, or F1 (squad)."""
    from_registry = TASKS.get(task)
    return "F1" if from_registry is not None and from_registry.metric == "f1" else "accuracy"


def _task_tables(mine: list[dict], order: dict) -> list[str]:
    metric = _metric(mine[0]["task"])
    opts = _order({r["optimizer"] for r in mine}, order.get("optimizers", []))
    schemes = _order({r["scheme"] for r in mine}, order.get("schemes", []))
    by = {(r["optimizer"], r["scheme"]): r for r in mine}

    def fmt(render):
        return lambda o, s: render(by[(o, s)]) if (o, s) in by else "–"

    return [
        _table(f"Test {metric} (%), learning rate and ε selected on validation", opts,
               schemes, fmt(lambda r: f"{100 * r['test_accuracy']:.1f}")),
        _table(f"Validation {metric} (%) of the selected setting", opts, schemes,
               fmt(lambda r: f"{100 * r['val_accuracy']:.1f}")),
        _table("Peak memory (MiB, measured)", opts, schemes,
               fmt(lambda r: f"{r['peak_bytes'] / MiB:.0f}")),
        _table("Step time (s) / forward passes per step", opts, schemes,
               fmt(lambda r: f"{r['step_s']:.3f} / {r['forward_passes']:g}")),
        _table("Selected learning rate / ε", opts, schemes,
               fmt(lambda r: f"{r['lr']:g} / {r['eps'] if r['eps'] else '–'}")),
    ]


def markdown(rows: list[dict], suite_order: dict | None = None) -> str:
    """The suite's tables: per task and model, accuracy (test, selected on validation),
    peak memory, step time and forward passes; then each study."""
    chosen = select(rows)
    failed = [r for r in rows if r["status"] != "ok"]
    order = suite_order or {}
    out = []
    cells = [r for (g, _), r in chosen.items() if g == "cell"]
    for task, model in sorted({(r["task"], r["model"]) for r in cells}):
        mine = [r for r in cells if r["task"] == task and r["model"] == model]
        out.append(f"### {task}, {model}\n")
        out += _task_tables(mine, order)
    studies = sorted({g for g, _ in chosen if g != "cell"})
    for study in studies:
        mine = sorted((r for (g, _), r in chosen.items() if g == study),
                      key=lambda r: r["cell"])
        out.append(f"### Study: {study}\n")
        out.append("| variant | test acc (%) | val acc (%) | peak MiB | step s | fwd/step |")
        out.append("| --- | ---: | ---: | ---: | ---: | ---: |")
        for r in mine:
            out.append(f"| {r['cell'].rsplit('/', 1)[-1]} | {100 * r['test_accuracy']:.1f} | "
                       f"{100 * r['val_accuracy']:.1f} | {r['peak_bytes'] / MiB:.0f} | "
                       f"{r['step_s']:.3f} | {r['forward_passes']:g} |")
        out.append("")
    if failed:
        out.append("### Runs that failed\n")
        out += [f"- {r['cell']} lr={r['lr']:g}: {r['error']}" for r in failed]
    versions = sorted({r["code_version"] for r in rows})
    out.append(f"\n{len(rows)} runs stored ({len(failed)} failed); code: "
               f"{', '.join(versions)}.")
    return "\n".join(out) + "\n"


def plots(rows: list[dict], folder: Path) -> list[Path]:
    """accuracy_vs_memory.png and one loss_curves_<task>.png per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = [r for (g, _), r in select(rows).items() if g == "cell"]
    paths = []
    if not chosen:
        return paths
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"full": "o", "lora": "s", "prefix": "^", "prompt": "D", "head": "v"}
    for opt in sorted({r["optimizer"] for r in chosen}):
        mine = [r for r in chosen if r["optimizer"] == opt]
        for r in mine:
            ax.scatter(r["peak_bytes"] / MiB, 100 * r["test_accuracy"],
                       marker=markers.get(r["scheme"], "x"),
                       color=f"C{sorted({x['optimizer'] for x in chosen}).index(opt)}",
                       label=opt if r is mine[0] else None)
    ax.set_xlabel("peak memory (MiB, measured)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("accuracy vs memory (marker: scheme; o full, s lora, ^ prefix, D prompt)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = folder / "accuracy_vs_memory.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
    for task in sorted({r["task"] for r in chosen}):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in (x for x in chosen if x["task"] == task):
            losses = r["losses"] or []
            w = max(1, len(losses) // 20)
            smooth = [sum(losses[i:i + w]) / w for i in range(0, max(1, len(losses) - w + 1))]
            ax.plot(range(len(smooth)), smooth, label=f"{r['optimizer']} {r['scheme']}",
                    linewidth=1)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (moving mean)")
        ax.set_title(f"{task}: selected runs")
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        path = folder / f"loss_curves_{task}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write_results(rows: list[dict], folder: Path, suite_order: dict | None = None
                  ) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    md = folder / "tables.md"
    md.write_text(markdown(rows, suite_order))
    chosen = {f"{g}:{c}": {k: v for k, v in r.items() if k not in ("report", "losses")}
              for (g, c), r in select(rows).items()}
    js = folder / "selected.json"
    js.write_text(json.dumps(chosen, indent=1))
    return {"tables": md, "selected": js, **{p.stem: p for p in plots(rows, folder)}}
