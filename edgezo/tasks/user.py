"""Your own task from a JSONL file or a small YAML spec, with no Python to write.

    edgezo finetune --task reviews.jsonl          # rows: {"input", "candidates", "label"}
    edgezo finetune --task reviews.yaml           # a spec naming files and a template

JSONL rows: `input` (the text; or any fields the template names), `candidates` (a list of
answer strings; optional when the spec gives shared candidates) and `label` (the index of
the right candidate, or the candidate string itself).

YAML spec (paths relative to the spec file):

    name: reviews
    train: reviews-train.jsonl
    test: reviews-test.jsonl            # optional: else held out of train
    template: "Review: {input}\\nSentiment:"
    candidates: [" negative", " positive"]
    label_field: label                  # default "label"
    loss: classification                # or "lm" for multiple choice

Splits follow the built-in tasks: up to 1000 train / 500 validation sampled from the
train file (--train-examples takes more, or 0 for every row), the test file as test (or
a held-out third when there is none).
"""

from __future__ import annotations

import string
from pathlib import Path

from edgezo.errors import TaskError, read_yaml
from edgezo.tasks.base import Example, Task
from edgezo.tasks.superglue import read_jsonl

LOSSES = ("classification", "lm")


def _fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


class UserTask(Task):
    def __init__(self, path: str | Path, data_dir: str | None = None, data_seed: int = 0,
                 template: str = "auto", train_examples: int | None = None):
        super().__init__(data_dir, data_seed, template, train_examples)
        path = Path(path)
        if not path.is_file():
            raise TaskError(f"task file {path} does not exist; --task takes a built-in task "
                            "name or a .jsonl / .yaml file")
        spec = self.spec(path) if path.suffix in (".yaml", ".yml") else {"train": path.name}
        base = path.parent
        self.name = str(spec.get("name") or path.stem)
        self.train_path = base / spec["train"]
        self.test_path = base / spec["test"] if spec.get("test") else None
        self.prompt_template = spec.get("template", "{input}")
        self.shared_candidates = spec.get("candidates")
        self.label_field = spec.get("label_field", "label")
        self.loss = spec.get("loss", "classification")
        if self.loss not in LOSSES:
            raise TaskError(f"{path}: loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.shared_candidates is not None and (
                not isinstance(self.shared_candidates, list) or len(self.shared_candidates) < 2
                or not all(isinstance(c, str) for c in self.shared_candidates)):
            raise TaskError(f"{path}: candidates must be a list of at least two strings")
        try:
            _fields(self.prompt_template)
        except ValueError as err:
            raise TaskError(f"{path}: bad template {self.prompt_template!r}: {err}") from None
        for p in (self.train_path, self.test_path):
            if p is not None and not p.is_file():
                raise TaskError(f"{path}: data file {p} does not exist")

    @staticmethod
    def spec(path: Path) -> dict:
        """The YAML spec, checked field by field."""
        spec = read_yaml(path, TaskError)
        if not isinstance(spec, dict) or "train" not in spec:
            raise TaskError(f"{path}: a task spec needs at least 'train: <file.jsonl>'")
        unknown = set(spec) - {"name", "train", "test", "template", "candidates",
                               "label_field", "loss"}
        if unknown:
            raise TaskError(f"{path}: unknown field(s) {', '.join(sorted(unknown))}; valid: "
                            "name, train, test, template, candidates, label_field, loss")
        for field in ("name", "train", "test", "template", "label_field", "loss"):
            if spec.get(field) is not None and not isinstance(spec[field], str):
                raise TaskError(f"{path}: field {field!r} must be one string (a file name, "
                                f"relative to the spec), got {type(spec[field]).__name__} "
                                f"{spec[field]!r}")
        return spec

    def _load(self, path: Path) -> list[dict]:
        counts: list[int] = []

        def check(row: dict, line_no: int) -> None:
            self._check(row, path, line_no)
            counts.append(len(row["_candidates"]))
            if counts[-1] != counts[0]:
                raise TaskError(f"{path}, line {line_no}: field 'candidates' has {counts[-1]} "
                                f"answers but earlier rows have {counts[0]}; a task needs "
                                "one count")

        rows = read_jsonl(path, {}, check)
        if not rows:
            raise TaskError(f"{path}: no rows")
        return rows

    def _check(self, row: dict, path: Path, line_no: int) -> None:
        where = f"{path}, line {line_no}"
        for field in _fields(self.prompt_template):
            if field not in row:
                raise TaskError(f"{where}: missing field {field!r} (the template uses it)")
        candidates = row.get("candidates", self.shared_candidates)
        if candidates is None:
            raise TaskError(f"{where}: missing field 'candidates' (or give shared candidates "
                            "in a YAML spec)")
        if (not isinstance(candidates, list) or len(candidates) < 2
                or not all(isinstance(c, str) for c in candidates)):
            raise TaskError(f"{where}: field 'candidates' must be a list of at least two "
                            "strings")
        label = row.get(self.label_field)
        if label is None:
            raise TaskError(f"{where}: missing field {self.label_field!r}")
        if isinstance(label, bool) or not (
                (isinstance(label, int) and 0 <= label < len(candidates))
                or (isinstance(label, str) and label in candidates)):
            raise TaskError(f"{where}: field {self.label_field!r} must be a candidate index "
                            f"(0..{len(candidates) - 1}) or one of the candidates, got {label!r}")
        row["_candidates"], row["_gold"] = tuple(candidates), (
            label if isinstance(label, int) else candidates.index(label))

    def train_rows(self) -> list[dict]:
        return self._load(self.train_path)

    def test_rows(self) -> list[dict] | None:
        return None if self.test_path is None else self._load(self.test_path)

    def example(self, row: dict) -> Example:
        if self.template == "empty":
            prompt = "\n".join(str(row[f]) for f in _fields(self.prompt_template))
        else:
            prompt = self.prompt_template.format(**row)
        return Example(prompt, row["_candidates"], row["_gold"])
