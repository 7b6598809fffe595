"""A short run of every optimizer on SmolLM2 / SST-2: same steps, batch, seed and data.

Each optimizer runs in its own process (so peak memory is its own) through
`edgezo.Session`, exactly as `edgezo finetune` runs it, and reports validation accuracy
before and after, the mean step time, forward (and backward) passes per step, and the
measured and predicted peak memory. Learning rates are fixed per method (no search):
typical values for each update rule at this model size; `edgezo bench` does the search.

    python benchmarks/optimizers.py [--steps 50] [--batch 16] [--only zo-sgd,zo-adam] [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time

import torch

LR = {"zo-sgd": 3e-5, "zo-sgd-sign": 1e-6, "zo-sgd-mmt": 3e-6, "zo-sgd-cons": 3e-5,
      "zo-adam": 1e-6, "forward-grad": 3e-5, "forward-grad-mmt": 3e-6,
      "forward-grad-adam": 1e-6, "fo-sgd": 1e-3, "fo-adam": 1e-5}


def one(name: str, steps: int, batch: int, val_examples: int) -> dict:
    from edgezo.run.session import Session

    sess = Session(profile="8gb-gpu", optimizer=name, lr=LR[name], batch_size=batch, seed=0)
    try:
        before = sess.evaluate("validation", max_examples=val_examples)["accuracy"]
        results = [sess.step() for _ in range(steps)]
        after = sess.evaluate("validation", max_examples=val_examples)["accuracy"]
        report = sess.report()
    finally:
        sess.close()
    times = [r.time_s for r in results[1:]] or [results[0].time_s]
    return {
        "optimizer": name, "lr": LR[name], "steps": steps, "batch": batch,
        "validation_before": before, "validation_after": after,
        "step_time_s": sum(times) / len(times),
        "forward_passes": results[-1].forward_passes,
        "backward_passes": results[-1].backward_passes,
        "final_loss": sum(r.loss for r in results[-10:]) / min(10, len(results)),
        "skipped": sum(r.skipped for r in results),
        "peak_train_bytes": report["peak_memory_by_phase"].get("train"),
        "peak_bytes": report["peak_memory_bytes"],
        "predicted_peak_bytes": report["predicted_peak_memory_bytes"],
        "state_bytes_per_param": report["optimizer_state_bytes_per_param"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--val-examples", type=int, default=500)
    ap.add_argument("--only", default=",".join(LR))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from edgezo.device.hardware import cpu_capability

    print(f"CPU: {cpu_capability()}", flush=True)  # bf16 speed differs 4x+ by instruction set
    if args.one:
        print(json.dumps(one(args.one, args.steps, args.batch, args.val_examples)))
        return
    rows = []
    start = time.time()
    for name in args.only.split(","):
        out = subprocess.run([sys.executable, __file__, "--one", name, "--steps",
                              str(args.steps), "--batch", str(args.batch), "--val-examples",
                              str(args.val_examples)], capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{name} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{name:18s} lr {r['lr']:.0e}  val {r['validation_before']:.3f} -> "
              f"{r['validation_after']:.3f}  step {r['step_time_s']:.2f} s  "
              f"passes {r['forward_passes']}+{r['backward_passes']}  "
              f"peak {r['peak_bytes'] / 2**20:.0f} MiB (predicted "
              f"{r['predicted_peak_bytes'] / 2**20:.0f})", flush=True)
    meta = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "wall_s": round(time.time() - start)}
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
