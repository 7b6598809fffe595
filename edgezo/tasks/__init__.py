"""Tasks by name, or a user task from a .jsonl / .yaml file.

Adding a task: a module with a Task subclass, plus a line in TASKS.
"""

from __future__ import annotations

from pathlib import Path

from edgezo.errors import unknown_choice
from edgezo.tasks.base import TEMPLATES, Encoder, Example, Task
from edgezo.tasks.squad import SQuAD
from edgezo.tasks.sst2 import SST2
from edgezo.tasks.superglue import COPA, WSC, BoolQ, MultiRC, WiC, WinoGrande
from edgezo.tasks.user import UserTask

TASKS: dict[str, type[Task]] = {"sst2": SST2, "copa": COPA, "winogrande": WinoGrande,
                                "multirc": MultiRC, "boolq": BoolQ, "wic": WiC, "wsc": WSC,
                                "squad": SQuAD}
USER_SUFFIXES = (".jsonl", ".yaml", ".yml")


def make_task(name: str, data_dir: str | None = None, data_seed: int = 0,
              template: str = "auto", train_examples: int | None = None) -> Task:
    kw = {"data_dir": data_dir, "data_seed": data_seed, "template": template,
          "train_examples": train_examples}
    if name not in TASKS and Path(name).suffix in USER_SUFFIXES:
        return UserTask(name, **kw)
    if name not in TASKS:
        raise unknown_choice("task", name, [*TASKS, "<file>.jsonl", "<spec>.yaml"])
    return TASKS[name](**kw)


__all__ = ["TASKS", "TEMPLATES", "Encoder", "Example", "Task", "make_task"]
