"""Validation score against steps and wall-clock time for `edgezo finetune` run folders
(their metrics.jsonl), one line per run. Resumed runs read as one curve.

    python benchmarks/run_curves.py RUN [RUN ...] --out curves.png [--title TEXT]

The legend names each run's optimizer, scheme and learning rate (run.json), and its test
score before and after (report.json, when the run finished).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def curve(run: Path) -> list[tuple[int, float, float]]:
    """(step, wall seconds, validation score) of every evaluation in the run."""
    points, offset, last = [], 0.0, 0.0
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        wall = row.get("wall_s", 0.0)
        if wall < last:  # a resume starts its clock again
            offset += last
        last = wall
        if row.get("validation_accuracy") is not None:
            points.append((row["step"], offset + wall, row["validation_accuracy"]))
    return points


def label(run: Path) -> str:
    config = json.loads((run / "run.json").read_text())
    opt, scheme = config["optimizer"], config["scheme"]
    text = f"{opt['optimizer']} {scheme['scheme']} lr={opt['lr']:g}"
    report = run / "report.json"
    r = json.loads(report.read_text()) if report.is_file() else {}
    before, after = r.get("accuracy_before"), r.get("test_accuracy")
    if after is not None:  # a stopped run's report has no test score
        text += (f": test {before:.3f} -> {after:.3f}" if before is not None
                 else f": test {after:.3f}")
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--title", default="")
    ap.add_argument("--metric", default="validation F1")
    args = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for run in args.runs:
        points = curve(run)
        name = label(run)
        if not points:
            print(f"{run}: {name}; no evaluations, not drawn")
            continue
        by_step.plot([p[0] for p in points], [p[2] for p in points], marker=".", label=name)
        by_time.plot([p[1] / 60 for p in points], [p[2] for p in points], marker=".")
        print(f"{run}: {name}; best {max(p[2] for p in points):.3f} at step "
              f"{max(points, key=lambda p: p[2])[0]}")
    by_step.set_xlabel("step")
    by_time.set_xlabel("wall-clock minutes (evaluations included)")
    by_step.set_ylabel(args.metric)
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
    by_step.legend(fontsize=7, loc="lower right")
    fig.suptitle(args.title)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
