"""How close is the memory plan to the measured peak? One row per configuration.

The grid: schemes full/lora/prefix/prompt x optimizers zo-sgd/zo-adam/fo-adam x two
batch sizes x pair/two-pass (ZO only), on SmolLM2-135M and on tiny random models of two
families. Every configuration runs in its own process (a high-water mark cannot leak from
one into the next): a Session with the 8gb-gpu profile emulated on the CPU, three steps on
a batch of the task's longest training example (the sequence length the plan is made
for), three real batches, and evaluation (batch 32) on the longest evaluated example;
each phase's peak resident memory above the pre-load baseline compared with its plan.

    python benchmarks/planner_accuracy.py [--models smollm2,tiny-llama,tiny-qwen2]
        [--batches 4,16] [--json out.json]
    python benchmarks/planner_accuracy.py --calibrate   # the CPU runtime constants
    python benchmarks/planner_accuracy.py --strict-memory   # Session(strict_memory=True)

Tiny models are the test suite's families at width 1024 (about 70 MB of fp32 weights):
the test suite's width-32 models use less memory than the allocator's own granularity,
so a ratio measured on them would be noise.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SCHEMES = ("full", "lora", "prefix", "prompt")
OPTIMIZERS = ("zo-sgd", "zo-adam", "fo-adam")
MiB = 1024**2


def measure(model: str, scheme: str, optimizer: str, batch: int, pair: bool | None,
            steps: int, strict_memory: bool = False) -> dict:
    """Train and evaluate on the longest example of each phase (the shapes the plan is
    made for), then a few real batches, as a run would; each phase's peak vs its plan."""
    import torch

    from edgezo import Session
    from edgezo.tasks.loss import candidate_scores

    s = Session(model, task="sst2", optimizer=optimizer, scheme=scheme, lr=1e-6,
                batch_size=batch, pair=pair, check_budget=False, eval_batch_size=32,
                strict_memory=strict_memory)

    def longest(split: str):
        return max(s.task.split(split),
                   key=lambda e: len(e.prompt) + max(map(len, e.candidates)))

    data = s.encoder.encode([longest("train")] * batch)
    for _ in range(steps):
        s.step(data)
    for _ in range(steps):
        s.step()  # real batches: other widths
    worst = max((longest("validation"), longest("test")),
                key=lambda e: s.encoder.encode([e])["input_ids"].shape[1])
    s.engine.flush()
    s.engine.release_scratch()  # as Session.evaluate does
    with s.monitor.phase("eval"), torch.no_grad():
        candidate_scores(s.module, s.encoder.encode([worst] * s.eval_batch_size))
    s.evaluate("validation", max_examples=64)
    plan = s.plan
    out = {"model": model, "scheme": scheme, "optimizer": optimizer, "batch": batch,
           "mode": ("pair" if s.pair else "two-pass") if optimizer != "fo-adam" else "fo",
           "seq_len": int(data["input_ids"].shape[1]),
           "predicted_bytes": plan.phases["train"], "measured_bytes": s.monitor.peaks["train"],
           "eval_predicted_bytes": plan.phases["eval"],
           "eval_measured_bytes": s.monitor.peaks["eval"],
           # CUDA: the caching allocator's reserved peaks, what the 8 GiB cap holds
           "reserved_bytes": s.monitor.reserved_peaks.get("train"),
           "eval_reserved_bytes": s.monitor.reserved_peaks.get("eval"),
           "components": plan.components, "eval_components": plan.eval_components}
    s.close()
    return out


