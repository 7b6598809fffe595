"""The optimizers a run may choose, as objects that own their traits: where the gradient
estimate comes from, which update rule moves θ, how many forwards a step costs, which
options they take and which they refuse.

Pure data, without torch, so that the CLI's help and the config's checks read them
without loading torch. The update rules themselves live in `edgezo.zo.optimizers`,
found by name.

Adding an optimizer: one `_add(...)` line below (and a Rule class there, if its update is
new).
"""

from __future__ import annotations

from dataclasses import dataclass

from edgezo.registry import OPTIMIZERS

ESTIMATORS = ("zo", "forward-grad", "fo")
# The choices of how a ZO step queries (the estimator options of a run).
ESTIMATES = ("two-sided", "one-sided")
DIRECTIONS = ("gaussian", "rademacher", "lowrank", "subspace", "coordinate")
STRUCTURED = ("lowrank", "subspace")  # directions built from per-matrix bases
NOISE_SOURCES = ("generator", "table")
STRUCTURED_Z = ("exact", "chunked")  # how a structured z is computed (Direction.chunked)
GRANULARITIES = ("layer", "half")  # the groups of block-wise ZO
# Options of the update rules that have them, with their defaults; every other rule takes
# none of these. A run records the defaults it takes (RunConfig.resolved).
RULE_DEFAULTS: dict[str, dict] = {"Momentum": {"momentum": 0.9},
                                  "Adam": {"betas": (0.9, 0.999), "adam_eps": 1e-8}}
RULE_OPTIONS = {rule: tuple(options) for rule, options in RULE_DEFAULTS.items()}


@dataclass(frozen=True)
class Method:
    """A named optimizer: where d comes from (`estimator`, one of ESTIMATORS), the update
    rule that moves θ, and the estimator options it takes by default."""

    name: str
    estimator: str
    rule: str  # a class name in edgezo.zo.optimizers.RULES
    description: str
    conservative: bool = False  # zo-sgd-cons: keep the best of θ, θ − η·d, θ + η·d
    normalized: bool = False  # fzoo: the step divided by the spread of the queries' g
    curvature: bool = False  # hizoo: L(θ) every step; the rule keeps a Hessian estimate
    q: int = 1
    estimate: str = "two-sided"
    directions: str = "gaussian"

    @property
    def perturbs(self) -> bool:
        """Estimates from forward values alone (ZO): it can stream, replay a seed log and
        run data-parallel; the others differentiate the loss."""
        return self.estimator == "zo"

    @property
    def backprops(self) -> bool:
        """Its gradient comes from backpropagation (the first-order baselines)."""
        return self.estimator == "fo"

    @property
    def forward_gradient(self) -> bool:
        """Its estimate is ∇L·v by forward-mode AD (a jvp), not a difference of losses."""
        return self.estimator == "forward-grad"

    @property
    def draws_directions(self) -> bool:
        """It queries along seeded directions (ZO and forward gradients), so the noise
        source, directions, bases and sparsity apply to it."""
        return not self.backprops

    def pairs(self, one_sided: bool) -> bool:
        """Whether L(θ + εz) and L(θ − εz) can run as one doubled forward: a two-sided
        ZO estimate only."""
        return self.perturbs and not one_sided

    @property
    def needs_base_loss(self) -> bool:
        """L(θ) itself is evaluated every step (besides the perturbed losses)."""
        return self.conservative or self.curvature

    def forwards_per_step(self, *, q: int, one_sided: bool, pair: bool, groups: int = 1,
                          fo: bool = False) -> int:
        """Forward passes one step makes (each over the batch, or the doubled batch in pair
        mode): the engine reports it and `edgezo optimizers` lists it."""
        if self.backprops:
            return 1
        per_query = 1 if (pair or one_sided or self.forward_gradient) else 2
        per_group = q * per_query
        needs_base = one_sided or self.needs_base_loss
        if self.perturbs and needs_base:
            per_group += 1  # L(θ)
        if self.conservative:
            per_group += 1 if pair else 2  # L(θ ± η·d)
        shared = 1 if fo and needs_base else 0  # the FO pass's forward is that L(θ)
        return groups * per_group + (1 if fo else 0) - shared

    def option_defaults(self) -> dict:
        """The options its update rule takes, at their defaults."""
        return dict(RULE_DEFAULTS.get(self.rule, {}))

    def option_problems(self, **options) -> list[str]:
        """Options of an update rule given to a method whose rule has none of them, and
        weight decay given to an exact move."""
        out = []
        mine = RULE_OPTIONS.get(self.rule, ())
        for rule, names in RULE_OPTIONS.items():
            for option in names:
                if options.get(option) is not None and option not in mine:
                    users = [n for n, m in OPTIMIZERS.items() if m.rule == rule]
                    out.append(f"optimizer {self.name} has no {option} option; it applies "
                               f"to {', '.join(users)}")
        if self.conservative and options.get("weight_decay"):
            out.append(f"{self.name} makes exact moves along the estimate and takes no "
                       "weight_decay; drop --weight-decay or use zo-sgd")
        return out


