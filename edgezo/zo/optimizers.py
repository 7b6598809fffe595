"""Optimizers: a gradient estimator plus an update rule, each a small class.

The estimator says where the gradient estimate d comes from:

- "zo": two-point (or one-sided) zeroth-order estimates, d = (1/q)·Σ g_i·z_i, kept as
  seeds and q scalars and regenerated chunk by chunk (never stored);
- "forward-grad": the forward gradient, g_i = ∇L·v_i by forward-mode AD (torch.func.jvp),
  d = (1/q)·Σ g_i·v_i, regenerated the same way;
- "fo": the backpropagated gradient (the first-order baselines, and the FO blocks of
  hybrid ZO/FO).

The update rule turns d into a change of θ, one chunk of one parameter at a time, so
the same rule code serves every estimator: FO-Adam and ZO-Adam differ only in d.
Every rule declares the bytes of state it keeps per trainable parameter (fp32,
whatever the model dtype), which the memory planner counts.

Weight decay is L2 (λ·θ added to d before the rule), as torch.optim.SGD and Adam do, so
fo-sgd and fo-adam are exactly torch's SGD and Adam (tested against them).

Adding an optimizer: a line in edgezo.zo.methods, and a Rule subclass here (in RULES) if
its update is new.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from edgezo.errors import ConfigError
from edgezo.registry import OPTIMIZERS
from edgezo.zo import chunking, workers
from edgezo.zo.methods import RULE_DEFAULTS, Method

_LOW16 = 0xFFFF


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision updates and optimizer state use: fp32, or fp64 for fp64 weights."""
    return torch.promote_types(dtype, torch.float32)


def fp32_copy(param: torch.Tensor) -> torch.Tensor:
    """What a rule computes the new value in: the parameter itself when it is fp32 or fp64
    (updated in place: one pass over the weights, the same arithmetic), else a copy in
    fp32 in this thread's reusable buffer (the update path allocates nothing: freed blocks
    in worker threads' malloc arenas would otherwise stay resident)."""
    if param.dtype in (torch.float32, torch.float64):
        return param
    out = workers.thread_buffer("fp32", param.numel(), work_dtype(param.dtype), param.device)
    return out.view(param.shape).copy_(param)


def store(param: torch.Tensor, new: torch.Tensor, bits: torch.Tensor | None) -> None:
    """Write fp32 values `new` into `param`, rounding stochastically when param is bf16.

    A ZO update η·g·z is often smaller than half a bf16 ulp of the weight it changes, so
    round-to-nearest would drop most of it, every step, in the same direction. Stochastic
    rounding keeps the update unbiased. The dither is the low 16 bits of `bits`: for
    Gaussian directions the fp32 z already drawn (free, and a pure function of the seed,
    so replay gives the same weights); for an exact structured z, whose grid values have
    mostly zero low bits, the table's values at a salted place; otherwise seeded random
    integers.
    fp32 parameters are stored exactly; fp16 ones round to nearest.
    """
    if new is param:  # fp32/fp64: updated in place already
        return
    if param.dtype != torch.bfloat16 or bits is None:
        param.copy_(new)
        return
    word = new.view(torch.int32)
    dither = workers.thread_buffer("dither", new.numel(), torch.int32, new.device).view(new.shape)
    torch.bitwise_and(bits.reshape(new.shape), _LOW16, out=dither)
    # Adding a uniform 16-bit dither to the magnitude, then truncating the low 16 bits,
    # rounds the magnitude up with probability equal to the dropped fraction.
    word.add_(dither).bitwise_and_(~_LOW16)
    param.copy_(new)  # exact: the value is representable in bf16


