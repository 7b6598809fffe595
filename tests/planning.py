"""Plans of configurations built from flat options, for the planner's tests."""

from __future__ import annotations

from edgezo.config.runconfig import RunConfig
from edgezo.memory.peak import Plan
from edgezo.memory.planner import PlanResult, Shapes, plan_run, price_config
from edgezo.zo.batch import Shape


def shapes(config: RunConfig, seq_len: int, rows_per_example: int = 1,
           logit_positions: int = 1, eval_shape: Shape | None = None) -> Shapes:
    return Shapes(Shape(config.data.batch_size, seq_len, rows_per_example, logit_positions),
                  eval_shape)


def plan_of(*, pair: bool = True, streamed: int = 0, seq_len: int = 256,
            rows_per_example: int = 1, logit_positions: int = 1,
            eval_shape: Shape | None = None, **options) -> Plan:
    """The plan of one decision (pair mode, `streamed` layers) of a configuration."""
    cfg = RunConfig.from_flat(**options)
    return price_config(cfg, shapes(cfg, seq_len, rows_per_example, logit_positions,
                                    eval_shape), pair=pair, streamed=streamed)


def run_plan(*, seq_len: int = 256, eval_shape: Shape | None = None, **options) -> PlanResult:
    """What `edgezo plan` decides for a configuration."""
    cfg = RunConfig.from_flat(**options).validate()
    return plan_run(cfg, shapes(cfg, seq_len, eval_shape=eval_shape))
