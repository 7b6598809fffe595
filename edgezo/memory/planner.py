"""The one plan path: a RunConfig and a model (built on the meta device from its config,
or the live one) become a StepSpec, which `peak.plan_step` prices.

    priced = meta_model(config, model_config)         # shapes and dtypes, no storage
    decision = decide(config, priced, profile, shapes) # pair or two passes, what streams
    plan_run(config, shapes)                           # `edgezo plan`: + largest batch, advice

`edgezo plan`, a Session's refusal before loading any weight, and the Session's live plan
all go through `step_spec`, so they price a run the same way. When nothing fits, the
planner prices the changes that would: a smaller batch, LoRA instead of full, an NF4
base, streaming, a larger profile.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from edgezo.config.defaults import resolve_estimator
from edgezo.config.options import EstimatorOptions
from edgezo.config.rules import why_not_stream
from edgezo.config.runconfig import RunConfig
from edgezo.device.profiles import Profile, list_profiles, load_profile
from edgezo.errors import ConfigError
from edgezo.memory.peak import FOPart, Plan, StepSpec, StreamPart, plan_step
from edgezo.memory.streaming import layer_bytes, stream_tier, streamed_layers
from edgezo.models.catalog import SCHEMES
from edgezo.models.loading import load_config, parse_dtype
from edgezo.models.quantized import stored_bytes
from edgezo.models.schemes import apply_scheme
from edgezo.tasks.catalog import OBJECTIVES
from edgezo.zo import bases, qat, workers
from edgezo.zo.batch import Shape
from edgezo.zo.blocks import (
    BlockMap,
    backward_depth,
    build_block_map,
    find_layers,
    pair_splits_layers,
    resolve_fo_blocks,
    weight_grad_layers,
)
from edgezo.zo.chunking import is_matrix
from edgezo.zo.direction import FACTOR_SLOTS, Direction
from edgezo.zo.methods import STRUCTURED
from edgezo.zo.optimizers import OPTIMIZERS, RULES
from edgezo.zo.perturb import CHUNKED_LINEAR_DEVICES

MAX_BATCH = 4096


@dataclass(frozen=True)
class Shapes:
    """The batch geometry of the two planned phases (Session measures it from the data)."""

    train: Shape
    eval: Shape | None = None


@dataclass
class Priced:
    """A model as the planner sees it: its modules (meta or live) and blocks; `quantize`
    when a meta model's linear maps are priced as bitsandbytes would store them (a live
    quantized model carries its real bytes)."""

    model: nn.Module
    blocks: BlockMap
    quantize: str | None = None


@dataclass
class Decision:
    """What a run does under its budget, and the plan of that."""

    pair: bool
    streamed: int  # how many decoder layers stream
    plan: Plan


def quantized_weight_bytes(model: nn.Module, quantize: str) -> int:
    """Bytes of the weights once the backend has quantized the layers' linear maps
    (quantized.stored_bytes: codes, scales and shifts of each format). Embeddings, norms,
    the LM head and adapters stay in the compute dtype. A `zo_scale` placeholder (the
    scales scheme) is part of its weight's stored bytes, not counted again."""
    _, layers = find_layers(model)
    # the base model's linear maps; adapters added on top stay in the compute dtype
    quantized = {id(m.weight) for m in layers.modules()
                 if isinstance(m, nn.Linear) and not m.weight.requires_grad}
    trained = "trained" if any(n.endswith("zo_scale") for n, _ in model.named_parameters()) \
        else "frozen"
    total, seen = 0, set()
    for name, p in model.named_parameters():
        if id(p) in seen or name.endswith("zo_scale"):
            continue
        seen.add(id(p))
        if id(p) not in quantized:
            total += p.numel() * p.element_size()
        else:
            total += stored_bytes(p.shape, quantize, trained)
    return total + sum(b.numel() * b.element_size() for b in model.buffers())


_META: dict[tuple, tuple] = {}  # key -> (model, blocks, the model config the key's id names)


def meta_model(config: RunConfig, model_config, dtype: str) -> Priced:
    """The configured model with its scheme on the meta device (cached per model config,
    scheme options and dtype): a 70B config is priced in about a second."""
    from transformers import AutoModelForCausalLM

    scheme = config.scheme
    key = (id(model_config), repr(scheme), dtype, config.model.quantize)
    if key not in _META:
        if len(_META) > 16:
            _META.clear()
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(
                model_config, dtype=parse_dtype(dtype),
                trust_remote_code=config.model.trust_remote_code)
            model = apply_scheme(model.eval(), scheme, quantize=config.model.quantize)
        _META[key] = (model, build_block_map(model), model_config)
    model, blocks, _ = _META[key]
    return Priced(model, blocks, config.model.quantize)