class Rule(ABC):
    """Base of the update rules. `update` gets one chunk: the parameter rows (model
    dtype), d on those rows (fp32, may be modified in place, except by a rule whose
    `linear_in_d` is True: its d may be a view of the shared noise table), the step's lr,
    the step number t (1-based), the parameter index and first row, and the rounding
    bits."""

    name = "rule"
    state_bytes_per_param = 0
    stateful = False  # False: an lr = 0 step changes nothing and can be skipped

    def __init__(self, weight_decay: float = 0.0):
        self.weight_decay = weight_decay  # ranges: RunConfig's fields
        self.state: dict[str, list[torch.Tensor]] = {}

    def linear_in_d(self) -> bool:
        """Whether update(p, c·z, η) equals update(p, z, η·c) (up to fp32 rounding): then
        a caller holding d = c·z passes z and folds c into the rate, which saves the pass
        that writes d over every trainable weight."""
        return False

    def init_state(self, params: list[torch.Tensor]) -> None:  # noqa: B027 - stateless
        """Allocate the state up front, so its memory shows from the first step (stateless
        rules keep none)."""

    def _zeros(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.zeros(chunking.num_rows(p.shape), p[0].numel() if p.dim() else 1,
                            dtype=work_dtype(p.dtype), device=p.device) for p in params]

    def _grad(self, theta: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        if self.weight_decay:
            d.add_(theta, alpha=self.weight_decay)
        return d

    @abstractmethod
    def update(self, p: torch.Tensor, d: torch.Tensor, lr: float, t: int, index: int, lo: int,
               bits: torch.Tensor | None, info: dict | None = None) -> None:
        """Apply the rule to one chunk of rows, in place. `info`: the step's scalars a
        rule needs beyond d (HiZOO: the projected gradient and the curvature)."""

    @classmethod
    def state_bytes(cls, shapes: list[torch.Size]) -> int:
        """The state this rule keeps for parameters of these shapes (the planner's
        optimizer_state)."""
        return cls.state_bytes_per_param * sum(torch.Size(s).numel() for s in shapes)


class SGD(Rule):
    """θ ← θ − η·d   (ZO-SGD is MeZO's update; FO-SGD is torch.optim.SGD)."""

    name = "sgd"

    def linear_in_d(self) -> bool:
        return self.weight_decay == 0  # weight decay adds θ to d in place

    def update(self, p, d, lr, t, index, lo, bits, info=None):
        new = fp32_copy(p)
        new.sub_(self._grad(new, d), alpha=lr)
        store(p, new, bits)


class Sign(Rule):
    """θ ← θ − η·sign(d): the element-wise sign of the estimated gradient."""

    name = "sign"

    def update(self, p, d, lr, t, index, lo, bits, info=None):
        new = fp32_copy(p)
        new.sub_(self._grad(new, d).sign_(), alpha=lr)
        store(p, new, bits)


class Momentum(Rule):
    """Heavy ball: m ← β·m + d; θ ← θ − η·m (torch.optim.SGD with momentum β)."""

    name = "momentum"
    state_bytes_per_param = 4
    stateful = True

    def __init__(self, weight_decay: float = 0.0,
                 momentum: float = RULE_DEFAULTS["Momentum"]["momentum"]):
        super().__init__(weight_decay)
        self.momentum = momentum

    def init_state(self, params):
        self.state = {"momentum": self._zeros(params)}

    def update(self, p, d, lr, t, index, lo, bits, info=None):
        new = fp32_copy(p)
        m = self.state["momentum"][index][lo:lo + p.shape[0]].view(p.shape)
        m.mul_(self.momentum).add_(self._grad(new, d))
        new.sub_(m, alpha=lr)
        store(p, new, bits)


class Adam(Rule):
    """Adam (Kingma & Ba) on the estimate, with bias correction; fp32 moments whatever
    the model dtype. The arithmetic follows torch.optim.Adam's single-tensor path."""

    name = "adam"
    state_bytes_per_param = 8
    stateful = True

    def __init__(self, weight_decay: float = 0.0,
                 betas: tuple[float, float] = RULE_DEFAULTS["Adam"]["betas"],
                 eps: float = RULE_DEFAULTS["Adam"]["adam_eps"]):
        super().__init__(weight_decay)
        self.betas, self.eps = tuple(betas), eps

    def init_state(self, params):
        self.state = {"exp_avg": self._zeros(params), "exp_avg_sq": self._zeros(params)}

    def update(self, p, d, lr, t, index, lo, bits, info=None):
        b1, b2 = self.betas
        rows = slice(lo, lo + p.shape[0])
        m = self.state["exp_avg"][index][rows].view(p.shape)
        v = self.state["exp_avg_sq"][index][rows].view(p.shape)
        new = fp32_copy(p)
        g = self._grad(new, d)
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        step_size = lr / (1 - b1 ** t)
        denom = workers.thread_buffer("denom", p.numel(), m.dtype, p.device).view(p.shape)
        torch.sqrt(v, out=denom).div_(math.sqrt(1 - b2 ** t)).add_(self.eps)
        new.addcdiv_(m, denom, value=-step_size)
        store(p, new, bits)


class ExactMove(Rule):
    """θ ← round(θ − η·d), rounded to nearest exactly as the perturbed forward rounds
    θ + a·d, so the weights kept are bit-for-bit the weights whose loss was measured
    (the conservative optimizer's moves). No stochastic rounding, no weight decay."""

    name = "exact"

    def update(self, p, d, lr, t, index, lo, bits, info=None):
        if p.dtype in (torch.float32, torch.float64):
            p.add_(d, alpha=-lr)
            return
        acc = workers.thread_buffer("acc", d.numel(), torch.float32, d.device).view(d.shape)
        torch.add(p, d, alpha=-lr, out=acc)
        p.copy_(acc)


class HessianSGD(Rule):
    """HiZOO (Zhao et al., ICLR 2025): a diagonal Hessian estimate H (Σ⁻¹) preconditions
    both the perturbation and the step.

    The step perturbs along Σ^½·z (Direction.scale = H^-½), measures L(θ) as well, and
    with κ = |L₊ + L₋ − 2L₀| / (2ε²) (the curvature along the perturbation):
        H ← H ⊙ ((1 − α) + α·κ·z²)        (the moving average of κ·H⊙z², started at 1)
        θ ← θ − η·(g·z ⊙ H^-½ + λθ)       (with the updated H, as the authors' code does)
    State: H, fp32, 4 bytes a parameter.
    """

    name = "hessian"
    state_bytes_per_param = 4
    stateful = True

    def __init__(self, weight_decay: float = 0.0, smoothing: float = 1e-6):
        super().__init__(weight_decay)
        self.smoothing = smoothing

    def _shape(self, p: torch.Tensor) -> tuple[int, int]:
        return chunking.num_rows(p.shape), p[0].numel() if p.dim() else 1

    def init_state(self, params):
        self.state = {"hessian": [torch.ones(self._shape(p), dtype=work_dtype(p.dtype),
                                             device=p.device) for p in params]}

    def preconditioner(self, index: int, rows: slice | torch.Tensor) -> torch.Tensor:
        """Σ^½ = H^-½ on those rows: Direction.scale of the perturbation."""
        return self.state["hessian"][index][rows].rsqrt()

    def _h(self, p: torch.Tensor, index: int, lo: int) -> torch.Tensor:
        h = self.state["hessian"][index][lo:lo + p.shape[0]]
        return h if h.shape[-1] != 1 else h.expand(p.shape[0], max(1, p[0].numel()))

    def update(self, p, d, lr, t, index, lo, bits, info=None):
        new = fp32_copy(p)
        z = d.view(p.shape[0], -1)  # the engine sends the raw z (coefficient 1)
        h = self.state["hessian"][index][lo:lo + p.shape[0]]
        stat = workers.thread_buffer("stat", z.numel(), z.dtype, z.device).view(z.shape)
        torch.mul(z, z, out=stat).mul_(self.smoothing * info["curvature"])
        self._smooth(h, stat)
        z.mul_(info["g"]).div_(self._h(p, index, lo).sqrt())
        new.sub_(self._grad(new, d), alpha=lr)
        store(p, new, bits)

    def _smooth(self, h: torch.Tensor, stat: torch.Tensor) -> None:
        """H ← H ⊙ ((1 − α) + stat), stat = α·κ·z² elementwise."""
        h.mul_(stat.add_(1.0 - self.smoothing))


class RowHessianSGD(HessianSGD):
    """HiZOO with one curvature per row of each matrix (vectors keep one per value): the
    memory-light variant, m numbers for an m x n matrix instead of mn. (HiZOO-L's own
    factorisation is not in its authors' released code; this keeps the row factor of an
    Adafactor-style factorisation.) Each row's H moves by the row's mean statistic."""

    name = "row-hessian"

    def _shape(self, p: torch.Tensor) -> tuple[int, int]:
        return chunking.num_rows(p.shape), 1

    @classmethod
    def state_bytes(cls, shapes):
        return 4 * sum(chunking.num_rows(torch.Size(s)) for s in shapes)

    def preconditioner(self, index, rows):
        return super().preconditioner(index, rows)  # (rows, 1): broadcast along the row

    def _smooth(self, h, stat):
        h.mul_(stat.mean(dim=1, keepdim=True).add_(1.0 - self.smoothing))


# The update rules by name: a Method (edgezo.zo.methods) names its rule.
RULES: dict[str, type[Rule]] = {r.__name__: r for r in (SGD, Sign, Momentum, Adam, ExactMove,
                                                         HessianSGD, RowHessianSGD)}


@dataclass
class Optimizer:
    """A built optimizer: its method and the rule instance that keeps its state."""

    name: str
    method: Method
    rule: Rule

    @property
    def estimator(self) -> str:
        return self.method.estimator

    @property
    def conservative(self) -> bool:
        return self.method.conservative

    @property
    def description(self) -> str:
        return self.method.description

    @property
    def state_bytes_per_param(self) -> int:
        return self.rule.state_bytes_per_param


def make_optimizer(name: str, *, weight_decay: float = 0.0, momentum: float | None = None,
                   betas: tuple[float, float] | None = None, adam_eps: float | None = None,
                   hessian_smoothing: float | None = None) -> Optimizer:
    """Build a named optimizer. An option the method does not use is an error, never
    silently ignored."""
    method = OPTIMIZERS[name]
    problems = method.option_problems(weight_decay=weight_decay, momentum=momentum,
                                      betas=betas, adam_eps=adam_eps)
    if problems:
        raise ConfigError(problems[0])
    kwargs: dict = {"weight_decay": weight_decay}
    if momentum is not None:
        kwargs["momentum"] = momentum
    if betas is not None:
        kwargs["betas"] = tuple(betas)
    if adam_eps is not None:
        kwargs["eps"] = adam_eps
    if method.curvature and hessian_smoothing is not None:
        kwargs["smoothing"] = hessian_smoothing
    return Optimizer(name, method, RULES[method.rule](**kwargs))
