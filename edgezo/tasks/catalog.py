"""The prompt templates and training objectives a run may choose, with their traits. Pure
data, without torch; `edgezo.tasks` implements them (the tasks themselves register with
their classes in `edgezo.tasks.make`, because a task name is also checked against files).
"""

from __future__ import annotations

from dataclasses import dataclass

from edgezo.registry import OBJECTIVES, TEMPLATES


@dataclass(frozen=True)
class Objective:
    """`differentiable`: backpropagation and forward gradients can train on it; others
    need a ZO optimizer. `writes`: it decodes answers with a KV cache (two passes a step,
    one process)."""

    name: str
    description: str
    differentiable: bool = True
    writes: bool = False


for _name, _what in (
        ("auto", "the task's best prompt measured here"),
        ("aligned", "ZO-Bench's prompt"),
        ("empty", "bare inputs, same answers"),
        ("natural", "SST-2: 'Review: ...\\nSentiment: positive'"),
        ("movie", "SST-2: 'Movie review: ...\\nThe sentiment of this review is positive'"),
        ("chat", "squad: the question as a user turn, in the model's chat template")):
    TEMPLATES.add(_name, _what)

OBJECTIVES.add("ce", Objective("ce", "the task's loss"))
OBJECTIVES.add("accuracy", Objective("accuracy", "the share of examples scored right",
                                     differentiable=False))
OBJECTIVES.add("f1", Objective("f1", "token F1 of the answers a generative task's model "
                                     "writes", differentiable=False, writes=True))
# A Session given a loss function of its own records this name in run.json.
CUSTOM_OBJECTIVE = "custom"
