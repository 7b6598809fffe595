"""Memory and step time of the ways to fine-tune for a small device, side by side.

Each configuration runs a few ZO steps of SST-2 (batch 16) through `edgezo.Session` in
its own process and reports the run's measured peak memory (report.json's
peak_memory_bytes: on the CPU the process's resident peak above its baseline before the
weights), the planner's prediction, the trainable values and the mean step time:

    full-bf16        full ZO in bf16 (the profile dtype of a GPU)
    full-fp32        full ZO in fp32 (what an AVX2 CPU computes in)
    qat-int4         full ZO, forwards through Q4_1 weights, fp32 masters
    lora-int4        ZO-LoRA on a quanto int4 base
    qzo-int4         QZO: the quanto int4 base's scales
    qzo-nf4          QZO: the NF4 base's absmax

    python benchmarks/quantized.py [--steps 5] [--configs full-bf16,qzo-int4]

Accuracy at equal steps comes from benchmarks/time_to_accuracy.py (BENCHMARKS.md,
"Quantized fine-tuning"). The CPU's instruction set is printed first.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CONFIGS = {
    "full-bf16": {"dtype": "bf16"},
    "full-fp32": {"dtype": "fp32"},
    "qat-int4": {"dtype": "fp32", "qat": "int4"},
    "lora-int4": {"scheme": "lora", "quantize": "quanto-int4"},
    "qzo-int4": {"scheme": "scales", "quantize": "quanto-int4"},
    "qzo-nf4": {"scheme": "scales", "quantize": "nf4"},
}


def measure(name: str, steps: int, data_dir: str | None, model: str | None = None,
            profile: str = "cpu-16gb") -> dict:
    from edgezo import Session

    s = Session(model, batch_size=16, seed=0, data_dir=data_dir, profile=profile,
                **CONFIGS[name])
    try:
        for _ in range(steps):
            s.step()
        r = s.report()
        trainable = sum(p.numel() for p in s.model.parameters() if p.requires_grad)
        return {"config": name, "dtype": s.dtype_name, "device": str(s.device),
                "trainable": trainable,
                "peak_mib": r["peak_memory_bytes"] / 2**20,
                "predicted_mib": r["predicted_peak_memory_bytes"] / 2**20,
                "step_s": r["step_time_s"]}
    finally:
        s.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M")
    ap.add_argument("--profile", default="cpu-16gb",
                    help="a GPU profile runs on the GPU when one is visible")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(measure(args.one, args.steps, args.data_dir, args.model,
                                             args.profile)))
        return
    from edgezo.device.hardware import cpu_capability

    print(f"CPU: {cpu_capability()}")
    print("| config | dtype | trainable values | peak MiB | predicted MiB | s/step |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for name in args.configs.split(","):
        cmd = [sys.executable, __file__, "--one", name, "--steps", str(args.steps),
               "--profile", args.profile]
        if args.model:
            cmd += ["--model", args.model]
        if args.data_dir:
            cmd += ["--data-dir", args.data_dir]
        out = subprocess.run(cmd, capture_output=True, text=True)
        lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if not lines:
            print(f"| {name} | failed: {out.stderr.strip().splitlines()[-1:]} |")
            continue
        r = json.loads(lines[0][7:])
        print(f"| {name} | {r['dtype']} on {r['device']} | {r['trainable']:,} | "
              f"{r['peak_mib']:.0f} | {r['predicted_mib']:.0f} | {r['step_s']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
