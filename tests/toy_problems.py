"""Small problems with known optima, run through the real engine (wrappers, seeds,
deferred updates), for the optimizer and estimator tests."""

from __future__ import annotations

import torch
from torch import nn

from edgezo.config.options import EstimatorOptions
from edgezo.config.rules import estimate_of
from edgezo.models.loading import compute_dtype
from edgezo.zo.blocks import Block, BlockMap, Unit
from edgezo.zo.engine import ZOEngine
from edgezo.zo.optimizers import make_optimizer

ONE_ROW_X = {"x": torch.zeros(1, 1, dtype=torch.float64)}  # a batch of one row


class Quadratic(nn.Module):
    """L(θ) = ½·Σ a_j (θ_j − θ*_j)², the same for every row of the batch."""

    def __init__(self, target: torch.Tensor, curvature: torch.Tensor, start: torch.Tensor):
        super().__init__()
        self.theta = nn.Parameter(start.clone())
        self.register_buffer("target", target)
        self.register_buffer("curvature", curvature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value = 0.5 * (self.curvature * (self.theta - self.target) ** 2).sum()
        return value.expand(x.shape[0])


class Logistic(nn.Module):
    """Per-example logistic loss of a linear model; x holds the features and the label."""

    def __init__(self, dim: int, dtype=torch.float64):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(dim, dtype=dtype))

    def forward(self, xy: torch.Tensor) -> torch.Tensor:
        x, y = xy[:, :-1], xy[:, -1]
        return nn.functional.binary_cross_entropy_with_logits(x @ self.theta, y,
                                                              reduction="none")


class Toy(nn.Module):
    """Wraps a problem module as the single "layer" of a model, as the engine expects."""

    def __init__(self, problem: nn.Module):
        super().__init__()
        self.layers = nn.ModuleList([problem])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[0](x)


def toy_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(batch["x"])


def toy_blocks(model: Toy) -> BlockMap:
    layer = model.layers[0]
    unit = Unit(layer, "layers.0", "layer", [("theta", 0)])
    return BlockMap([Block(0, "layers.0", [unit], [0])], [layer.theta], ["layers.0.theta"])


def toy_engine(problem: nn.Module, optimizer: str, *, opt_kwargs: dict | None = None,
               seed: int = 0, pair: bool = True, **estimator) -> ZOEngine:
    """An engine on a toy problem; `estimator`: eps, q, ... (EstimatorOptions)."""
    model = Toy(problem)
    return ZOEngine(model, make_optimizer(optimizer, **(opt_kwargs or {})),
                    estimate_of(EstimatorOptions(**estimator), optimizer, compute_dtype(model)),
                    loss_fn=toy_loss, seed=seed, pair=pair, blocks=toy_blocks(model))


def quadratic(dim: int = 3, dtype=torch.float64, seed: int = 0) -> Quadratic:
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(dim, generator=g, dtype=dtype)
    curvature = torch.linspace(0.5, 2.0, dim, dtype=dtype)
    start = target + torch.randn(dim, generator=g, dtype=dtype) * 2
    return Quadratic(target, curvature, start)


def logistic_data(n: int = 200, dim: int = 4, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """Separable-ish data with label noise, so the optimum is finite."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=dtype)
    w = torch.linspace(-1.5, 1.5, dim, dtype=dtype)
    p = torch.sigmoid(x @ w)
    y = (torch.rand(n, generator=g, dtype=dtype) < p).to(dtype)
    return torch.cat([x, y[:, None]], dim=1)


def logistic_optimum(data: torch.Tensor) -> float:
    """The minimum mean logistic loss, by full-batch L-BFGS."""
    model = Logistic(data.shape[1] - 1)
    opt = torch.optim.LBFGS(model.parameters(), max_iter=200, tolerance_grad=1e-12,
                            tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = model(data).mean()
        loss.backward()
        return loss

    opt.step(closure)
    return model(data).mean().item()
