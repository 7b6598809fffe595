"""SST-2 (GLUE). Templates: movie (the default) "Movie review: <sentence>\nThe sentiment of
this review is {negative|positive}"; natural "Review: <sentence>\nSentiment:
{negative|positive}"; aligned, ZO-Bench's (MeZO's) "<sentence> It was {terrible|great}";
empty "<sentence> {terrible|great}".

Why movie is the default: of 14 prompts scored zero-shot on the 500 validation rows with
SmolLM2-135M-Instruct it scored best (0.840, against 0.792 for natural and 0.65 for
ZO-Bench's on 200 rows), and a ZO run starts from there: 83.7% test zero-shot, and
after the default 1000 steps 82.1% to 86.0% over three seeds, where natural ended at
81.9-83.3% (BENCHMARKS.md, "Time to accuracy")."""

from __future__ import annotations

import csv

from edgezo.errors import TaskError
from edgezo.tasks.base import Example, Task
from edgezo.tasks.data import find_task_dir, load_from_hub


class SST2(Task):
    name = "sst2"
    verbalizer = (" terrible", " great")  # label 0 = negative, 1 = positive
    natural_verbalizer = (" negative", " positive")
    templates = ("aligned", "empty", "natural", "movie")
    default_template = "movie"

    def _read_tsv(self, filename: str) -> list[dict] | None:
        folder = find_task_dir("sst2", ["train.tsv", "dev.tsv"], self.data_dir)
        if folder is None:
            return None
        path = folder / filename
        try:
            return self._parse_tsv(path)
        except UnicodeDecodeError:
            raise TaskError(f"{path}: not UTF-8 text; save the file as UTF-8") from None

    @staticmethod
    def _parse_tsv(path) -> list[dict]:
        rows = []
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = next(reader, None)
            if header is None or [h.strip() for h in header[:2]] != ["sentence", "label"]:
                raise TaskError(f"{path}: expected a header 'sentence<TAB>label', got {header}")
            for line, fields in enumerate(reader, start=2):
                if len(fields) != 2 or fields[1].strip() not in ("0", "1"):
                    raise TaskError(f"{path}, line {line}: expected 'sentence<TAB>0|1', "
                                    f"got {fields!r}")
                rows.append({"sentence": fields[0], "label": int(fields[1])})
        return rows

    def train_rows(self) -> list[dict]:
        rows = self._read_tsv("train.tsv")
        return rows if rows is not None else load_from_hub("glue", "sst2", "train")

    def test_rows(self) -> list[dict]:
        rows = self._read_tsv("dev.tsv")
        return rows if rows is not None else load_from_hub("glue", "sst2", "validation")

    def example(self, row: dict) -> Example:
        sentence = row["sentence"].strip()
        if self.template == "natural":
            return Example(f"Review: {sentence}\nSentiment:", self.natural_verbalizer,
                           int(row["label"]))
        if self.template == "movie":
            return Example(f"Movie review: {sentence}\nThe sentiment of this review is",
                           self.natural_verbalizer, int(row["label"]))
        prompt = sentence if self.template == "empty" else f"{sentence} It was"
        return Example(prompt, self.verbalizer, int(row["label"]))
