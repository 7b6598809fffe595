"""The defaults a run decides when an option is left open (None): its method's q,
estimate and directions, ε by compute precision, the bases of structured directions.
`RunConfig.resolved()` applies them, and the engine applies them to options it is given
directly, so both read the same values."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from edgezo.zo.methods import OPTIMIZERS, STRUCTURED

if TYPE_CHECKING:
    from edgezo.config.options import EstimatorOptions

DEFAULT_LR = 1e-5  # where nothing was measured for the method and scheme
# (optimizer, scheme) -> the learning rate that measured best on SmolLM2-135M SST-2 here,
# batch 16, selected on validation (BENCHMARKS.md, "Time to accuracy"). ZO-SGD full:
# with ZO-Bench's prompt 3e-5 rose to 0.75 validation by step 750 and 1e-4 diverged
# within 150 steps; with the natural prompt (the default then) 3e-5 gave 0.830 validation
# at step 100 against 0.805 for 1e-5, and 0.850 (test 0.830) at step 500. The movie prompt
# (the default since) kept 3e-5 without a new grid: 82.1-86.0% test at step 1000.
# ZO-SGD scales (QZO, quanto int4, 100 steps): 3e-6 rose to 0.66 validation, 3e-5 fell
# to 0.49-0.56.
# First-order adapters and FO-SGD: the rates the cpu-standard suite selected on validation
# (SST-2, ZO-Bench's prompt, 100 steps, batch 8; docs/bench/cpu-standard-tables.md), where
# the fallback's 1e-5 barely moves an adapter that starts at zero. FO-Adam LoRA at 1e-3:
# 81.0 validation, 86.0 test. The ZO adapter cells stayed at the majority class at every
# rate tried there. ZO-SGD LoRA with the natural prompt (bf16, ε 1e-2, 200 steps, batch
# 16; BENCHMARKS.md "ZO LoRA's rate"): 1e-3 rose from 0.795 to 0.810 validation, 1e-4 to
# 0.800, and 1e-2 fell to 0.470. ZO-SGD prefix and prompt, the same setup (BENCHMARKS.md
# "ZO prefix and prompt rates"): prefix at 1e-3 held 0.870 validation over 200 steps
# (from 0.880 at its initialisation) where 1e-2 fell to 0.790; prompt at 1e-2 rose from
# 0.845 to 0.865-0.870, at 1e-3 to 0.850-0.855.
MEASURED_LR = {("zo-sgd", "full"): 3e-5, ("zo-sgd", "lora"): 1e-3, ("fo-adam", "full"): 1e-5,
               ("zo-sgd", "prefix"): 1e-3, ("zo-sgd", "prompt"): 1e-2,
               ("zo-sgd", "scales"): 3e-6,
               ("fo-adam", "lora"): 1e-3, ("fo-adam", "prefix"): 1e-3,
               ("fo-adam", "prompt"): 1e-3,
               ("fo-sgd", "full"): 1e-3, ("fo-sgd", "lora"): 1e-2,
               ("fo-sgd", "prefix"): 1e-1, ("fo-sgd", "prompt"): 1e-1}
# Longest tokenized example: 256 tokens, or a task's own where its prompts are longer
# (SQuAD: a paragraph and a question, 192 tokens at the median with SmolLM2's tokenizer,
# 20% of them over 256 and 1% over 512; truncating cuts the paragraph's start).
DEFAULT_MAX_LENGTH = 256
TASK_MAX_LENGTH = {"squad": 512}


def default_max_length(task: str | None) -> int:
    return TASK_MAX_LENGTH.get(task or "", DEFAULT_MAX_LENGTH)


DEFAULT_EPS = 1e-3  # fp32 compute; half precision needs a larger one (default_eps)
HALF_EPS = 1e-2
DEFAULT_RANK = {"lowrank": 2, "subspace": 8}
DEFAULT_BASIS_EVERY = {"lowrank": 50, "subspace": 1000}
DEFAULT_HESSIAN_SMOOTHING = 1e-6
# QZO's clipping of g for --scheme scales (see BENCHMARKS.md, "Quantized fine-tuning")
DEFAULT_SCALES_G_CLIP = 100.0
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
                f"{scheme} (BENCHMARKS.md); --lr to change")
    return (f"Learning rate {lr:g}, a fallback: nothing was measured for {optimizer} "
            f"{scheme}, and it may barely move the weights; choose --lr on validation "
            "(a search grid in `edgezo bench`)")


def resolve_estimator(est: EstimatorOptions, optimizer: str, dtype: str | None = None,
                      scheme: str | None = None) -> EstimatorOptions:
    """The estimator options a run uses: each left open takes its method's default.

    ε: 1e-3 in fp32; in bf16/fp16 1e-2, because a smaller perturbation's effect on the
    activations rounds away (measured on SmolLM2 LoRA, 8 steps: the bf16 estimates'
    correlation with fp32's is 0.07 at ε = 1e-3 and 0.89 at 1e-2). Full fine-tuning's
    estimates correlate at 0.99 at both over 8 steps, but over 1000 (SmolLM2 SST-2, bf16,
    BENCHMARKS.md) 1e-3 peaked at step 500 (validation 0.845) and fell to 0.780, where 1e-2
    held 0.835-0.855. Scales (QZO) take 1e-3 in any dtype: they are 0.01-0.1, so the
    half-precision ε would be 10-100% of one."""
    method = OPTIMIZERS[optimizer]
    out = dataclasses.replace(est)
    if method.estimator == "fo":
        return out
    if out.eps is None and method.estimator == "zo":
        half = dtype in ("bf16", "fp16") and scheme != "scales"
        out.eps = HALF_EPS if half else DEFAULT_EPS
    out.directions = out.directions or method.directions
    if out.q is None and out.directions != "coordinate":  # coordinate: all, as the engine counts
        out.q = method.q
    out.estimate = out.estimate or method.estimate
    if out.directions in STRUCTURED:
        out.rank = out.rank or DEFAULT_RANK[out.directions]
        out.basis_every = out.basis_every or DEFAULT_BASIS_EVERY[out.directions]
    if method.curvature and out.hessian_smoothing is None:
        out.hessian_smoothing = DEFAULT_HESSIAN_SMOOTHING
    return out
