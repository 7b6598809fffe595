"""Peak memory of a ZO full fine-tuning step relative to plain inference at the same batch.

Each measurement runs in its own process, so one's high-water mark cannot leak into the
other's; both load the same model the same way and run the same batch:

    inference:       two plain forwards of the batch (no grad)
    zo-pair:         edgezo ZO-SGD steps in pair mode (one forward over [x; x])
    zo-two:          edgezo ZO-SGD steps in two-pass mode
    zo-pair-table:   pair mode with --noise table (its 8 MiB table counted)

On CUDA the figure is torch.cuda.max_memory_allocated; on the CPU it is the process's
peak resident set (the kernel's high-water mark, ru_maxrss) above its resident set before
the weights were loaded. The ratio peak(ZO step) / peak(inference) is the goal (<= 1.05).

    python benchmarks/memory.py [--model smollm2] [--batch 16] [--seq 64]

--dtype auto (the default) computes as a run would on this CPU (fp32 where bf16 is not
native); the CPU's instruction set is printed first.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import subprocess
import sys

import psutil
import torch


def lm_labels(data: dict) -> dict:
    """The README's own step(batch): labels on every token (a language-modelling loss
    that reads logits at every position)."""
    ids = data["input_ids"]
    return {"input_ids": ids, "attention_mask": data["attention_mask"], "labels": ids}


def measure(mode: str, model_name: str, dtype: str, batch: int, seq: int,
            loss: str = "classification") -> dict:
    from step_overhead import make_batch

    from edgezo.config import EstimatorOptions
    from edgezo.models.loading import load_model, parse_dtype
    from edgezo.tasks.loss import example_losses
    from edgezo.zo.engine import ZOEngine
    from edgezo.zo.optimizers import make_optimizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    baseline = psutil.Process().memory_info().rss
    model = load_model(model_name, parse_dtype(dtype), device).model
    if device.type == "cpu":
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # the loader's freed temporaries
    data = {k: v.to(device) for k, v in
            make_batch(model.config.get_text_config().vocab_size, batch, seq).items()}
    if loss == "lm":
        data = lm_labels(data)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if mode == "inference":
        with torch.no_grad():
            for _ in range(3):
                example_losses(model, data).mean().item()
    else:
        noise = "table" if mode.endswith("table") else "generator"
        engine = ZOEngine(model, make_optimizer("zo-sgd"),
                          EstimatorOptions(eps=1e-3, noise=noise), loss_fn=example_losses,
                          seed=0, pair=mode.startswith("zo-pair"))
        for _ in range(3):
            engine.step(data, lr=1e-6)
        engine.close()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"mode": mode, "peak_bytes": peak, "weights_bytes": weights, "device": str(device)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32", "fp16"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--loss", default="classification", choices=["classification", "lm"],
                    help="lm: labels on every token (logits at every position)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one mode
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.model, args.dtype, args.batch, args.seq,
                                 args.loss)))
        return
    from edgezo.hardware import cpu_capability, preferred_dtype

    if args.dtype == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        args.dtype = preferred_dtype(None, "bf16", device)[0]
    print(f"CPU: {cpu_capability()}")
    results = {}
    for mode in ("inference", "zo-pair", "zo-two", "zo-pair-table"):
        out = subprocess.run([sys.executable, __file__, "--one", mode, "--model", args.model,
                              "--dtype", args.dtype, "--batch", str(args.batch),
                              "--seq", str(args.seq), "--loss", args.loss],
                             capture_output=True, text=True, check=True)
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    base = results["inference"]["peak_bytes"]
    mib = 1024**2
    print(f"{args.model} {args.dtype}, batch {args.batch} x {args.seq} tokens, {args.loss} loss, "
          f"device {results['inference']['device']}, weights "
          f"{results['inference']['weights_bytes'] / mib:.0f} MiB")
    for mode, r in results.items():
        print(f"  {mode:10s} peak {r['peak_bytes'] / mib:8.1f} MiB   "
              f"ratio {r['peak_bytes'] / base:.3f}")
    print("  goal: zo-pair / inference <= 1.05")


if __name__ == "__main__":
    main()
