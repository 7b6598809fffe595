"""Peak memory of a ZO full fine-tuning step relative to plain inference at the same batch.

Each measurement runs in its own process, so one's high-water mark cannot leak into the
other's; both load the same model the same way and run the same batch:

    inference:       two plain forwards of the batch (no grad)
    zo-pair:         edgezo ZO-SGD steps in pair mode (one forward over [x; x])
    zo-two:          edgezo ZO-SGD steps in two-pass mode
    zo-pair-table:   pair mode with --noise table (its 8 MiB table counted)
    zo-pair-graph:   the same with each pair forward a CUDA graph (on a GPU only; the
                     graph's memory pool counted)

On CUDA the figure is torch.cuda.max_memory_allocated; on the CPU it is the process's
peak resident set (the kernel's high-water mark, ru_maxrss) above its resident set before
the weights were loaded. The ratio peak(ZO step) / peak(inference) is the goal (<= 1.05).

On the CPU the resident set also holds what glibc's malloc keeps of freed blocks, and that
depends on the order of allocations and on which thread made them: the same inference
process read 626-650 MiB from one run to the next. So each mode runs in --repeat
processes (median and range printed), and a second column counts tensors alone: the
weights plus the highest sum of live tensor bytes during the steps (torch.profiler's
allocation events, whatever malloc keeps). The profiler records only the thread that
started it, so this pass runs the noise pool on that thread (EDGEZO_NOISE_THREADS=1): each
further noise thread of a real run keeps its own chunk buffers, about 1 MiB per name.

    python benchmarks/memory.py [--model smollm2] [--batch 16] [--seq 64] [--repeat 3]

--dtype auto (the default) computes as a run would on this CPU (fp32 where bf16 is not
native); the CPU's instruction set is printed first.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys

import psutil
import torch


def lm_labels(data: dict) -> dict:
    """The README's own step(batch): labels on every token (a language-modelling loss
    that reads logits at every position)."""
    ids = data["input_ids"]
    return {"input_ids": ids, "attention_mask": data["attention_mask"], "labels": ids}


ANSWER_TOKENS = 8


def answer_labels(data: dict) -> dict:
    """A generative task's teacher-forced loss: labels on the last ANSWER_TOKENS tokens
    of each row (SQuAD's answers), so logits are needed at those positions only."""
    ids = data["input_ids"]
    labels = torch.full_like(ids, -100)
    labels[:, -ANSWER_TOKENS:] = ids[:, -ANSWER_TOKENS:]
    return {"input_ids": ids, "attention_mask": data["attention_mask"], "labels": labels}


def live_peak(prof) -> int:
    """The highest sum of live tensor bytes over a profile, from its allocation events."""
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def measure(mode: str, model_name: str, dtype: str, batch: int, seq: int,
            loss: str = "classification", tensors: bool = False) -> dict:
    from step_overhead import build_model, make_batch

    from edgezo.config.options import EstimatorOptions
    from edgezo.config.rules import estimate_of
    from edgezo.models.loading import compute_dtype, parse_dtype
    from edgezo.tasks.loss import example_losses
    from edgezo.zo import graphs
    from edgezo.zo.engine import ZOEngine
    from edgezo.zo.optimizers import make_optimizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    baseline = psutil.Process().memory_info().rss
    model = build_model(model_name, parse_dtype(dtype), device)
    if device.type == "cpu":
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # the loader's freed temporaries
    data = {k: v.to(device) for k, v in
            make_batch(model.config.get_text_config().vocab_size, batch, seq).items()}
    if loss == "lm":
        data = lm_labels(data)
    elif loss == "answer":
        data = answer_labels(data)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    weights = sum(t.numel() * t.element_size()
                  for t in [*model.parameters(), *model.buffers()])
    # The profiler starts before the engine exists, so the table and every buffer a step
    # keeps are counted as they are allocated.
    profiler = (torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                       profile_memory=True)
                if tensors and device.type == "cpu" else contextlib.nullcontext())
    with profiler:
        if mode == "inference":
            with torch.no_grad():
                for _ in range(3):
                    example_losses(model, data).mean().item()
        else:
            noise = "table" if mode.endswith(("table", "graph")) else "generator"
            estimate = estimate_of(EstimatorOptions(eps=1e-3, noise=noise), "zo-sgd",
                                   compute_dtype(model))
            engine = ZOEngine(model, make_optimizer("zo-sgd"), estimate,
                              loss_fn=example_losses, seed=0, pair=mode.startswith("zo-pair"))
            graphed = mode.endswith("graph")
            why = graphs.attach(engine) if graphed else None
            if why is not None:
                raise SystemExit(f"{mode}: {why}")
            for _ in range(5 if graphed else 3):  # a graph: recorded, captured, replayed
                engine.step(data, lr=1e-6)
            engine.close()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    elif tensors:
        peak = weights + live_peak(profiler)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    return {"mode": mode, "peak_bytes": peak, "weights_bytes": weights, "device": str(device)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32", "fp16"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--loss", default="classification",
                    choices=["classification", "lm", "answer"],
                    help="lm: labels on every token (logits at every position); answer: "
                         f"on the last {ANSWER_TOKENS} tokens (a generative task's answer)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="processes per mode (the resident set varies between processes)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one mode
    ap.add_argument("--tensors", action="store_true", help=argparse.SUPPRESS)  # internal
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    if args.one:
        print(json.dumps(measure(args.one, args.model, args.dtype, args.batch, args.seq,
                                 args.loss, args.tensors)))
        return
    from edgezo.device.hardware import cpu_capability, preferred_dtype

    if args.dtype == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        args.dtype = preferred_dtype(None, "bf16", device)[0]
    print(f"CPU: {cpu_capability()}")

    def run(mode: str, tensors: bool) -> dict:
        cmd = [sys.executable, __file__, "--one", mode, "--model", args.model,
               "--dtype", args.dtype, "--batch", str(args.batch), "--seq", str(args.seq),
               "--loss", args.loss] + (["--tensors"] if tensors else [])
        # The profiler sees the thread that started it only: keep the noise pool there.
        env = {**os.environ, "EDGEZO_NOISE_THREADS": "1"} if tensors else None
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        return json.loads(out.stdout.strip().splitlines()[-1])

    modes = ("inference", "zo-pair", "zo-two", "zo-pair-table", "zo-two-table") + (
        ("zo-pair-graph",) if torch.cuda.is_available() else ())
    # Round-robin, so a drift of the machine reaches every mode alike.
    peaks: dict[str, list[int]] = {m: [] for m in modes}
    for _ in range(args.repeat):
        for mode in modes:
            last = run(mode, False)
            peaks[mode].append(last["peak_bytes"])
    on_cpu = last["device"] == "cpu"
    tensor_peaks = {m: run(m, True)["peak_bytes"] for m in modes} if on_cpu else {}
    mib = 1024**2
    base = statistics.median(peaks["inference"])
    print(f"{args.model} {args.dtype}, batch {args.batch} x {args.seq} tokens, {args.loss} loss, "
          f"device {last['device']}, weights {last['weights_bytes'] / mib:.0f} MiB, "
          f"{args.repeat} processes a mode")
    head = "resident set" if on_cpu else "max allocated"
    print(f"  {'':14s} {head + ': median (range)':>34s}  ratio" +
          ("    tensors   ratio" if on_cpu else ""))
    for mode in modes:
        med = statistics.median(peaks[mode])
        line = (f"  {mode:14s} {med / mib:8.1f} MiB ({min(peaks[mode]) / mib:.1f}-"
                f"{max(peaks[mode]) / mib:.1f})  {med / base:.3f}")
        if on_cpu:
            t = tensor_peaks[mode]
            line += f"  {t / mib:7.1f} MiB  {t / tensor_peaks['inference']:.3f}"
        print(line)
    print("  goal: zo-pair-table (the default) / inference <= 1.05")


if __name__ == "__main__":
    main()
