"""Finished runs' test scores beside what each cost to train: a markdown table and a plot
of the test score against training time and against training memory.

    edgezo eval --task squad --split test --json > zero.json                # zero-shot
    edgezo eval --model RUN --task squad --split test --json > score.json   # each run
    python benchmarks/test_scores.py --zero-shot zero.json RUN=score.json ... --out scores.png

The last run listed is the bar (say, FO-Adam): each row says how much of the way from
zero-shot to it that run's gain goes.

Training time is the sum of the step times up to the step whose weights the run kept
(report.json's `selected.step`; evaluations excluded): a run taken past its best is
charged only for the steps that made the weights it ships, and the table gives the whole
run's time beside it (a step logged twice, after a rewind, counts once). Memory is the
highest resident memory read after a step (metrics.jsonl: heap the evaluations between
steps left behind included), not a phase's peak; report.json's peaks cover only the
last part of a resumed run. Step times are
whatever the machine gave each run: runs made beside other work compare only roughly.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Scored:
    name: str
    f1: float
    exact_match: float | None
    kept_step: int = 0
    steps: int = 0
    minutes_to_kept: float = 0.0
    minutes: float = 0.0
    resident_gb: float = 0.0


def read_eval(path: Path) -> dict:
    score = json.loads(path.read_text())
    if "f1" not in score:
        raise SystemExit(f"{path}: not an `edgezo eval --json` output of a generative task "
                         "(no 'f1'); score the run with --task squad --split test --json")
    return score


def scored_run(run: Path, score: dict) -> Scored:
    config = json.loads((run / "run.json").read_text())
    report = json.loads((run / "report.json").read_text())
    rows = list({r["step"]: r for r in map(json.loads,
                                            (run / "metrics.jsonl").read_text().splitlines())
                 }.values())  # a step redone after a rewind: its last record
    selected = (report.get("selected") or {}).get("step")
    kept = rows[-1]["step"] if selected is None else selected
    opt, scheme = config["optimizer"], config["scheme"]
    return Scored(
        name=f"{opt['optimizer']} {scheme['scheme']} {opt['lr']:g}",
        f1=score["f1"], exact_match=score.get("exact_match"), kept_step=kept,
        steps=rows[-1]["step"],
        minutes_to_kept=sum(r["time_s"] for r in rows if r["step"] <= kept) / 60,
        minutes=sum(r["time_s"] for r in rows) / 60,
        resident_gb=max(r["memory_bytes"] for r in rows) / 1e9)


def table(zero: Scored, runs: list[Scored]) -> str:
    span = runs[-1].f1 - zero.f1  # the bar: the last run listed
    lines = ["| | F1 | EM | of the way to the last row | kept step / steps | training minutes "
             "to kept (all) | highest resident GB after a step |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
             f"| zero-shot | {zero.f1:.3f} | {zero.exact_match:.3f} | 0% | | | |"]
    for r in runs:
        share = (r.f1 - zero.f1) / span if span > 0 else 0.0
        lines.append(f"| {r.name} | {r.f1:.3f} | {r.exact_match:.3f} | {share:.0%} | "
                     f"{r.kept_step} / {r.steps} | {r.minutes_to_kept:.0f} ({r.minutes:.0f}) "
                     f"| {r.resident_gb:.2f} |")
    return "\n".join(lines)


def plot(zero: Scored, runs: list[Scored], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_time, by_memory) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, x, xlabel in ((by_time, "minutes_to_kept", "training minutes to the kept weights"),
                          (by_memory, "resident_gb", "highest resident GB after a step")):
        ax.axhline(zero.f1, color="grey", linestyle="--", label=f"zero-shot {zero.f1:.3f}")
        for r in runs:
            ax.scatter(getattr(r, x), r.f1, s=40)
            ax.annotate(f"{r.name}\n{r.f1:.3f}", (getattr(r, x), r.f1), fontsize=7,
                        xytext=(5, -12), textcoords="offset points")
        ax.set_xlabel(xlabel)
        ax.set_xlim(0, 1.4 * max(getattr(r, x) for r in runs))  # room for the labels
        ax.grid(alpha=0.3)
    by_time.set_ylabel("test F1")
    by_time.legend(fontsize=7, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", metavar="RUN=EVAL.json",
                    help="a run folder and its `edgezo eval --json` score on the test split; "
                         "the last is the bar the others' gains are measured against")
    ap.add_argument("--zero-shot", type=Path, required=True, metavar="EVAL.json")
    ap.add_argument("--out", type=Path, help="the plot (PNG); without it, the table only")
    ap.add_argument("--title", default="")
    args = ap.parse_args()
    zero_score = read_eval(args.zero_shot)
    zero = Scored("zero-shot", zero_score["f1"], zero_score.get("exact_match"))
    runs = []
    for item in args.runs:
        run, _, score = item.partition("=")
        if not score:
            ap.error(f"{item}: give RUN=EVAL.json")
        runs.append(scored_run(Path(run), read_eval(Path(score))))
    print(f"{zero_score['examples']} {zero_score['split']} examples")
    print(table(zero, runs))
    if args.out:
        plot(zero, runs, args.out, args.title)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
