"""Streamed vs resident: step time, peak memory and traffic of the same ZO run.

Two processes, same model, batch and seed: one with every weight resident, one streaming
`--stream-layers` decoder layers from `--offload` (disk on a CPU; host or disk on a GPU).
Prints the step-time ratio streamed / resident, the measured peaks, the bytes each step
moves, and the plan's transfer- and compute-bound estimates for the streamed run.

    python benchmarks/streaming.py [--model smollm2] [--batch 16] [--steps 4]
        [--offload disk] [--stream-layers N] [--profile 8gb-gpu]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

MiB = 1024**2


def measure(model: str | None, profile: str, batch: int, steps: int, offload: str,
            stream_layers: int | None) -> dict:
    from edgezo import Session

    s = Session(model, profile=profile, task="sst2", lr=1e-6, batch_size=batch,
                check_budget=False, offload=offload, stream_layers=stream_layers)
    examples = s.task.split("train")
    longest = max(examples, key=lambda e: len(e.prompt) + max(map(len, e.candidates)))
    data = s.encoder.encode([longest] * batch)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        s.step(data)
        times.append(time.perf_counter() - t0)
    report = s.report()
    out = {"offload": offload, "step_s": statistics.median(times[1:] or times),
           "train_peak_bytes": s.monitor.peaks["train"],
           "predicted_bytes": s.plan.peak_bytes, "streaming": report["streaming"],
           "plan_streaming": s.plan.streaming, "device": str(s.device)}
    s.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--profile", default="8gb-gpu")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--offload", default="disk")
    ap.add_argument("--stream-layers", type=int, default=None)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    from edgezo.device.hardware import cpu_capability

    print(f"CPU: {cpu_capability()}", flush=True)  # bf16 speed differs 4x+ by instruction set
    if args.one:
        c = json.loads(args.one)
        print("RESULT " + json.dumps(measure(**c)))
        return
    rows = {}
    for offload in ("off", args.offload):
        conf = dict(model=args.model, profile=args.profile, batch=args.batch,
                    steps=args.steps, offload=offload,
                    stream_layers=None if offload == "off" else args.stream_layers)
        proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(conf)],
                              capture_output=True, text=True,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.exit(f"{offload}: failed\n{proc.stderr[-3000:]}")
        rows[offload] = json.loads(line[0][7:])
    res, st = rows["off"], rows[args.offload]
    s, p = st["streaming"], st["plan_streaming"]
    print(f"{args.model or 'smollm2'}, batch {args.batch}, device {st['device']}, "
          f"median of {args.steps - 1} steps")
    for name, r in (("resident", res), ("streamed", st)):
        print(f"  {name} step        {r['step_s']:.3f} s   peak "
              f"{r['train_peak_bytes'] / MiB:7.1f} MiB (plan {r['predicted_bytes'] / MiB:.1f})")
    print(f"  streamed / resident  {st['step_s'] / res['step_s']:.2f}x time, "
          f"{st['train_peak_bytes'] / res['train_peak_bytes']:.2f}x memory")
    print(f"  {s['streamed_layers']} layers from {s['tier']}, {s['buffers']} buffer(s) of "
          f"{s['buffer_bytes'] / MiB:.1f} MiB, masters {s['master_dtype']}, "
          f"at most {s['max_layers_held']} held; per step "
          f"{s['bytes_in'] / args.steps / MiB:.1f} MiB in, "
          f"{s['bytes_out'] / args.steps / MiB:.1f} MiB out")
    compute = "n/a" if p["compute_s"] is None else f"{p['compute_s'] * 1e3:.0f} ms"
    print(f"  plan for the profile's GPU: transfer {p['transfer_s'] * 1e3:.0f} ms, "
          f"compute {compute} (profile {args.profile})")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
