"""Time to accuracy: methods side by side on one task, the same data order and seed.

Each method runs in its own process through `edgezo.Session` and records, every
`--eval-every` steps, the validation accuracy against steps, forward passes and
wall-clock seconds (evaluations included: a user waits for them too). At the end it
evaluates the test set, and the summary gives, per method, the test accuracy of the
setting that validation selects (when a method has several learning rates).

    python benchmarks/time_to_accuracy.py --methods zo-sgd,fzoo,fo-adam --steps 1000
    python benchmarks/time_to_accuracy.py --plot results/tta   # the PNG from the JSONL

Results go to OUT/runs.jsonl (one line per run, appended, so a long study resumes) and
OUT/time_to_accuracy.png. The CPU's instruction set is printed and recorded: compare
figures only within one machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# name -> Session options (the learning rates searched are given by --lrs, or by "lr")
METHODS: dict[str, dict] = {
    "zo-sgd": {"optimizer": "zo-sgd", "lr": 3e-5},
    "zo-sgd-table": {"optimizer": "zo-sgd", "noise": "table", "lr": 3e-5},
    "zo-sgd-lora": {"optimizer": "zo-sgd", "scheme": "lora", "lr": 1e-3},
    "zo-adam-lora": {"optimizer": "zo-adam", "scheme": "lora", "lr": 1e-3},
    "zo-sgd-prefix": {"optimizer": "zo-sgd", "scheme": "prefix", "lr": 1e-3},
    "zo-sgd-prompt": {"optimizer": "zo-sgd", "scheme": "prompt", "lr": 1e-2},
    "lozo": {"optimizer": "zo-sgd", "directions": "lowrank", "lr": 3e-5},
    "subzero": {"optimizer": "zo-sgd", "directions": "subspace", "lr": 3e-5},
    "fzoo": {"optimizer": "fzoo", "q": 4, "lr": 1e-5},
    "fzoo-lora": {"optimizer": "fzoo", "q": 4, "scheme": "lora", "lr": 1e-3},
    "hizoo": {"optimizer": "hizoo", "lr": 3e-5},
    "hizoo-l": {"optimizer": "hizoo-l", "lr": 3e-5},
    "hybrid-adam": {"optimizer": "zo-adam", "fo_blocks": ["-1"], "lr": 1e-4},
    "zo-adam": {"optimizer": "zo-adam", "lr": 1e-5},
    "fo-adam": {"optimizer": "fo-adam", "lr": 1e-5},
    "fo-adam-lora": {"optimizer": "fo-adam", "scheme": "lora", "lr": 1e-3},
    # quantized fine-tuning (BENCHMARKS.md, "Quantized fine-tuning")
    "qzo-int4": {"optimizer": "zo-sgd", "scheme": "scales", "quantize": "quanto-int4",
                 "lr": 3e-6},
    "qzo-nf4": {"optimizer": "zo-sgd", "scheme": "scales", "quantize": "nf4", "lr": 3e-6},
    "zo-lora-int4": {"optimizer": "zo-sgd", "scheme": "lora", "quantize": "quanto-int4",
                     "lr": 1e-3},
    "qat-int4": {"optimizer": "zo-sgd", "qat": "int4", "lr": 3e-5},
}


def run_one(name: str, options: dict, args) -> dict:
    """One run, in this process: the curve and the final test accuracy."""
    from edgezo.device.hardware import cpu_capability
    from edgezo.run.session import Session

    start = time.perf_counter()
    s = Session(task=args.task, batch_size=args.batch_size, seed=args.seed,
                data_dir=args.data_dir, eval_batch_size=32, **options)
    curve, forwards, batch_forwards = [], 0, 0
    try:
        def record(step: int) -> None:
            val = s.evaluate("validation", args.eval_examples)["score"]
            point = {"step": step, "forwards": forwards, "batch_forwards": batch_forwards,
                     "val": val,
                     "wall_s": time.perf_counter() - start}
            if args.test_every and step and step % args.test_every == 0 and step < args.steps:
                # the test curve is reported, never selected on (the summary reads val);
                # its evaluation time counts in the later points' wall_s, as a user's would
                point["test"] = s.evaluate("test", args.test_examples)["score"]
            curve.append(point)
            print(f"  {name} step {step} val {val:.3f}"
                  + (f" test {point['test']:.3f}" if "test" in point else "")
                  + f" ({point['wall_s']:.0f} s)", flush=True)

        before = s.evaluate("test", args.test_examples)["score"] \
            if args.test_before else None
        record(0)
        for step in range(1, args.steps + 1):
            r = s.step()
            forwards += r.forward_passes + r.backward_passes  # a backward ~ a forward
            batch_forwards += r.batch_forwards + r.backward_passes
            if step % args.eval_every == 0 or step == args.steps:
                record(step)
        test = s.evaluate("test", args.test_examples)
        report = s.report()  # before scoring means: their copy of the weights is the script's
        averaged = [averaged_scores(s, int(k), args) for k in args.average_last.split(",")
                    if k] if args.average_last and can_average(s, name) else []
        extra = {"peak_memory_bytes": report["peak_memory_bytes"],
                 "predicted_peak_memory_bytes": report["predicted_peak_memory_bytes"]}
        plain_full = options.get("scheme", "full") == "full" and not options.get("quantize") \
            and not options.get("qat")
        if args.ptq and plain_full:  # the trained weights quantized, as the export would
            extra["test_ptq"] = post_training_quantized(s, args.ptq, args.test_examples)
            print(f"  {name} test {test['accuracy']:.3f}, after {args.ptq} PTQ "
                  f"{extra['test_ptq']:.3f}", flush=True)
        return {**extra, "method": name, "options": options, "task": args.task,
                "steps": args.steps, "batch_size": args.batch_size, "seed": args.seed,
                "curve": curve, "test": test["score"], "test_examples": test["examples"],
                "averaged": averaged,
                "test_before": before, "template": s.task.template if s.task else None,
                "dtype": s.dtype_name, "cpu": cpu_capability(),
                "step_time_s": report["step_time_s"],
                "wall_s": time.perf_counter() - start, "date": time.strftime("%Y-%m-%d")}
    finally:
        s.close()


def can_average(s, name: str) -> bool:
    """Whether --average-last applies to this run (the script restores the weights alone,
    so QAT's masters rule it out here)."""
    why = s.engine.averaging_problem() or ("QAT" if s.engine.qat is not None else None)
    if why is not None:
        print(f"  {name}: no averaged scores ({why})", flush=True)
    return why is None


def averaged_scores(s, steps: int, args) -> dict:
    """Validation and test accuracy of the mean of the weights after each of the last
    `steps` steps (Session.average_last); the last weights come back afterwards."""
    import torch

    params = s.engine.blocks.params
    s.engine.flush()
    last = [p.detach().clone() for p in params]
    start = time.perf_counter()
    count = s.average_last(steps)
    seconds = time.perf_counter() - start
    out = {"steps": count, "seconds": seconds,
           "val": s.evaluate("validation", args.eval_examples)["score"],
           "test": s.evaluate("test", args.test_examples)["score"]}
    with torch.no_grad():
        for p, kept in zip(params, last, strict=True):
            p.copy_(kept)
    s.selected = None  # the last step's weights again: the session may go on
    print(f"  averaged over the last {count} steps ({seconds:.1f} s): val {out['val']:.3f} "
          f"test {out['test']:.3f}", flush=True)
    return out


def post_training_quantized(s, fmt: str, test_examples: int | None) -> float:
    """Test accuracy with the model's matrices rounded to the GGUF format QAT `fmt` trains
    for (int4: Q4_1 layers and a Q8_0 embedding), exactly as `edgezo export --gguf-type`
    would store them: the (a) of "full ZO then PTQ" against (b) ZO-QAT."""
    import torch

    from edgezo.models.catalog import SCHEMES
    from edgezo.zo.qat import fake_quant, quantized_tensors

    model = s.model  # flushed
    adapters = SCHEMES[s.config.scheme.scheme].adapts_linears
    with torch.no_grad():
        for tensor, tfmt in quantized_tensors(model, fmt, adapters):
            tensor.copy_(fake_quant(tensor, tfmt).to(tensor.dtype))
    return s.evaluate("test", test_examples)["score"]


def plot(rows: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharey=True)
    for row in rows:
        label = f"{row['method']} lr={row['options'].get('lr', '-'):g}"
        c = row["curve"]
        for ax, key in zip(axes, ("step", "batch_forwards", "wall_s"), strict=True):
            kept = [p for p in c if key in p]  # runs from before batch forwards lack them
            ax.plot([p[key] for p in kept], [p["val"] for p in kept], marker=".",
                    label=label)
    for ax, title in zip(axes, ("steps", "forward passes over the batch (a doubled "
                                "forward: 2)", "wall-clock seconds (evals included)"),
                         strict=True):
        ax.set_xlabel(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation accuracy")
    axes[-1].legend(fontsize=7, loc="lower right")
    task = rows[0]["task"] if rows else ""
    fig.suptitle(f"time to accuracy, {task}, {rows[0]['cpu'] if rows else ''}")
    fig.tight_layout()
    path = out / "time_to_accuracy.png"
    fig.savefig(path, dpi=110)
    return path


def summary(rows: list[dict]) -> str:
    """Per method, the run validation selects (final validation accuracy) and its test."""
    best: dict[str, dict] = {}
    for row in rows:
        m = row["method"]
        if m not in best or row["curve"][-1]["val"] > best[m]["curve"][-1]["val"]:
            best[m] = row
    lines = ["| method | lr | val (final) | test before | test | steps | batch forwards "
             "| wall s | s/step |", "| --- " + "| ---: " * 8 + "|"]
    for m, r in best.items():
        c = r["curve"][-1]
        before = "" if r.get("test_before") is None else f"{r['test_before']:.3f}"
        lines.append(f"| {m} | {r['options'].get('lr', 0):g} | {c['val']:.3f} | {before} | "
                     f"{r['test']:.3f} | {c['step']} | {c.get('batch_forwards', '')} | "
                     f"{c['wall_s']:.0f} | "
                     f"{r['step_time_s'] or 0:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="zo-sgd,fzoo,fo-adam",
                    help=f"comma-separated, from: {', '.join(METHODS)}")
    ap.add_argument("--lrs", default=None, help="learning rates to try per method "
                    "(comma-separated; default: each method's own)")
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-examples", type=int, default=None, help="validation cap")
    ap.add_argument("--test-examples", type=int, default=None, help="test cap")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--output", default="results/time_to_accuracy")
    ap.add_argument("--set", default="", help="extra Session options for every run, "
                    "as JSON (e.g. '{\"dtype\": \"fp32\"}')")
    ap.add_argument("--ptq", choices=["int4", "int8"], default=None,
                    help="also test each trained model quantized after training")
    ap.add_argument("--test-every", type=int, default=0,
                    help="also score the test set every N steps (a multiple of "
                    "--eval-every), to read test accuracy at a time budget; 0: only at the end")
    ap.add_argument("--test-before", action="store_true",
                    help="also evaluate the test set before training (the zero-shot score)")
    ap.add_argument("--average-last", default="", help="also score the mean of the weights "
                    "after each of the last N steps, at the end (comma-separated Ns)")
    ap.add_argument("--plot", action="store_true", help="only redraw the PNG and table")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: JSON of one run
    args = ap.parse_args()
    if args.test_every and args.test_every % args.eval_every:
        ap.error("--test-every must be a multiple of --eval-every (tests go with evaluations)")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    if args.one:
        name, options = json.loads(args.one)
        print("RESULT " + json.dumps(run_one(name, options, args)), flush=True)
        return
    if not args.plot:
        run_all(args, out)
    rows = [json.loads(x) for x in (out / "runs.jsonl").read_text().splitlines() if x]
    print(summary(rows))
    print(f"wrote {plot(rows, out)}")


def run_all(args, out: Path) -> None:
    from edgezo.device.hardware import cpu_capability

    print(f"CPU: {cpu_capability()}", flush=True)
    extra = json.loads(args.set) if args.set else {}
    for name in args.methods.split(","):
        lrs = ([float(x) for x in args.lrs.split(",")] if args.lrs
               else [METHODS[name]["lr"]])
        for lr in lrs:
            options = {**METHODS[name], **extra, "lr": lr}
            cmd = [sys.executable, __file__, "--one", json.dumps([name, options]),
                   *sys.argv[1:]]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
            result = None
            for line in proc.stdout:
                if line.startswith("RESULT "):
                    result = json.loads(line[7:])
                else:
                    print(line, end="", flush=True)
            if proc.wait() != 0 or result is None:
                print(f"{name} lr={lr:g} failed", flush=True)
                continue
            with open(out / "runs.jsonl", "a") as f:
                f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
