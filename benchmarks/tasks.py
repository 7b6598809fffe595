"""SmolLM2 on every task: zero-shot accuracy with each of the task's templates, and a
short ZO-SGD LoRA run per task (validation before/after, test after).

Each task runs in its own process through `edgezo.Session`. Test sets can be capped
(`--max-test`) to keep a CPU run short; the cap is printed with the numbers.

    python benchmarks/tasks.py [--steps 100] [--batch 16] [--max-test 500] [--json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

TASKS = ("sst2", "copa", "winogrande", "multirc", "boolq", "wic", "wsc")


def one(task: str, steps: int, batch: int, max_test: int, lr: float, eps: float) -> dict:
    from edgezo.run.session import Session
    from edgezo.tasks.make import make_task

    row: dict = {"task": task}
    for template in make_task(task).templates:  # aligned, empty, and any the task adds
        sess = Session(task=task, template=template, lr=0.0, eval_batch_size=16)
        try:
            result = sess.evaluate("test", max_examples=max_test)
        finally:
            sess.close()
        row[f"zero_shot_{template}"] = result["accuracy"]
        if "exact_match" in result:
            row[f"zero_shot_{template}_em"] = result["exact_match"]
        row["test_examples"] = result["examples"]
        row["splits"] = sess.task.split_info
    if steps:
        sess = Session(task=task, scheme="lora", lr=lr, eps=eps, batch_size=batch,
                       eval_batch_size=16)
        try:
            row["lora_val_before"] = sess.evaluate("validation")["accuracy"]
            start = time.perf_counter()
            results = [sess.step() for _ in range(steps)]
            row["lora_step_time_s"] = (time.perf_counter() - start) / steps
            row["lora_val_after"] = sess.evaluate("validation")["accuracy"]
            test = sess.evaluate("test", max_examples=max_test)
            row["lora_test_after"] = test["accuracy"]
            row["lora_steps"] = steps
            row["lora_skipped"] = sum(r.skipped for r in results)
            row["lora_peak_bytes"] = sess.report()["peak_memory_bytes"]
        finally:
            sess.close()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-test", type=int, default=500)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--eps", type=float, default=1e-2)
    ap.add_argument("--only", default=",".join(TASKS))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from edgezo.device.hardware import cpu_capability

    print(f"CPU: {cpu_capability()}", flush=True)  # bf16 speed differs 4x+ by instruction set
    if args.one:
        print(json.dumps(one(args.one, args.steps, args.batch, args.max_test, args.lr,
                             args.eps)))
        return
    rows, start = [], time.time()
    for task in args.only.split(","):
        out = subprocess.run([sys.executable, __file__, "--one", task, "--steps",
                              str(args.steps), "--batch", str(args.batch), "--max-test",
                              str(args.max_test), "--lr", str(args.lr), "--eps",
                              str(args.eps)], capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{task} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(r)
        lora = (f"  LoRA {r['lora_steps']} steps: val {r['lora_val_before']:.3f} -> "
                f"{r['lora_val_after']:.3f}, test {r['lora_test_after']:.3f}, "
                f"{r['lora_step_time_s']:.2f} s/step" if "lora_steps" in r else "")
        shots = " ".join(f"{k.removeprefix('zero_shot_')} {v:.3f}" for k, v in r.items()
                         if k.startswith("zero_shot_") and not k.endswith("_em"))
        print(f"{task:10s} zero-shot {shots} on {r['test_examples']} test examples{lora}",
              flush=True)
    if args.json:
        print(json.dumps({"rows": rows, "wall_s": round(time.time() - start)}, indent=2))


if __name__ == "__main__":
    main()