def calibrate() -> None:
    """The CPU runtime's own growth: a width-32 model's tensors are a few hundred KiB, so
    what its run adds to the process is kernel code and caches. Read at the evaluation
    after training, when both phases' kernels have run; the noise threads' buffers are left
    out because a tiny model touches only a sliver of each. ZO-SGD gives the runtime of
    forwards alone; FO-SGD and FO-Adam what a backward adds to it."""
    from edgezo.memory import peak as plan_mod
    from edgezo.models.tiny import save_tiny

    folder = Path(tempfile.mkdtemp(prefix="edgezo-calibrate-")) / "tiny"
    save_tiny(str(folder), "llama", width=32)
    runtime = {}
    for optimizer in ("zo-sgd", "fo-sgd", "fo-adam"):
        row = measure(str(folder), "full", optimizer, 16, True if optimizer == "zo-sgd"
                      else None, 3)
        c = row["eval_components"]
        tensors = sum(v for k, v in c.items() if k not in ("cpu_runtime", "noise_buffers"))
        runtime[optimizer] = row["eval_measured_bytes"] - tensors
        print(f"{optimizer}: evaluation after training measured "
              f"{row['eval_measured_bytes'] / MiB:.1f} MiB, tensors {tensors / MiB:.1f} MiB "
              f"-> CPU runtime {runtime[optimizer] / MiB:.1f} MiB")
    backward = (runtime["fo-sgd"] + runtime["fo-adam"]) / 2 - runtime["zo-sgd"]
    print(f"CPU runtime {runtime['zo-sgd'] / MiB:.1f} MiB (plan.CPU_RUNTIME_BYTES is "
          f"{plan_mod.CPU_RUNTIME_BYTES / MiB:.0f}); a backward adds {backward / MiB:.1f} MiB "
          f"(plan.CPU_BACKWARD_RUNTIME_BYTES is "
          f"{plan_mod.CPU_BACKWARD_RUNTIME_BYTES / MiB:.0f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="smollm2,tiny-llama,tiny-qwen2")
    ap.add_argument("--batches", default="4,16")
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--calibrate", action="store_true",
                    help="measure the CPU runtime's overhead (plan.CPU_RUNTIME_BYTES)")
    ap.add_argument("--strict-memory", action="store_true",
                    help="run the sessions with strict_memory (glibc's fixed mmap threshold)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: one configuration as JSON
    args = ap.parse_args()
    from edgezo.device.hardware import cpu_capability

    print(f"CPU: {cpu_capability()}", flush=True)  # bf16 speed differs 4x+ by instruction set
    if args.calibrate:
        calibrate()
        return
    if args.one:
        c = json.loads(args.one)
        print("RESULT " + json.dumps(measure(**c, steps=args.steps)))
        return

    tmp = Path(tempfile.mkdtemp(prefix="edgezo-planner-"))
    rows = []
    for model in args.models.split(","):
        spec = model
        if model.startswith("tiny-"):
            from edgezo.models.tiny import save_tiny

            spec = str(tmp / model)
            save_tiny(spec, model.removeprefix("tiny-"), width=1024)
        for scheme, optimizer, batch in itertools.product(
                args.schemes.split(","), args.optimizers.split(","),
                map(int, args.batches.split(","))):
            modes = [None] if optimizer.startswith("fo-") else [True, False]
            for pair in modes:
                conf = dict(model=spec, scheme=scheme, optimizer=optimizer, batch=batch,
                            pair=pair, strict_memory=args.strict_memory)
                proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(conf),
                                       "--steps", str(args.steps)],
                                      capture_output=True, text=True,
                                      env={**os.environ, "PYTHONWARNINGS": "ignore"})
                line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                if proc.returncode or not line:
                    print(f"{model} {scheme} {optimizer} b{batch}: failed\n{proc.stderr[-2000:]}")
                    continue
                row = json.loads(line[0][7:])
                row["model"] = model
                rows.append(row)
                print(f"{model:10s} {scheme:6s} {optimizer:8s} b{batch:<3d} {row['mode']:8s} "
                      f"seq {row['seq_len']:3d}  train: predicted "
                      f"{row['predicted_bytes'] / MiB:7.1f} MiB measured "
                      f"{row['measured_bytes'] / MiB:7.1f} MiB ratio "
                      f"{row['measured_bytes'] / row['predicted_bytes']:.3f}  eval: "
                      f"{row['eval_predicted_bytes'] / MiB:7.1f} / "
                      f"{row['eval_measured_bytes'] / MiB:7.1f} MiB ratio "
                      f"{row['eval_measured_bytes'] / row['eval_predicted_bytes']:.3f}"
                      + (f"  reserved: train {row['reserved_bytes'] / MiB:.1f}, eval "
                         f"{row['eval_reserved_bytes'] / MiB:.1f} MiB"
                         if row.get("reserved_bytes") else ""),
                      flush=True)
    for phase in ("", "eval_"):
        within = sum(abs(r[f"{phase}measured_bytes"] / r[f"{phase}predicted_bytes"] - 1) <= 0.10
                     for r in rows)
        print(f"{phase or 'train_'}phase: {within}/{len(rows)} configurations within ±10%")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
