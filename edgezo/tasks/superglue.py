"""SuperGLUE tasks and WinoGrande with MeZO/ZO-Bench-style prompts.

Each task has an "aligned" template (the task put as a question the LM can continue) and
an "empty" one (the bare inputs, same candidates) for the task-alignment study. COPA and
WinoGrande are multiple choice, trained with the gold answer's LM loss; the others are
classification with a verbalizer. The staged data is SuperGLUE's JSONL (see the data
README); rows with a missing or mistyped field raise TaskError naming the file and line.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from edgezo.errors import TaskError
from edgezo.tasks.base import Example, Task
from edgezo.tasks.data import find_task_dir, load_from_hub

NO_YES = ("No", "Yes")


def read_jsonl(path: Path, required: dict[str, type | tuple[type, ...]],
               check: Callable[[dict, int], None] | None = None) -> list[dict]:
    """Rows of a JSONL file, each checked for the fields (and types) a task reads, then by
    `check(row, line_number)`, which raises TaskError naming what is wrong."""
    rows = []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise TaskError(f"{path}, line {line_no}: not UTF-8 text (byte "
                                f"{err.start + 1} of the line); save the file as UTF-8"
                                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise TaskError(f"{path}, line {line_no}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise TaskError(f"{path}, line {line_no}: expected a JSON object")
            for field, kind in required.items():
                if field not in row:
                    raise TaskError(f"{path}, line {line_no}: missing field {field!r}")
                if not isinstance(row[field], kind):
                    raise TaskError(f"{path}, line {line_no}: field {field!r} should be "
                                    f"{getattr(kind, '__name__', kind)}, got "
                                    f"{type(row[field]).__name__}")
            if check is not None:
                check(row, line_no)
            rows.append(row)
    return rows


class JsonlTask(Task):
    """A task stored as <name>/<train_file> and <name>/<test_file> (test may be absent)."""

    train_file = "train.jsonl"
    test_file: str | None = "val.jsonl"
    hub: tuple[str, str | None] | None = None  # (path, config) on the Hugging Face hub
    hub_splits = ("train", "validation")
    required: dict = {}

    def _files(self) -> list[str]:
        return [self.train_file] + ([self.test_file] if self.test_file else [])

    def _read(self, filename: str, hub_split: str) -> list[dict]:
        folder = find_task_dir(self.name, self._files(), self.data_dir)
        if folder is None:
            if self.hub is None:
                raise TaskError(f"no local {self.name} data: pass --data-dir DIR holding "
                                f"{self.name}/{self.train_file}")
            return load_from_hub(self.hub[0], self.hub[1], hub_split)
        return read_jsonl(folder / filename, self.required)

    def train_rows(self) -> list[dict]:
        return self._read(self.train_file, self.hub_splits[0])

    def test_rows(self) -> list[dict] | None:
        return None if self.test_file is None else self._read(self.test_file,
                                                                self.hub_splits[1])


def _label(row: dict) -> int:
    return int(bool(row["label"]))


class COPA(JsonlTask):
    """Choice of Plausible Alternatives: "<premise> because|so <choice>"."""

    name = "copa"
    loss = "lm"
    hub = ("super_glue", "copa")
    required = {"premise": str, "choice1": str, "choice2": str, "question": str, "label": int}

    def example(self, row: dict) -> Example:
        choices = (row["choice1"], row["choice2"])
        if self.template == "empty":
            return Example(row["premise"], tuple(" " + c for c in choices), row["label"])
        connector = {"cause": " because", "effect": " so"}.get(row["question"])
        if connector is None:
            raise TaskError(f"copa: question must be 'cause' or 'effect', got "
                            f"{row['question']!r}")
        premise = row["premise"].strip().rstrip(".")
        candidates = tuple(" " + c[0].lower() + c[1:] for c in choices)
        return Example(premise + connector, candidates, row["label"])


class WinoGrande(JsonlTask):
    """The option fills the blank; the continuation after the blank is scored."""

    name = "winogrande"
    loss = "lm"
    train_file = "dev.jsonl"  # only the dev file is staged: train/validation/test from it
    test_file = None
    hub = ("winogrande", "winogrande_xl")
    hub_splits = ("validation", "validation")
    required = {"sentence": str, "option1": str, "option2": str, "answer": str}

    def example(self, row: dict) -> Example:
        sentence = row["sentence"]
        if sentence.count("_") != 1 or row["answer"] not in ("1", "2"):
            raise TaskError(f"winogrande row {row.get('qID', '?')}: needs one '_' blank and "
                            "answer '1' or '2'")
        options = (row["option1"], row["option2"])
        gold = int(row["answer"]) - 1
        before, after = sentence.split("_")
        if self.template == "empty":  # the whole filled-in sentence is scored
            filled = tuple(before + o + after for o in options)
            return Example("", filled, gold)
        prompts = tuple(before + o for o in options)
        return Example(prompts[0], (after, after), gold, prompts=prompts)


class BoolQ(JsonlTask):
    name = "boolq"
    train_file = "val.jsonl"  # only the validation file is staged
    test_file = None
    hub = ("super_glue", "boolq")
    hub_splits = ("validation", "validation")
    required = {"question": str, "passage": str, "label": bool}

    def example(self, row: dict) -> Example:
        q = row["question"].strip()
        if self.template == "empty":
            return Example(f"{row['passage']}\n{q}\n", NO_YES, _label(row))
        return Example(f"{row['passage']}\nQuestion: {q}?\nAnswer:", (" No", " Yes"),
                       _label(row))


class WiC(JsonlTask):
    name = "wic"
    hub = ("super_glue", "wic")
    required = {"word": str, "sentence1": str, "sentence2": str, "label": bool}

    def example(self, row: dict) -> Example:
        s1, s2, word = row["sentence1"], row["sentence2"], row["word"]
        if self.template == "empty":
            return Example(f"{s1}\n{s2}\n{word}\n", NO_YES, _label(row))
        return Example(f"Does the word \"{word}\" have the same meaning in these two "
                       f"sentences? Yes, No?\n{s1}\n{s2}\n", NO_YES, _label(row))


class WSC(JsonlTask):
    name = "wsc"
    hub = ("super_glue", "wsc.fixed")
    required = {"text": str, "target": dict, "label": bool}

    def example(self, row: dict) -> Example:
        target = row["target"]
        if "span1_text" not in target or "span2_text" not in target:
            raise TaskError("wsc: 'target' needs 'span1_text' and 'span2_text'")
        noun, pronoun = target["span1_text"], target["span2_text"]
        if self.template == "empty":
            return Example(f"{row['text']}\n{pronoun}\n{noun}\n", NO_YES, _label(row))
        return Example(f"{row['text']}\nIn the previous sentence, does the pronoun "
                       f"\"{pronoun.lower()}\" refer to {noun}? Yes or No?\n", NO_YES,
                       _label(row))


class MultiRC(JsonlTask):
    """One example per answer option (accuracy), grouped by question (exact match).

    A row is one question with its passage and answers, so all options of a question land
    in the same split.
    """

    name = "multirc"
    # Questions, not answers, are sampled (about 5 answers each): ~1000 / ~500 answer
    # examples for train / validation, as the other tasks have.
    num_train = 200
    num_validation = 100
    hub = None  # the hub's flat format differs; use the staged SuperGLUE files
    required = {"passage": dict}

    def _read(self, filename: str, hub_split: str) -> list[dict]:
        rows = []
        for passage in super()._read(filename, hub_split):
            p = passage["passage"]
            for q in p.get("questions", []):
                for a in q.get("answers", []):
                    if not isinstance(a.get("label"), int) or "text" not in a:
                        raise TaskError(f"multirc passage {passage.get('idx')}: every answer "
                                        "needs 'text' and an integer 'label'")
                rows.append({"paragraph": p["text"], "question": q["question"],
                             "answers": q["answers"],
                             "group": f"{passage.get('idx')}-{q.get('idx')}"})
        return rows

    def example(self, row: dict) -> list[Example]:
        out = []
        for a in row["answers"]:
            if self.template == "empty":
                prompt = f"{row['paragraph']}\n{row['question']}\n{a['text']}\n"
            else:
                prompt = (f"{row['paragraph']}\nQuestion: {row['question']}\nI found this "
                          f"answer \"{a['text']}\". Is that correct? Yes or No?\n")
            out.append(Example(prompt, NO_YES, int(a["label"]), group=row["group"]))
        return out