def live_model(model: nn.Module, blocks: BlockMap) -> Priced:
    return Priced(model, blocks)


def pool_threads(est: EstimatorOptions, blocks: BlockMap, fo: set[int]) -> int:
    """The noise pool's threads a CPU step uses: only work that draws from torch's
    generator goes there (workers.parallel_map), and each thread keeps its buffers."""
    bf16 = any(p.dtype == torch.bfloat16 for p in blocks.params)
    draws = (bool(fo) and bf16) or Direction(
        (0,), (1.0,), kind=est.directions, source=est.noise,
        chunked=est.structured_z == "chunked").draws(bf16)
    return workers.pool_threads(draws)


def step_spec(config: RunConfig, priced: Priced, profile: Profile, shapes: Shapes, *,
              pair: bool, streamed: int) -> StepSpec:
    """The planner's inputs for one decision: THE builder every plan goes through."""
    method, blocks = config.method, priced.blocks
    est = resolve_estimator(config.estimator, config.optimizer.optimizer, config.model.dtype,
                            config.scheme.scheme)
    fo = (set(range(len(blocks.params))) if method.backprops
          else resolve_fo_blocks(blocks, est.fo_blocks))
    on_cuda = profile.device == "cuda" and torch.cuda.is_available()
    sizes = layer_bytes(blocks)
    layers = streamed_layers(len(sizes), streamed)
    stream = None
    if layers:
        tier = stream_tier(config.streaming.offload, profile,
                           sum(sizes[i].total for i in layers))
        stream = StreamPart(tuple(layers), tier, config.streaming.stream_masters)
    return StepSpec(
        train=shapes.train, eval=shapes.eval, pair=pair and method.perturbs, on_cuda=on_cuda,
        optimizer_state_bytes=RULES[method.rule].state_bytes([p.shape for p in blocks.params]),
        noise_threads=1 if on_cuda else pool_threads(est, blocks, fo), sparsity=est.sparsity > 0,
        fo=FOPart(sum(blocks.params[i].numel() for i in fo), backward_depth(blocks, fo),
                  weight_grad_layers(blocks, fo)) if fo else None,
        split_layers=pair_splits_layers(blocks, fo, est.block_wise),
        forward_grad=method.forward_gradient, perturbs=method.draws_directions, stream=stream,
        noise_table=method.draws_directions and (est.noise == "table" or (  # an exact
            est.structured_z == "exact" and any(p.dtype == torch.bfloat16  # z's bf16 dither
                                                for p in blocks.params))),
        fuses=method.draws_directions and est.directions != "coordinate",
        noise_table_bf16=not on_cuda and any(p.dtype == torch.bfloat16 for p in blocks.params)
        and (est.directions or "gaussian") == "gaussian"
        and not est.sparsity and not method.curvature,  # Direction.perturbation_chunk
        cheap_noise=(est.noise == "table" or est.directions in STRUCTURED)
        and ("cuda" if on_cuda else "cpu") in CHUNKED_LINEAR_DEVICES,
        direction_bases=basis_bytes(blocks, est, 1 if on_cuda else pool_threads(est, blocks, fo),
                                    on_cuda)
        if method.draws_directions else 0,
        qat_bytes=qat.extra_bytes(priced.model, SCHEMES[config.scheme.scheme].adapts_linears)
        if config.scheme.qat else 0)


def basis_bytes(blocks: BlockMap, est: EstimatorOptions, threads: int = 1,
                on_cuda: bool = False) -> int:
    """The lowrank V / subspace (P, Q) factors bases.basis keeps: r values per column (and
    per row, subspace; r = bases.rank_of, a narrow matrix's own) of every matrix, for two
    basis seeds while one replaces the other.
    An exact z adds each drawing thread's per-query factors of the largest matrix
    (Direction.factors keeps up to FACTOR_SLOTS queries': a lowrank U, r values a row; a
    subspace core product, r a column) and on a GPU the fused path's copy of one
    query's, its places in the table (int64) and each piece's kept layout of them (two
    int32 a value; fused_grid.py)."""
    kind, rank = est.directions, est.rank
    if kind not in STRUCTURED:
        return 0
    total = largest = factors = 0
    for p in blocks.params:
        if is_matrix(p.shape):
            rows, cols = p.shape[0], p.shape[1:].numel()
            r = bases.rank_of(kind, rank, rows, cols)
            total += (cols + (rows if kind == "subspace" else 0)) * r
            largest = max(largest, r * (rows if kind == "lowrank" else cols + r))
            factors += r * (rows if kind == "lowrank" else r)
    if est.structured_z == "chunked":
        return 2 * 4 * total
    fused = 12 * largest + 8 * factors if on_cuda else 0
    return 2 * 4 * total + 4 * largest * FACTOR_SLOTS * (threads + 1) + fused


