"""The defaults a run decides when an option is left open (None): its method's q,
estimate and directions, ε by compute precision, the bases of structured directions, the
learning rate measured for its method and scheme. `RunConfig.resolved()` applies them to
a run and `rules.estimate_of` to an engine built directly, so both read the same values.
The measured ones, with their sources, are a data file: measured.yaml."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from edgezo.models.catalog import SCHEMES
from edgezo.zo.methods import OPTIMIZERS, STRUCTURED

if TYPE_CHECKING:
    from edgezo.config.options import EstimatorOptions

DEFAULT_LR = 1e-5  # where nothing was measured for the method and scheme
# The measured defaults and their sources (learning rates, ε, QZO's clip): a data file.
MEASURED_FILE = Path(__file__).with_name("measured.yaml")
MEASURED = yaml.safe_load(MEASURED_FILE.read_text(encoding="utf-8"))
MEASURED_LR = {(row["optimizer"], row["scheme"]): float(row["lr"])
               for row in MEASURED["learning_rates"]}
LR_SOURCE = {(row["optimizer"], row["scheme"]): row["source"]
             for row in MEASURED["learning_rates"]}
# Longest tokenized example: 256 tokens, or a task's own where its prompts are longer
# (SQuAD's paragraphs: truncating one cuts its start; BENCHMARKS.md, "Generative tasks").
DEFAULT_MAX_LENGTH = 256
TASK_MAX_LENGTH = {"squad": 512}


def default_max_length(task: str | None) -> int:
    return TASK_MAX_LENGTH.get(task or "", DEFAULT_MAX_LENGTH)


DEFAULT_EPS = float(MEASURED["eps"]["fp32"]["value"])
HALF_EPS = float(MEASURED["eps"]["half"]["value"])  # bf16/fp16 compute
DEFAULT_RANK = {"lowrank": 2, "subspace": 8}
DEFAULT_BASIS_EVERY = {"lowrank": 50, "subspace": 1000}
DEFAULT_HESSIAN_SMOOTHING = 1e-6
DEFAULT_SCALES_G_CLIP = float(MEASURED["scales_g_clip"]["value"])
DEFAULT_CHECKPOINT_EVERY = 100
DEFAULT_KEEP = 3


def default_lr(optimizer: str, scheme: str) -> float:
    """The learning rate a run takes when --lr is not given: the one measured best for
    its optimizer and scheme where one was, else DEFAULT_LR."""
    return MEASURED_LR.get((optimizer, scheme), DEFAULT_LR)


def lr_reason(optimizer: str, scheme: str) -> str:
    """Why a run left at the default rate takes it. A fallback that was never measured can
    leave the weights where they started (ZO adapters at 1e-5 stay at the majority class),
    so the run says so before it spends its steps."""
    lr = default_lr(optimizer, scheme)
    if (optimizer, scheme) in MEASURED_LR:
        return (f"Learning rate {lr:g}, the rate measured best here for {optimizer} "
                f"{scheme} ({LR_SOURCE[optimizer, scheme].split(':')[0]}); --lr to change")
    return (f"Learning rate {lr:g}, a fallback: nothing was measured for {optimizer} "
            f"{scheme}, and it may barely move the weights; choose --lr on validation "
            "(a search grid in `edgezo bench`)")


def resolve_estimator(est: EstimatorOptions, optimizer: str, dtype: str | None = None,
                      scheme: str | None = None) -> EstimatorOptions:
    """The estimator options a run uses: each left open takes its method's default.

    ε by the precision the model computes in (measured.yaml, with its sources): in
    bf16/fp16 a small perturbation's effect on the activations rounds away, so half
    precision takes the larger one. Scales (QZO) take the fp32 value in any precision:
    the half-precision ε would be a large part of a scale."""
    method = OPTIMIZERS[optimizer]
    if method.backprops:
        return est
    decided = {}
    if est.eps is None and method.perturbs:
        half = dtype in ("bf16", "fp16") and not (scheme and SCHEMES[scheme].quantized_scales)
        decided["eps"] = HALF_EPS if half else DEFAULT_EPS
    directions = decided["directions"] = est.directions or method.directions
    if est.q is None and directions != "coordinate":  # coordinate: all, as the engine counts
        decided["q"] = method.q
    decided["estimate"] = est.estimate or method.estimate
    if directions in STRUCTURED:
        decided["rank"] = est.rank or DEFAULT_RANK[directions]
        decided["basis_every"] = est.basis_every or DEFAULT_BASIS_EVERY[directions]
        decided["structured_z"] = est.structured_z or "exact"
    if method.curvature and est.hessian_smoothing is None:
        decided["hessian_smoothing"] = DEFAULT_HESSIAN_SMOOTHING
    return dataclasses.replace(est, **decided)
