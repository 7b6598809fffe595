"""The memory budget at run time: the ledger that prices a batch the plan did not foresee
before it runs, and the check after every step on a CPU-emulated profile (on CUDA the
allocator's per-process cap, set when the session is built, enforces it)."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from edgezo.device.profiles import human_bytes
from edgezo.errors import OutOfBudgetError
from edgezo.memory import planner
from edgezo.tasks.shape import batch_shape, prompts_shape
from edgezo.zo.batch import Shape

if TYPE_CHECKING:
    from edgezo.run.session import Session


def admit(session: Session, batch: dict, phase: str) -> None:
    """A batch bigger than the plan's shapes (an app's long example, more rows than
    --batch-size) is priced before it runs, and refused if it cannot fit.

    Raised before any weight moves, so the session stays usable with smaller batches.
    """
    if session.config.runtime.check_budget:
        _admit_shape(session, batch_shape(batch), phase)


def admit_generation(session: Session, prompts: list[str], new_tokens: int) -> None:
    """`admit` for a batch of prompts to write `new_tokens` after (a generative
    evaluation): priced with its KV cache."""
    if session.config.runtime.check_budget:
        shape = prompts_shape(session.tokenizer, prompts, session.encoder.max_length,
                              new_tokens)
        _admit_shape(session, shape, "eval")


def _admit_shape(session: Session, shape: Shape, phase: str) -> None:
    shapes = session.shapes
    planned = shapes.train if phase == "train" else shapes.eval
    if planned is not None and (shape.rows <= planned.rows and shape.seq_len <= planned.seq_len
                                and shape.logit_positions <= planned.logit_positions
                                and shape.new_tokens <= planned.new_tokens):
        return
    asked = replace(shapes, train=shape) if phase == "train" else replace(shapes, eval=shape)
    plan = planner.price(session.config, planner.live_model(session.module, session.block_map),
                         session.profile, asked, pair=session.pair,
                         streamed=len(session.streamer.layers) if session.streamer else 0)
    need = plan.phases[phase] + plan.runtime_overhead_bytes
    if need > session.profile.budget_bytes:
        raise OutOfBudgetError(
            f"this {phase} batch ({shape.rows} rows x {shape.seq_len} tokens) needs "
            f"{human_bytes(need)}, over profile {session.profile.name}'s "
            f"{human_bytes(session.profile.budget_bytes)}; the plan was made for "
            f"{planned.rows if planned else '?'} rows x "
            f"{planned.seq_len if planned else '?'} tokens. Pass fewer examples at once "
            "or shorter ones (max_length), or pick a larger profile. Nothing was changed")


def after_step(session: Session) -> None:
    """On a CPU-emulated profile, the measured process memory must stay in budget."""
    if not session.config.runtime.check_budget or session.on_cuda:
        return
    measured = session.monitor.peaks.get("train", 0)
    budget = session.profile.budget_bytes
    if measured > budget:
        raise OutOfBudgetError(
            f"step {session.engine.step_index} used {human_bytes(measured)}, over profile "
            f"{session.profile.name}'s {human_bytes(budget)} budget (the plan predicted "
            f"{human_bytes(session.plan.total_bytes)}). Lower --batch-size, use --two-pass, "
            "or pick a larger profile")
