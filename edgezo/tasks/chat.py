"""A task of conversations or texts from a JSONL file (formats: chat_format.py)."""

from __future__ import annotations

from pathlib import Path

from edgezo.errors import TaskError
from edgezo.tasks.base import Example, Task
from edgezo.tasks.chat_format import parse_row
from edgezo.tasks.superglue import read_jsonl


class ChatTask(Task):
    """A JSONL file of conversations (or texts): rows, splits and examples. What the
    formats are and how a conversation is trained on: chat_format.py."""

    loss = "lm"
    generative = True
    metric = "f1"
    max_new_tokens = 64
    first_line = False  # an assistant's answer may span lines: it ends at its end of turn
    templates = ("aligned",)

    def __init__(self, path: str | Path, fmt: str, test_path: Path | None = None,
                 data_dir: str | None = None, data_seed: int = 0, template: str = "auto",
                 train_examples: int | None = None, name: str | None = None):
        super().__init__(data_dir, data_seed, template, train_examples)
        self.name = name or Path(path).stem
        self.train_path, self.test_path, self.format = Path(path), test_path, fmt
        if fmt == "text":
            self.generative, self.metric = False, "log_likelihood"

    def _load(self, path: Path) -> list[dict]:
        def check(row: dict, line_no: int) -> None:
            row["_messages"] = parse_row(row, self.format, f"{path}, line {line_no}")

        rows = read_jsonl(path, {}, check)
        if not rows:
            raise TaskError(f"{path}: no rows")
        return rows

    def train_rows(self) -> list[dict]:
        return self._load(self.train_path)

    def test_rows(self) -> list[dict] | None:
        return None if self.test_path is None else self._load(self.test_path)

    def example(self, row: dict) -> Example:
        messages = row["_messages"]
        answer = messages[-1][1]
        return Example("", (answer,), 0, references=(answer.strip(),), messages=messages)
