"""ZO step time relative to two plain forward passes, edgezo vs a MeZO-style reference.

All three are timed side by side in one process, on the same model and batch, so the
ratios are comparable even on a noisy shared machine:

    edgezo ratio = edgezo ZO-SGD step / (2 × plain forward of the batch), for each noise
                   source (torch's generator, the shared table)
    MeZO ratio   = MeZO-style step   / (2 × plain forward of the batch)
    speed-up     = MeZO ratio / edgezo ratio (of the first step timed; before the steps
                   were timed alternately with the forwards, MeZO step / edgezo step)

Each step is timed alternately with the two forwards, and divided by the forwards timed
beside it: a shared machine's speed drifts by 15% or more within one run.

The MeZO-style reference follows MeZO's trainer: perturb every parameter in place by +εz,
forward, −2εz, forward, +εz, then update along z, regenerating z from the seed with the
global generator in the parameter dtype each of the four times. It uses the same loss
(last-position logits only), so the comparison isolates the step's mechanics.

    python benchmarks/step_overhead.py [--model smollm2] [--batch 16] [--seq 64] [--repeats 5]

--dtype auto (the default) computes as a run would on this CPU: fp32 where bf16 is not
native. The first line printed is the CPU's instruction set: compare figures only within
one run on one machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time

import torch

from edgezo.config.options import EstimatorOptions
from edgezo.config.rules import estimate_of
from edgezo.device.hardware import cpu_capability, preferred_dtype
from edgezo.models.loading import compute_dtype, load_model
from edgezo.models.tiny import tiny_model
from edgezo.tasks.loss import example_losses
from edgezo.zo import chunking, fused, graphs, perturb
from edgezo.zo.engine import ZOEngine
from edgezo.zo.optimizers import make_optimizer

# Shapes of larger models, built with random weights right on the device (no download,
# no disk): the step's time and memory depend only on the shapes.
RANDOM_SHAPES = {
    # TinyLlama-1.1B's: 22 layers, hidden 2048, grouped-query attention
    "llama-1.1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                       num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                       tie_word_embeddings=False),
}


def build_model(spec: str, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """`spec`: smollm2 (or a path: loaded), tiny:<family>, or random:<shape> (RANDOM_SHAPES,
    built in `dtype` on `device`)."""
    if spec.startswith("tiny:"):
        return tiny_model(spec.split(":", 1)[1], dtype=dtype).to(device)
    if spec.startswith("random:"):
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(**RANDOM_SHAPES[spec.split(":", 1)[1]])
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(default)
        return model.eval()
    return load_model(spec, dtype, device).model


def make_batch(vocab: int, batch: int, seq: int, seed: int = 0, labels: str = "last"
               ) -> dict:
    """Random tokens; `labels` "last": a two-way choice read at the last position (the
    classification loss), "all": a language-modelling loss on every token."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
    if labels == "all":
        return {**out, "labels": ids.clone()}
    return {**out, "candidate_ids": torch.randint(3, vocab, (batch, 2), generator=g),
            "gold": torch.randint(0, 2, (batch,), generator=g)}


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median wall time of `fn`; on CUDA the queue is drained before and after each call,
    so a figure is the step's own time, not the time to enqueue it."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class MezoReference:
    """MeZO's step: in-place ±εz on the master weights, z regenerated four times."""

    def __init__(self, model, eps: float, lr: float):
        self.model, self.eps, self.lr = model, eps, lr
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.step_index = 0

    def _perturb(self, seed: int, scale: float) -> None:
        torch.manual_seed(seed)
        for p in self.params:
            z = torch.normal(0, 1, size=p.shape, dtype=p.dtype, device=p.device)
            p.data.add_(z, alpha=scale)

    @torch.no_grad()
    def step(self, batch: dict) -> float:
        seed = 1_000_003 * self.step_index
        self._perturb(seed, self.eps)
        plus = example_losses(self.model, batch).mean().item()
        self._perturb(seed, -2 * self.eps)
        minus = example_losses(self.model, batch).mean().item()
        self._perturb(seed, self.eps)
        g = (plus - minus) / (2 * self.eps)
        torch.manual_seed(seed)
        for p in self.params:
            z = torch.normal(0, 1, size=p.shape, dtype=p.dtype, device=p.device)
            p.data.add_(z, alpha=-self.lr * g)
        self.step_index += 1
        return g


