"""`edgezo plan`: the memory plan of a run from the model's config alone.

The model is built on the meta device (shapes and dtypes, no storage), the scheme is
applied to it, and the same arithmetic as a live run's plan (`plan.plan_step`) prices
it, so a 70B config is planned in about a second. The planner then decides what a run
would do — pair mode or two passes, the largest batch that fits — and, when nothing fits,
prices the changes that would: a smaller batch, LoRA instead of full, an NF4 base, a
larger profile.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from edgezo.errors import ConfigError, unknown_choice
from edgezo.memory.plan import MASTERS, Plan, Shape, layer_bytes, plan_step, streamed_layers
from edgezo.models.loading import QUANTIZATIONS, load_config, parse_dtype
from edgezo.profiles import Profile, list_profiles, load_profile
from edgezo.schemes import SchemeOptions, apply_scheme, check_scheme
from edgezo.zo import noise
from edgezo.zo.blocks import (
    backward_depth,
    build_block_map,
    find_layers,
    pair_splits_layers,
    resolve_fo_blocks,
    weight_grad_layers,
)
from edgezo.zo.engine import ZOEngine
from edgezo.zo.optimizers import make_optimizer

MAX_BATCH = 4096
OFFLOAD = ("auto", "off", "host", "disk")


def stream_tier(offload: str, profile: Profile, layer_total: int) -> str:
    """Where streamed layers live: pinned host memory on a GPU when it holds them (with
    10% to spare), else the disk; on a CPU the disk (the host is the device)."""
    if offload in ("host", "disk"):
        return offload
    if profile.device == "cuda" and layer_total <= 0.9 * profile.host_memory_bytes:
        return "host"
    return "disk"


@dataclass
class PlanRequest:
    model: str | None
    profile: str = "8gb-gpu"
    scheme: str = "full"
    optimizer: str = "zo-sgd"
    quantize: str | None = None
    dtype: str | None = None
    batch_size: int = 16
    seq_len: int = 256
    pair: bool | None = None
    sparsity: float = 0.0
    fo_blocks: list[str | int] = field(default_factory=list)
    block_wise: bool = False
    offload: str = "auto"  # auto | off | host | disk
    stream_layers: int | None = None  # how many layers stream (None: as the budget needs)
    stream_masters: str = "auto"  # auto | fp32 | model: streamed trainable tensors' masters
    trust_remote_code: bool = False
    # a task's batch geometry (Session measures it from the data; see plan.Shape)
    rows_per_example: int = 1
    logit_positions: int = 1
    eval_shape: Shape | None = None


@dataclass
class PlanResult:
    request: PlanRequest
    plan: Plan
    max_batch_size: int  # largest batch that fits in the chosen mode (0: none)
    alternatives: list[dict]

    def to_dict(self) -> dict:
        return {"request": asdict(self.request), "plan": self.plan.to_dict(),
                "max_batch_size": self.max_batch_size, "alternatives": self.alternatives}


def quantized_weight_bytes(model: nn.Module, quantize: str) -> int:
    """Bytes of the weights once bitsandbytes has quantized the layers' linear maps.

    NF4 with double quantization: 4 bits a weight, one 8-bit absmax per 64 weights and
    one fp32 constant per 256 absmax blocks. int8: one byte a weight and one fp32 scale
    per output row. Embeddings, norms and the LM head stay in the compute dtype.
    """
    _, layers = find_layers(model)
    # the base model's linear maps; adapters added on top stay in the compute dtype
    quantized = {id(m.weight) for m in layers.modules()
                 if isinstance(m, nn.Linear) and not m.weight.requires_grad}
    total = 0
    seen: set[int] = set()
    for m in model.modules():
        for p in m.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if id(p) not in quantized:
                total += p.numel() * p.element_size()
            elif quantize == "nf4":
                total += p.numel() // 2 + p.numel() // 64 + 4 * (p.numel() // (64 * 256) + 1)
            else:
                total += p.numel() + 4 * p.shape[0]
    return total + sum(b.numel() * b.element_size() for b in model.buffers())


def _meta_model(request: PlanRequest, config, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, trust_remote_code=request.trust_remote_code)
        return apply_scheme(model.eval(), request.scheme, SchemeOptions())


_MODELS: dict[tuple, tuple] = {}  # (config id, scheme, dtype) -> (meta model, blocks)


def _priced_model(request: PlanRequest, config, dtype: torch.dtype):
    key = (id(config), request.scheme, dtype)
    if key not in _MODELS:
        if len(_MODELS) > 16:
            _MODELS.clear()
        model = _meta_model(request, config, dtype)
        _MODELS[key] = (model, build_block_map(model), config)  # config kept: id stays valid
    return _MODELS[key][:2]


def price(request: PlanRequest, config=None, profile: Profile | None = None,
          pair: bool = True, streamed: int = 0) -> Plan:
    """The plan of one configuration (no decisions); `streamed` layers stream."""
    if request.offload not in OFFLOAD:
        raise unknown_choice("offload", request.offload, OFFLOAD)
    if request.stream_masters not in MASTERS:
        raise unknown_choice("stream masters", request.stream_masters, MASTERS)
    if request.quantize is not None and request.quantize not in QUANTIZATIONS:
        raise unknown_choice("quantization", request.quantize, QUANTIZATIONS)
    check_scheme(request.scheme, SchemeOptions())
    if request.quantize and request.scheme == "full":
        raise ConfigError("a quantized base cannot take full fine-tuning; use an adapter scheme")
    profile = profile or load_profile(request.profile)
    config = config if config is not None else load_config(request.model,
                                                           request.trust_remote_code)
    dtype = parse_dtype(request.dtype or profile.dtype)
    optimizer = make_optimizer(request.optimizer)
    # the same refusals as a run: no option priced that the optimizer would not use
    ZOEngine._check_options(optimizer, 1, "two-sided", "gaussian", request.block_wise,
                            request.sparsity, request.fo_blocks)
    model, blocks = _priced_model(request, config, dtype)
    fo = (set(range(len(blocks.params))) if optimizer.estimator == "fo"
          else resolve_fo_blocks(blocks, request.fo_blocks))
    on_cuda = profile.device == "cuda" and torch.cuda.is_available()
    n_layers = len(layer_bytes(blocks))
    layers = streamed_layers(n_layers, streamed)
    if layers and (optimizer.estimator != "zo" or fo):
        raise ConfigError(f"streaming runs ZO estimates only; {request.optimizer}"
                          f"{' with --fo-blocks' if fo else ''} needs every weight on the "
                          "device: pick a ZO optimizer, or a bigger profile")
    sizes = layer_bytes(blocks)
    tier = stream_tier(request.offload, profile, sum(sizes[i].total for i in layers))
    plan = plan_step(model, blocks, profile, batch_size=request.batch_size,
                     seq_len=request.seq_len, pair=pair and optimizer.estimator == "zo",
                     on_cuda=on_cuda, optimizer_state_bytes=optimizer.state_bytes_per_param,
                     noise_threads=1 if on_cuda else noise.worker_threads(),
                     sparsity=request.sparsity > 0,
                     fo_params=sum(blocks.params[i].numel() for i in fo),
                     backward_layers=backward_depth(blocks, fo),
                     weight_grad_layers=weight_grad_layers(blocks, fo),
                     split_layers=pair_splits_layers(blocks, fo, request.block_wise),
                     forward_grad=optimizer.estimator == "forward-grad",
                     stream_layers=layers, stream_tier=tier,
                     rows_per_example=request.rows_per_example,
                     logit_positions=request.logit_positions, eval_shape=request.eval_shape,
                     perturbs=optimizer.estimator != "fo",
                     stream_masters=request.stream_masters)
    if request.quantize and not layers:
        plan.components["weights"] = quantized_weight_bytes(model, request.quantize)
        if plan.eval_components is not None:
            plan.eval_components["weights"] = plan.components["weights"]
    return plan


def _largest_batch(request: PlanRequest, config, profile: Profile, pair: bool,
                   streamed: int = 0) -> int:
    """Binary search on the batch size (the plan grows monotonically with it)."""
    def fits(b: int) -> bool:
        r = PlanRequest(**{**request.__dict__, "batch_size": b})
        return price(r, config, profile, pair, streamed).fits

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


def _layer_count(request: PlanRequest, config, profile: Profile) -> int:
    model, blocks = _priced_model(request, config, parse_dtype(request.dtype or profile.dtype))
    return len(layer_bytes(blocks))


def streamed_count(request: PlanRequest, config, profile: Profile, pair: bool) -> int:
    """How many layers stream: as asked, all when a tier is forced, else the fewest that
    make the plan fit (0 when it fits resident or when even streaming all does not)."""
    n = _layer_count(request, config, profile)
    if request.offload == "off":
        return 0
    if request.stream_layers is not None:
        if not 0 <= request.stream_layers <= n:
            raise ConfigError(f"--stream-layers must be in 0..{n} (the model's layers), got "
                              f"{request.stream_layers}")
        return request.stream_layers
    if request.offload in ("host", "disk"):
        return n
    if price(request, config, profile, pair).fits or make_optimizer(
            request.optimizer).estimator != "zo" or request.fo_blocks:
        return 0
    if not price(request, config, profile, pair, n).fits:
        return 0
    lo, hi = 0, n  # lo does not fit, hi fits
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if price(request, config, profile, pair, mid).fits else (mid, hi)
    return hi


def plan_run(request: PlanRequest) -> PlanResult:
    """Decide pair/two-pass, which layers stream and the largest batch; price
    alternatives if it does not fit."""
    profile = load_profile(request.profile)
    config = load_config(request.model, request.trust_remote_code)
    zo = make_optimizer(request.optimizer).estimator == "zo"
    modes = [request.pair] if request.pair is not None else ([True, False] if zo else [False])
    for pair in modes:  # the first mode that fits, streaming as few layers as it needs
        k = streamed_count(request, config, profile, pair)
        plan = price(request, config, profile, pair, k)
        if plan.fits:
            break
    max_batch = _largest_batch(request, config, profile, pair, k)
    alternatives = [] if plan.fits else _alternatives(request, config, profile, pair)
    return PlanResult(request, plan, max_batch, alternatives)


def zo_only(request: PlanRequest) -> bool:
    return make_optimizer(request.optimizer).estimator == "zo" and not request.fo_blocks


def _alternatives(request: PlanRequest, config, profile: Profile, pair: bool) -> list[dict]:
    out = []

    def add(change: str, r: PlanRequest, prof: Profile = profile, mode: bool = False) -> None:
        try:
            p = price(r, config, prof, pair=mode)
        except ConfigError:
            return
        out.append({"change": change, "predicted_total_bytes": p.total_bytes,
                    "budget_bytes": p.budget_bytes, "fits": p.fits})

    base = request.__dict__
    if pair:
        add("two forward passes instead of pair mode", request, mode=False)
    best = _largest_batch(request, config, profile, False)
    if 0 < best < request.batch_size:
        add(f"--batch-size {best}", PlanRequest(**{**base, "batch_size": best}))
    ev = request.eval_shape
    if ev is not None and ev.batch_size > 1:
        current = price(request, config, profile, pair=False)
        if current.phases["eval"] > current.phases["train"]:  # evaluation sets the peak
            smaller = replace(ev, batch_size=max(1, ev.batch_size // 4))
            add(f"--eval-batch-size {smaller.batch_size}",
                PlanRequest(**{**base, "eval_shape": smaller}))
    if request.scheme == "full":
        add("--scheme lora", PlanRequest(**{**base, "scheme": "lora"}))
        add("--scheme lora --quantize nf4",
            PlanRequest(**{**base, "scheme": "lora", "quantize": "nf4"}))
    elif request.quantize != "nf4":
        add("--quantize nf4", PlanRequest(**{**base, "quantize": "nf4"}))
    n = _layer_count(request, config, profile)
    if request.offload == "off" and zo_only(request) and n:
        for k in (n // 2, n):
            add_stream = price(request, config, profile, False, k)
            out.append({"change": f"stream {k} of {n} layers from "
                        f"{add_stream.streaming['tier']} (--offload auto)",
                        "predicted_total_bytes": add_stream.total_bytes,
                        "budget_bytes": add_stream.budget_bytes, "fits": add_stream.fits})
    if (request.dtype or profile.dtype) == "fp32":
        add("--dtype bf16", PlanRequest(**{**base, "dtype": "bf16"}))
    bigger = sorted((load_profile(n) for n in list_profiles()),
                    key=lambda p: p.budget_bytes)
    for prof in bigger:
        if prof.device == profile.device and prof.budget_bytes > profile.budget_bytes:
            p = price(request, config, prof, pair=False)
            if p.fits:
                add(f"--profile {prof.name}", request, prof)
                break
    return out
