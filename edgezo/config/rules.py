"""The rules between options, each stated once: an option that would be accepted and then
do nothing, or two options that contradict each other, is refused with its fix.

`RunConfig.validate()` runs them all. `estimate_of` checks and decides the estimator
options of an engine built directly; the planner reads `why_not_stream`, the CLI and
`Session.resume` read `resume_problem`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from edgezo.config.defaults import DEFAULT_EPS, resolve_estimator
from edgezo.config.options import RESUMABLE
from edgezo.errors import ConfigError
from edgezo.models.catalog import SCHEMES, scale_backends
from edgezo.tasks.catalog import CUSTOM_OBJECTIVE, OBJECTIVES
from edgezo.zo.methods import OPTIMIZERS, STRUCTURED, Estimate

if TYPE_CHECKING:
    from edgezo.config.options import EstimatorOptions
    from edgezo.config.runconfig import RunConfig


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def rules(cfg: RunConfig) -> list[str]:
    """Every problem of a configuration whose single values are each valid (the optimizer
    is a registered one)."""
    name = cfg.optimizer.optimizer
    return (_scheme_problems(cfg) + _optimizer_problems(cfg)
            + estimator_problems(cfg.estimator, name) + _objective_problems(cfg)
            + _schedule_problems(cfg) + streaming_problems(cfg) + _run_folder_problems(cfg))


def _scheme_problems(cfg: RunConfig) -> list[str]:
    out = []
    scheme, defaults = cfg.scheme.scheme, type(cfg.scheme)()
    for owner in SCHEMES.values():
        for option in owner.options if owner.name != scheme else ():
            if cfg.get(option) != getattr(defaults, option):
                out.append(f"{option} applies to the {owner.name} scheme, not {scheme}; drop "
                           f"it or use --scheme {owner.name}")
    quantize = cfg.model.quantize
    if quantize is not None and not SCHEMES[scheme].on_quantized:
        out.append(f"{quantize} weights cannot take ZO updates; train adapters on the "
                   "quantized base with --scheme lora (or prefix, prompt, head), or its "
                   "scales with --scheme scales")
    if SCHEMES[scheme].quantized_scales:
        if quantize not in scale_backends():
            out.append("--scheme scales trains the per-group scales of a quantized base: add "
                       f"--quantize {' or '.join(scale_backends())}"
                       + (" (LLM.int8 keeps no group scales)" if quantize == "int8" else ""))
        if not cfg.method.perturbs:
            out.append(f"--scheme scales trains by ZO estimates; {cfg.optimizer.optimizer} "
                       "would backpropagate through the quantized weights: pick a ZO "
                       "optimizer")
    if cfg.scheme.qat is not None:
        if not SCHEMES[scheme].qat:
            out.append(f"--qat trains full weights or LoRA for the quantized forward; "
                       f"--scheme {scheme} has none to quantize: use full or lora")
        if quantize is not None:
            out.append("--qat keeps a higher-precision master and quantizes it in every "
                       "forward; --quantize already fixed the base: drop one of them")
        if not cfg.zo_only:
            out.append(f"--qat applies ZO updates to its master; {cfg.optimizer.optimizer}"
                       f"{' with --fo-blocks' if cfg.estimator.fo_blocks else ''} "
                       "differentiates the loss: pick a ZO optimizer")
    if cfg.estimator.g_clip is not None and not cfg.method.perturbs:
        out.append(f"--g-clip clips ZO estimates; {cfg.optimizer.optimizer} makes none: "
                   "drop it")
    return out


def _optimizer_problems(cfg: RunConfig) -> list[str]:
    o = cfg.optimizer
    return OPTIMIZERS[o.optimizer].option_problems(
        weight_decay=o.weight_decay, momentum=o.momentum, betas=o.betas, adam_eps=o.adam_eps)


def estimator_problems(est: EstimatorOptions, optimizer: str) -> list[str]:
    """Estimator options the optimizer would not use, and contradictions among them."""
    out = _unused_estimator_options(est, optimizer)
    if OPTIMIZERS[optimizer].backprops:
        return out
    return out + _zo_estimator_problems(est, optimizer)


def _unused_estimator_options(est: EstimatorOptions, optimizer: str) -> list[str]:
    """Options an FO or forward-gradient method has no use for."""
    method = OPTIMIZERS[optimizer]
    default = type(est)()
    unused = []
    if method.backprops:
        unused = [o for o in ("q", "estimate", "directions", "noise", "block_wise",
                              "sparsity", "fo_blocks", "rank", "basis_every", "structured_z")
                  if getattr(est, o) != getattr(default, o)]
    elif method.forward_gradient and est.estimate not in (None, "two-sided"):
        unused = ["estimate"]
    if not method.perturbs and est.eps is not None:
        unused.append("eps")
    out = []
    if unused:
        verb = "does not apply" if len(unused) == 1 else "do not apply"
        out.append(f"{' and '.join(unused)} {verb} to {optimizer} ({method.description}); "
                   f"drop {'it' if len(unused) == 1 else 'them'} or pick a ZO optimizer")
    if est.pair is not None and not method.perturbs:
        out.append(f"--pair/--two-pass choose how ZO evaluates L(θ ± εz); {optimizer} makes "
                   "no such pair: drop the option")
    return out


def _zo_estimator_problems(est: EstimatorOptions, optimizer: str) -> list[str]:
    """Contradictions among the options of a ZO or forward-gradient estimate."""
    method = OPTIMIZERS[optimizer]
    default = type(est)()
    r = resolve_estimator(est, optimizer)
    out = []
    if est.pair and r.estimate == "one-sided":
        out.append("--pair evaluates L(θ + εz) and L(θ − εz) in one doubled forward; a "
                   "one-sided estimate has no L(θ − εz): drop --pair or use --estimate "
                   "two-sided")
    for option in ("rank", "basis_every", "structured_z"):
        if getattr(est, option) is not None and r.directions not in STRUCTURED:
            out.append(f"{option} shapes lowrank and subspace directions; add --directions "
                       "lowrank (or subspace) or drop it")
    if est.hessian_smoothing is not None and not method.curvature:
        out.append(f"hessian_smoothing is the Hessian estimate's moving-average weight of "
                   f"hizoo and hizoo-l, not {optimizer}: drop it")
    if method.normalized and (r.q or 2) < 2:
        out.append(f"{optimizer} divides its step by the spread of its queries' estimates; "
                   "it needs --q 2 or more")
    if method.curvature and (r.q != 1 or r.estimate != "two-sided"):
        out.append(f"{optimizer} reads one curvature a step from L(θ) and L(θ ± εz): it "
                   "takes --q 1 and the two-sided estimate")
    if est.max_forwards != default.max_forwards and r.directions != "coordinate":
        out.append("--max-forwards limits coordinate-wise estimates; add --directions "
                   "coordinate or drop it")
    if r.directions == "coordinate":
        bad = [why for why, present in (
            (f"{optimizer} ({method.description})", not method.perturbs or method.curvature
             or method.normalized),
            ("--block-wise", est.block_wise), ("--sparsity", est.sparsity > 0)) if present]
        if bad:
            out.append(f"coordinate directions estimate one value's partial derivative per "
                       f"query; they do not combine with {', '.join(bad)}: use zo-sgd, "
                       "zo-sgd-sign, zo-sgd-mmt, zo-sgd-cons or zo-adam on one group")
    if est.granularity != "layer" and not est.block_wise:
        out.append("granularity chooses the groups of block-wise ZO; add --block-wise "
                   "(block_wise=True) or drop it")
    if est.sparsity == 0 and (est.sparsity_mask != "random" or est.sparsity_every != 0):
        out.append("sparsity_mask and sparsity_every shape sparse perturbations; set "
                   "--sparsity S (0 < S < 1) or drop them")
    return out


def _objective_problems(cfg: RunConfig) -> list[str]:
    name = cfg.estimator.objective
    if name == CUSTOM_OBJECTIVE:  # the caller's function: not known to be differentiable
        return [] if cfg.method.perturbs else [
            f"{cfg.optimizer.optimizer} differentiates the loss; an objective function of "
            "your own needs a ZO optimizer (it may not be differentiable)"]
    if name not in OBJECTIVES:
        return [str(OBJECTIVES.unknown(name))]
    objective = OBJECTIVES[name]
    if not objective.differentiable and not cfg.method.perturbs:
        return [f"{cfg.optimizer.optimizer} differentiates the loss; the {name} "
                "objective needs a ZO optimizer (it is not differentiable)"]
    if objective.writes and cfg.estimator.pair:
        return [f"the {name} objective writes answers with a KV cache, which pair mode's "
                "doubled batch cannot share: drop --pair (it runs in two passes)"]
    if objective.writes and cfg.runtime.distributed:
        return [f"the {name} objective writes every answer of a batch in one process; drop "
                "--distributed, or train on the answer tokens (--objective ce)"]
    return []


def _schedule_problems(cfg: RunConfig) -> list[str]:
    opt = cfg.optimizer
    if opt.schedule == "constant" and opt.total_steps is not None:
        return ["--total-steps sets where a linear or cosine schedule reaches 0; the "
                "constant schedule has no such point: drop it or pick --schedule linear "
                "or cosine"]
    return []


def resume_problem(changed: Iterable[str]) -> str | None:
    """A resumed run is the same run: only the options that do not alter its updates
    (RESUMABLE) may change. The message names the others given."""
    refused = sorted(set(changed) - RESUMABLE)
    if not refused:
        return None
    return (f"--resume keeps the run's own settings; drop "
            f"{', '.join(_flag(name) for name in refused)} (only "
            f"{', '.join(_flag(name) for name in sorted(RESUMABLE))} may change)")


def why_not_stream(cfg: RunConfig) -> list[str]:
    """Why this run's layers cannot stream (empty: they can). The planner streams only
    runs without reasons; a run that asks to stream and has one is refused with it."""
    out = []
    if cfg.scheme.qat is not None:
        out.append("--qat keeps every master on the host and does not stream layers "
                   "yet: use --offload off, or a larger profile")
    quanto = (cfg.model.quantize or "").startswith("quanto-")
    if SCHEMES[cfg.scheme.scheme].quantized_scales or quanto:
        out.append("layers of a quanto base, or trained scales, do not stream yet: use "
                   "--offload off, or a larger profile")
    if not cfg.zo_only:
        hybrid = " with --fo-blocks" if cfg.estimator.fo_blocks else ""
        out.append(f"streaming runs ZO estimates only; {cfg.optimizer.optimizer}{hybrid} "
                   "differentiates the loss and needs every weight on the device: pick a ZO "
                   "optimizer, or a bigger profile")
    if cfg.estimator.sparsity and cfg.estimator.sparsity_mask == "magnitude":
        out.append("magnitude sparsity masks read every weight when drawn; with streaming "
                   "use --sparsity-mask random")
    return out


def streaming_problems(cfg: RunConfig) -> list[str]:
    """Streaming options that would be ignored, and runs that cannot stream."""
    s, out = cfg.streaming, []
    if s.offload == "off" and (s.stream_layers or s.offload_dir or s.stream_masters != "auto"):
        out.append("--stream-layers, --offload-dir and --stream-masters are for streaming; "
                   "--offload off forbids it: drop them")
    if s.offload == "host" and s.offload_dir:
        out.append("--offload-dir holds the disk tier's files; --offload host keeps layers in "
                   "memory: drop one of them")
    if cfg.streams:
        out += why_not_stream(cfg)
    if cfg.runtime.distributed and not cfg.zo_only:
        out.append(f"data-parallel training runs ZO estimates only; "
                   f"{cfg.optimizer.optimizer} differentiates the loss: run it on one process")
    return out


def _run_folder_problems(cfg: RunConfig) -> list[str]:
    t = cfg.train
    out = []
    if t.keep_best and not t.eval_every:
        out.append(f"{_flag('keep_best')} picks among the periodic validations: add "
                   f"{_flag('eval_every')} N")
    if t.keep_best and t.average_last:
        out.append(f"{_flag('keep_best')} and {_flag('average_last')} each choose the final "
                   "weights: keep one")
    if t.output is not None:
        return out
    given = [n for n in ("save_model", "checkpoint_every", "keep") if getattr(t, n) is not None]
    if given:
        out.append(f"{' and '.join(_flag(n) for n in given)} set what goes into a run "
                   "folder; add --output DIR or drop them")
    return out


def estimate_of(est: EstimatorOptions, optimizer: str, dtype: str,
                scheme: str | None = None) -> Estimate:
    """The engine's settings from a run's estimator options: refused with the first problem
    the rules find, then every open value decided (`dtype`: the one the model computes
    in)."""
    problems = estimator_problems(est, optimizer)
    if problems:
        raise ConfigError(problems[0])
    r = resolve_estimator(est, optimizer, dtype, scheme)
    structured = r.directions in STRUCTURED
    return Estimate(
        eps=DEFAULT_EPS if r.eps is None else r.eps, q=r.q,
        one_sided=r.estimate == "one-sided", directions=r.directions, noise=r.noise,
        rank=r.rank if structured else 0, basis_every=r.basis_every or 1, g_clip=r.g_clip,
        chunked_z=r.structured_z == "chunked",
        block_wise=r.block_wise, granularity=r.granularity, sparsity=r.sparsity,
        sparsity_mask=r.sparsity_mask, sparsity_every=r.sparsity_every,
        fo_blocks=tuple(r.fo_blocks), max_forwards=r.max_forwards)