@contextlib.contextmanager
def cuda_path():
    """The GPU's code path, on whatever device: perturbed scratch copies (no linear maps
    computed from z), a unit's parameters fused (zo/fused.py), spans of CUDA's size."""
    linear, span = perturb.CHUNKED_LINEAR_DEVICES, dict(chunking.SPAN_ELEMENTS)
    fuses = fused.FUSED_DEVICES
    perturb.CHUNKED_LINEAR_DEVICES = ()
    fused.FUSED_DEVICES = (*fuses, "cpu")
    chunking.SPAN_ELEMENTS["cpu"] = chunking.SPAN_ELEMENTS["cuda"]
    try:
        yield
    finally:
        perturb.CHUNKED_LINEAR_DEVICES = linear
        fused.FUSED_DEVICES = fuses
        chunking.SPAN_ELEMENTS.clear()
        chunking.SPAN_ELEMENTS.update(span)


def engine_for(model, noise: str, pair: bool = True) -> ZOEngine:
    """`noise`: generator, table, or a structured direction (lowrank, subspace); graph:
    the table with each pair forward a CUDA graph (edgezo.zo.graphs)."""
    if noise == "graph":
        engine = engine_for(model, "table", pair)
        why = graphs.attach(engine)
        if why is not None:
            engine.close()
            raise SystemExit(f"the graph row cannot run: {why}")
        return engine
    est = (EstimatorOptions(eps=1e-3, directions=noise) if noise in ("lowrank", "subspace")
           else EstimatorOptions(eps=1e-3, noise=noise))
    return ZOEngine(model, make_optimizer("zo-sgd"),
                    estimate_of(est, "zo-sgd", compute_dtype(model)), loss_fn=example_losses,
                    seed=0, pair=pair)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", help="smollm2, a path, or tiny:<family>")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32", "fp16"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="auto: cuda when a GPU is visible, else cpu")
    ap.add_argument("--rows", default=None,
                    type=lambda v: [r for r in v.split(",") if r],
                    help="the edgezo steps to time (comma-separated, from generator, table, "
                         "two-pass, lowrank, subspace, fused, graph; two-pass uses the "
                         "table; fused is the table through the GPU's path (cuda_path) on "
                         "this device; graph, on a GPU, the table with each pair forward "
                         "a CUDA graph; default: all but fused, graph only on a GPU)")
    ap.add_argument("--labels", default="last", choices=["last", "all"],
                    help="last: a classification loss at the last position; all: a "
                         "language-modelling loss on every token (the head at every "
                         "position)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    known = ("generator", "table", "two-pass", "lowrank", "subspace", "fused", "graph")
    device = torch.device(args.device if args.device != "auto"
                          else "cuda" if torch.cuda.is_available() else "cpu")
    if args.rows is None:
        args.rows = ["generator", "table", "two-pass", "lowrank", "subspace"] + (
            ["graph"] if device.type == "cuda" else [])
    if not args.rows or set(args.rows) - set(known):
        ap.error(f"--rows takes one or more of {', '.join(known)}")
    name = (preferred_dtype(None, "bf16", device)[0] if args.dtype == "auto"
            else args.dtype)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[name]
    model = build_model(args.model, dtype, device)
    batch = {k: v.to(device) for k, v in
             make_batch(model.config.get_text_config().vocab_size, args.batch,
                        args.seq, labels=args.labels).items()}

    @torch.no_grad()
    def two_forwards() -> None:
        example_losses(model, batch).mean().item()
        example_losses(model, batch).mean().item()

    def paired(fn) -> tuple[float, float]:
        """Medians of `fn` and of the two forwards, timed alternately: each ratio divides
        by forwards measured beside it, as the machine's speed drifts within a run."""
        pairs = [(timed(fn, 1, device), timed(two_forwards, 1, device))
                 for _ in range(args.repeats)]
        return (statistics.median(a for a, _ in pairs),
                statistics.median(b for _, b in pairs))

    steps = {}
    rows = {"generator": ("generator", True), "table": ("table", True),
            "two-pass": ("table", False), "lowrank": ("lowrank", True),
            "subspace": ("subspace", True), "fused": ("fused", True),
            "graph": ("graph", True)}
    for noise, pair in (rows[r] for r in args.rows):
        with cuda_path() if noise == "fused" else contextlib.nullcontext():
            engine = engine_for(model, "table" if noise == "fused" else noise, pair)
            # warm-up: page in the weights, first copy-on-write, caches; a graph's forward
            # is recorded at the second step (the first applies no update), captured at
            # the third
            for _ in range(4 if noise == "graph" else 2):
                engine.step(batch, lr=1e-7)
            steps[(noise, pair)] = paired(lambda e=engine: e.step(batch, lr=1e-7))
            engine.close()
    mezo = MezoReference(model, eps=1e-3, lr=1e-7)
    mezo.step(batch)
    t_mezo = paired(lambda: mezo.step(batch))
    t_fwd = statistics.median(f for _, f in [*steps.values(), t_mezo])
    report(args, name, device, t_fwd, steps, t_mezo)


def report(args, dtype: str, device: torch.device, t_fwd: float, steps: dict,
           t_mezo: tuple[float, float]) -> None:
    """Each ratio: a step's median over the median of the two forwards timed beside it."""
    first = next(iter(steps))
    ratio = {key: t / f for key, (t, f) in steps.items()}
    mezo_ratio = t_mezo[0] / t_mezo[1]
    result = {
        "model": args.model, "dtype": dtype, "batch": args.batch, "seq": args.seq,
        "labels": args.labels,
        "threads": torch.get_num_threads(), "cpu": cpu_capability(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "machine": platform.processor() or platform.machine(),
        "two_forwards_s": t_fwd, "mezo_step_s": t_mezo[0],
        **{f"edgezo_{'pair' if pair else 'two_pass'}_{noise}_step_s": t
           for (noise, pair), (t, _) in steps.items()},
        **{f"edgezo_{'pair' if pair else 'two_pass'}_{noise}_ratio": r
           for (noise, pair), r in ratio.items()},
        "mezo_ratio": mezo_ratio, "speedup_vs_mezo": mezo_ratio / ratio[first],
        "cuda_span_values": chunking.SPAN_ELEMENTS.get("cuda", 0),
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"CPU: {result['cpu']}; computing on {result['device']}")
    print(f"{args.model} {dtype}, batch {args.batch} x {args.seq} tokens, labels "
          f"{args.labels}, "
          f"{result['threads']} threads, median of {args.repeats}, each step timed "
          "alternately with two plain forwards")
    print(f"  {'':32s} {'step':>8s}   {'forwards':>8s}   ratio")
    for (noise, pair), (t, f) in steps.items():
        label = f"edgezo step ({'pair' if pair else 'two-pass'}, {noise})"
        print(f"  {label:32s} {t:8.3f} s {f:8.3f} s   {t / f:.2f}")
    print(f"  {'MeZO-style step':32s} {t_mezo[0]:8.3f} s {t_mezo[1]:8.3f} s   {mezo_ratio:.2f}")
    print(f"  speed-up of edgezo ({first[0]}) over MeZO-style "
          f"{mezo_ratio / ratio[first]:.2f}x")
    if device.type == "cuda":
        print(f"  noise spans on CUDA: {result['cuda_span_values']} values "
              "(EDGEZO_CUDA_SPAN; 0: chunk by chunk)")


if __name__ == "__main__":
    main()
