"""Does the budget hold on a real GPU? The issue's CUDA check.

A random Llama too large for the profile (by default width 4096 x 32 layers, about 9.7 GB
of bf16 weights against 8gb-gpu's 7.2 GiB budget) trains under the profile, its decoder
layers streamed as the plan decides, with the caching allocator capped at the budget
(`torch.cuda.set_per_process_memory_fraction`, as every run on a GPU profile). Prints the
plan (streamed layers, predicted peak per phase) beside the allocator's allocated and
reserved peaks per phase, and checks that the reserved peak stayed under the budget.

    python benchmarks/gpu_budget.py [--width 4096] [--layers 32] [--batch 4] [--steps 3]

It needs CUDA. `--cpu` runs the same code with the profile emulated on the CPU (small
sizes: a check of the plumbing, not of the cap). The guard's clean stop of a step that
crosses the budget, with its checkpoint, is tested in tests/unit/run/test_session.py.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

MiB = 1024**2


def _phases(session) -> str:
    """Each phase's plan beside its peak: on CUDA the allocator's allocated and reserved
    peaks, on the CPU the resident memory above the pre-load baseline."""
    plan = session.plan.phases
    out = []
    for name, measured in session.monitor.peaks.items():
        reserved = session.monitor.reserved_peaks.get(name)
        predicted = plan.get(name)
        out.append(f"  {name:5s} predicted {predicted / MiB if predicted else float('nan'):9.1f}"
                   f" MiB  measured {measured / MiB:9.1f} MiB"
                   + (f"  reserved {reserved / MiB:9.1f} MiB" if reserved else ""))
    return "\n".join(out)


def run(args) -> int:
    import torch

    from edgezo import Session
    from edgezo.models.tiny import save_tiny

    folder = Path(tempfile.mkdtemp(prefix="edgezo-gpu-budget-")) / "llama"
    print(f"writing a random Llama, width {args.width} x {args.layers} layers, bf16, to "
          f"{folder}", flush=True)
    save_tiny(str(folder), "llama", dtype=torch.bfloat16, width=args.width, layers=args.layers)
    s = Session(str(folder), profile=args.profile, task="sst2", lr=1e-6,
                batch_size=args.batch)
    st = s.plan.streaming
    print(f"plan: {len(st['layers']) if st else 0} of {args.layers} layers streamed"
          + (f" from {st['tier']}" if st else "") + f"; budget {s.profile.budget_bytes / MiB:.0f}"
          f" MiB; predicted peak {s.plan.peak_bytes / MiB:.1f} MiB", flush=True)
    for _ in range(args.steps):
        r = s.step()
        print(f"step {r.step + 1}: loss {r.loss:.4f}", flush=True)
    s.evaluate("validation", max_examples=args.eval_examples)
    print(_phases(s))
    worst = max(s.monitor.reserved_peaks.values(), default=max(s.monitor.peaks.values()))
    held = worst <= s.profile.budget_bytes
    print(f"largest peak {'reserved' if s.monitor.reserved_peaks else 'measured'} "
          f"{worst / MiB:.1f} MiB against the budget {s.profile.budget_bytes / MiB:.0f} MiB: "
          + ("held" if held else "NOT HELD"))
    s.close()
    return 0 if held else 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="8gb-gpu")
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--eval-examples", type=int, default=32)
    ap.add_argument("--cpu", action="store_true",
                    help="run without CUDA, the profile emulated (plumbing only)")
    args = ap.parse_args()
    from edgezo.device.hardware import cpu_capability

    print(f"CPU: {cpu_capability()}", flush=True)  # bf16 speed differs 4x+ by instruction set
    import torch

    if not torch.cuda.is_available() and not args.cpu:
        sys.exit("gpu_budget.py measures the CUDA allocator's cap: run it on a GPU, or pass "
                 "--cpu to check the plumbing with the profile emulated")
    sys.exit(run(args))


if __name__ == "__main__":
    main()
