"""Tasks by name. Adding a task: a module with a Task subclass, plus a line in TASKS."""

from __future__ import annotations

from edgezo.errors import unknown_choice
from edgezo.tasks.base import Encoder, Example, Task
from edgezo.tasks.sst2 import SST2

TASKS: dict[str, type[Task]] = {"sst2": SST2}


def make_task(name: str, data_dir: str | None = None, data_seed: int = 0) -> Task:
    if name not in TASKS:
        raise unknown_choice("task", name, list(TASKS))
    return TASKS[name](data_dir=data_dir, data_seed=data_seed)


__all__ = ["TASKS", "Encoder", "Example", "Task", "make_task"]