@dataclass(frozen=True)
class Estimate:
    """How a step estimates, every value decided: what the engine runs with. The config
    fills in the method's defaults and checks the rules between the values
    (`edgezo.config.rules.estimate_of`); nothing here has a default of its own.

    `q`: queries a step, or for coordinate directions the coordinates a step (None: all);
    `rank` and `basis_every`: of structured directions (0 and 1 otherwise); `chunked_z`:
    a structured z of a run recorded before products were exact (Direction.chunked);
    `fo_blocks`: the blocks a hybrid step trains by backpropagation."""

    eps: float
    q: int | None
    one_sided: bool
    directions: str
    noise: str
    rank: int
    basis_every: int
    chunked_z: bool
    g_clip: float | None
    block_wise: bool
    granularity: str
    sparsity: float
    sparsity_mask: str
    sparsity_every: int
    fo_blocks: tuple[str, ...]
    max_forwards: int


def _add(name: str, estimator: str, rule: str, description: str, **traits) -> None:
    OPTIMIZERS.add(name, Method(name, estimator, rule, description, **traits))


_add("zo-sgd", "zo", "SGD", "ZO-SGD (MeZO): θ ← θ − η·g·z")
_add("zo-sgd-sign", "zo", "Sign", "ZO-SGD-Sign: θ ← θ − η·sign(g·z)")
_add("zo-sgd-mmt", "zo", "Momentum", "ZO-SGD with heavy-ball momentum β")
_add("zo-sgd-cons", "zo", "ExactMove", "conservative ZO-SGD: keep the lowest loss of θ, "
     "θ − η·ĝ, θ + η·ĝ", conservative=True)
_add("zo-adam", "zo", "Adam", "Adam on the ZO estimate (fp32 moments)")
_add("fzoo", "zo", "SGD", "FZOO: q one-sided Rademacher queries, the step divided by the "
     "spread of their estimates (scale-free)", normalized=True, q=8, estimate="one-sided",
     directions="rademacher")
_add("hizoo", "zo", "HessianSGD", "HiZOO: perturb along Σ^½z, a diagonal Hessian estimate "
     "Σ⁻¹ from L(θ) and L(θ ± ε·Σ^½z)", curvature=True)
_add("hizoo-l", "zo", "RowHessianSGD", "HiZOO with one curvature per matrix row "
     "(memory-light)", curvature=True)
_add("forward-grad", "forward-grad", "SGD", "forward gradient (∇L·v)·v with SGD")
_add("forward-grad-mmt", "forward-grad", "Momentum",
     "forward gradient with heavy-ball momentum β")
_add("forward-grad-adam", "forward-grad", "Adam", "forward gradient with Adam")
_add("fo-sgd", "fo", "SGD", "backpropagation + SGD (baseline)")
_add("fo-adam", "fo", "Adam", "backpropagation + Adam (baseline)")