def price(config: RunConfig, priced: Priced, profile: Profile, shapes: Shapes, *,
          pair: bool, streamed: int = 0) -> Plan:
    """The plan of one configuration (no decisions); `streamed` layers stream."""
    spec = step_spec(config, priced, profile, shapes, pair=pair, streamed=streamed)
    plan = plan_step(priced.model, priced.blocks, profile, spec)
    if priced.quantize and spec.stream is None:
        plan.components["weights"] = quantized_weight_bytes(priced.model, priced.quantize)
        if plan.eval_components is not None:
            plan.eval_components["weights"] = plan.components["weights"]
    return plan


def layer_count(priced: Priced) -> int:
    return len(layer_bytes(priced.blocks))


def streamed_count(config: RunConfig, priced: Priced, profile: Profile, shapes: Shapes,
                   pair: bool, budget: bool = True) -> int:
    """How many layers stream: as asked, all when a tier is forced, else (under a
    budget) the fewest that make the plan fit: 0 when it fits resident, when the run
    cannot stream, or when even streaming all does not fit."""
    n, s = layer_count(priced), config.streaming
    if s.stream_layers is not None:
        if s.stream_layers > n:
            raise ConfigError(f"--stream-layers must be in 0..{n} (the model's layers), got "
                              f"{s.stream_layers}")
        return 0 if s.offload == "off" else s.stream_layers
    if config.streams:
        return n
    if config.streams is False or not budget or not can_stream(config):
        return 0

    def fits(k: int) -> bool:
        return price(config, priced, profile, shapes, pair=pair, streamed=k).fits

    if fits(0) or not fits(n):
        return 0
    lo, hi = 0, n  # lo does not fit, hi fits
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


def can_stream(config: RunConfig) -> bool:
    """Whether the run's layers may stream (the config's rules say why not, once)."""
    return not why_not_stream(config)


def decide(config: RunConfig, priced: Priced, profile: Profile, shapes: Shapes,
           budget: bool = True) -> Decision:
    """Pair mode or two passes, and what streams: the first mode that fits, streaming as
    few layers as it needs. Without a budget: pair mode, and only forced streaming."""
    estimate = resolve_estimator(config.estimator, config.optimizer.optimizer).estimate
    method = OPTIMIZERS[config.optimizer.optimizer]
    objective = OBJECTIVES.get(config.estimator.objective)
    writes = objective is not None and objective.writes  # one sign at a time
    zo_pair = method.pairs(one_sided=estimate == "one-sided") and not writes
    modes = ([config.estimator.pair] if config.estimator.pair is not None
             else [True, False] if zo_pair else [False])
    for pair in modes:
        k = streamed_count(config, priced, profile, shapes, pair, budget)
        plan = price(config, priced, profile, shapes, pair=pair, streamed=k)
        if plan.fits or not budget:
            break
    s = config.streaming
    if not k and (s.offload_dir or s.stream_masters != "auto"):
        given = [f for f, on in (("--offload-dir", s.offload_dir),
                                 ("--stream-masters", s.stream_masters != "auto")) if on]
        raise ConfigError(f"{' and '.join(given)} set how layers stream, and under this plan "
                          "none does (the weights fit): drop them, or stream with --offload "
                          "disk (or host on a GPU)")
    return Decision(pair, k, plan)


def largest_batch(config: RunConfig, priced: Priced, profile: Profile, shapes: Shapes,
                  pair: bool, streamed: int = 0) -> int:
    """Binary search on the batch size (the plan grows monotonically with it)."""
    def fits(b: int) -> bool:
        train = replace(shapes.train, batch_size=b)
        return price(config, priced, profile, replace(shapes, train=train), pair=pair,
                     streamed=streamed).fits

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= MAX_BATCH and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, MAX_BATCH + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


