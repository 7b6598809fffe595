"""Tasks by name, or a user task from a .jsonl / .yaml file.

Adding a task: a module with a Task subclass, and its class in the tuple below that fills
the registry's TASKS.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgezo.errors import unknown_choice
from edgezo.registry import TASKS
from edgezo.tasks.base import Encoder, Example, Task
from edgezo.tasks.chat import ChatTask
from edgezo.tasks.chat_format import row_format
from edgezo.tasks.squad import SQuAD
from edgezo.tasks.sst2 import SST2
from edgezo.tasks.superglue import COPA, WSC, BoolQ, MultiRC, WiC, WinoGrande
from edgezo.tasks.user import UserTask

for _task in (SST2, COPA, WinoGrande, MultiRC, BoolQ, WiC, WSC, SQuAD):
    TASKS.add(_task.name, _task)
USER_SUFFIXES = (".jsonl", ".yaml", ".yml")


def make_task(name: str, data_dir: str | None = None, data_seed: int = 0,
              template: str = "auto", train_examples: int | None = None) -> Task:
    kw = {"data_dir": data_dir, "data_seed": data_seed, "template": template,
          "train_examples": train_examples}
    if name not in TASKS and Path(name).suffix in USER_SUFFIXES:
        return _user_task(Path(name), kw)
    if name not in TASKS:
        raise unknown_choice("task", name, [*TASKS, "<file>.jsonl", "<spec>.yaml"])
    return TASKS[name](**kw)


def _user_task(path: Path, kw: dict) -> Task:
    """A classification/multiple-choice task, or conversations (chat_format.py), by what
    the training file's first row holds."""
    if path.suffix == ".jsonl":
        fmt = _first_row_format(path)
        return UserTask(path, **kw) if fmt is None else ChatTask(path, fmt, **kw)
    spec = UserTask.spec(path) if path.is_file() else None
    train = path.parent / spec["train"] if spec else None
    classifies = spec is not None and any(  # what only a classification spec names
        k in spec for k in ("template", "candidates", "label_field", "loss"))
    fmt = None if train is None or classifies else _first_row_format(train)
    if fmt is None:
        return UserTask(path, **kw)
    test = path.parent / spec["test"] if spec.get("test") else None
    return ChatTask(train, fmt, test_path=test, name=spec.get("name") or path.stem, **kw)


def _first_row_format(path: Path) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            line = next((x for x in f if x.strip()), "")
        row = json.loads(line)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # the task's own reader names the problem, with its line
    return row_format(row) if isinstance(row, dict) else None


__all__ = ["TASKS", "Encoder", "Example", "Task", "make_task"]
