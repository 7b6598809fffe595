"""Steps from feedback other than a loss: a ranking of the answers that perturbed models
write (ZO-RankSGD, edgezo.zo.ranking)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgezo.errors import ConfigError
from edgezo.tasks.generate import generate
from edgezo.zo import ranking
from edgezo.zo.ranking import RankFn, RankResult

if TYPE_CHECKING:
    from edgezo.run.session import Session


def ranked_step(session: Session, prompts: str | list[str], rank: RankFn, candidates: int,
                max_new_tokens: int, mu: float | None) -> RankResult:
    """See Session.rank_step."""
    session.check_not_averaged("step")
    session.check_not_torn("step")
    if candidates < 2:
        raise ConfigError("rank_step compares candidates: candidates must be >= 2")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    outputs = []
    for k in range(candidates):
        with session.engine.perturbed_query(k, mu if mu is not None else session.engine.eps):
            outputs.append(generate(session.module, session.tokenizer, prompts,
                                    max_new_tokens, session.device))
    order = rank(outputs)
    coefs = ranking.coefficients(order, candidates)
    # the engine's rule steps against its direction: −ĝ moves towards the preferred
    try:
        result = session.engine.step_along([-c for c in coefs],
                                        session.schedule(session.engine.step_index))
    except KeyboardInterrupt as stop:
        stop.recovered = session.recover_torn_step()
        raise
    session.history.append(result)
    if session.seed_log is not None:
        session.seed_log.append(result.log_entry())
    return ranking.RankResult(outputs, order, coefs, result)