@dataclass
class PlanResult:
    config: RunConfig
    shapes: Shapes
    decision: Decision
    max_batch_size: int  # largest batch that fits in the chosen mode (0: none)
    alternatives: list[dict]

    @property
    def plan(self) -> Plan:
        return self.decision.plan

    def to_dict(self) -> dict:
        return {"config": self.config.to_dict(), "shapes": asdict(self.shapes),
                "plan": self.plan.to_dict(), "max_batch_size": self.max_batch_size,
                "alternatives": self.alternatives}


def plan_run(config: RunConfig, shapes: Shapes, model_config=None,
             profile: Profile | None = None, budget: bool = True) -> PlanResult:
    """Decide pair/two-pass, what streams and the largest batch from the model's config
    alone; price the alternatives when it does not fit."""
    profile = profile or load_profile(config.runtime.profile)
    model_config = model_config or load_config(config.model.model,
                                               config.model.trust_remote_code)
    dtype = config.model.dtype or profile.dtype
    priced = meta_model(config, model_config, dtype)
    decision = decide(config, priced, profile, shapes, budget)
    best = largest_batch(config, priced, profile, shapes, decision.pair, decision.streamed)
    advice = [] if decision.plan.fits or not budget else _alternatives(
        config, model_config, profile, shapes, dtype, decision.pair)
    return PlanResult(config, shapes, decision, best, advice)


def _alternatives(config: RunConfig, model_config, profile: Profile, shapes: Shapes,
                  dtype: str, pair: bool) -> list[dict]:
    """Single changes priced against the budget, in the order a user would try them."""
    out = []

    def add(change: str, cfg: RunConfig = config, prof: Profile = profile,
            shp: Shapes = shapes, mode: bool = False) -> None:
        try:
            priced = meta_model(cfg, model_config, cfg.model.dtype or dtype)
            p = price(cfg, priced, prof, shp, pair=mode)
        except ConfigError:
            return
        out.append({"change": change, "predicted_total_bytes": p.total_bytes,
                    "budget_bytes": p.budget_bytes, "fits": p.fits})

    priced = meta_model(config, model_config, dtype)
    if pair:
        add("two forward passes instead of pair mode", mode=False)
    best = largest_batch(config, priced, profile, shapes, False)
    if 0 < best < shapes.train.batch_size:
        add(f"--batch-size {best}", shp=replace(shapes, train=replace(shapes.train,
                                                                      batch_size=best)))
    ev = shapes.eval
    if ev is not None and ev.batch_size > 1:
        current = price(config, priced, profile, shapes, pair=False)
        if current.phases["eval"] > current.phases["train"]:  # evaluation sets the peak
            smaller = replace(ev, batch_size=max(1, ev.batch_size // 4))
            add(f"--eval-batch-size {smaller.batch_size}", shp=replace(shapes, eval=smaller))
    if not SCHEMES[config.scheme.scheme].on_quantized:  # cannot train on a quantized base
        add("--scheme lora", config.override(scheme="lora"))
        add("--scheme lora --quantize nf4", config.override(scheme="lora", quantize="nf4"))
    elif config.model.quantize != "nf4":
        add("--quantize nf4", config.override(quantize="nf4"))
    n = layer_count(priced)
    if config.streaming.offload == "off" and can_stream(config) and n:
        for k in (n // 2, n):
            p = price(config.override(offload="auto"), priced, profile, shapes, pair=False,
                      streamed=k)
            out.append({"change": f"stream {k} of {n} layers from {p.streaming['tier']} "
                        "(--offload auto)", "predicted_total_bytes": p.total_bytes,
                        "budget_bytes": p.budget_bytes, "fits": p.fits})
    if dtype == "fp32":
        add("--dtype bf16", config.override(dtype="bf16"))
    for prof in sorted((load_profile(n) for n in list_profiles()),
                       key=lambda p: p.budget_bytes):
        if prof.device == profile.device and prof.budget_bytes > profile.budget_bytes:
            p = price(config, priced, prof, shapes, pair=False)
            if p.fits:
                add(f"--profile {prof.name}", prof=prof)
                break
    return out


def price_config(config: RunConfig, shapes: Shapes, *, pair: bool, streamed: int = 0) -> Plan:
    """A configuration's plan from its model's config alone, for a given decision."""
    config.validate()
    profile = load_profile(config.runtime.profile)
    model_config = load_config(config.model.model, config.model.trust_remote_code)
    priced = meta_model(config, model_config, config.model.dtype or profile.dtype)
    return price(config, priced, profile, shapes, pair=pair, streamed=streamed)
