"""SST-2 (GLUE). Templates: movie (the default) "Movie review: <sentence>\nThe sentiment of
this review is {negative|positive}"; natural "Review: <sentence>\nSentiment:
{negative|positive}"; aligned, ZO-Bench's (MeZO's) "<sentence> It was {terrible|great}";
empty "<sentence> {terrible|great}".

Why movie is the default: of the prompts scored zero-shot on the validation rows with
SmolLM2-135M-Instruct it scored best, and a ZO run climbs from where its prompt starts
it. The choice reads validation only; test is reported, never used to choose
(BENCHMARKS.md, "SST-2's prompt, chosen on validation")."""

from __future__ import annotations

import csv
from pathlib import Path

from edgezo.errors import TaskError
from edgezo.tasks.base import Example, Task
from edgezo.tasks.data import embedded_dir, find_task_dir, load_from_hub


class SST2(Task):
    name = "sst2"
    verbalizer = (" terrible", " great")  # label 0 = negative, 1 = positive
    natural_verbalizer = (" negative", " positive")
    templates = ("aligned", "empty", "natural", "movie")
    default_template = "movie"

    files = ["train.tsv", "dev.tsv"]

    def _folder(self) -> Path | None:
        return find_task_dir(self.name, self.files, self.data_dir)

    def sample_rows(self) -> dict[str, list[tuple[int, dict]]] | None:
        shipped = embedded_dir(self.name)
        if shipped is None or self._folder() is not None:
            return None
        return {split: [(row.pop("row"), row) for row in self._parse_tsv(shipped / f"{split}.tsv")]
                for split in ("train", "validation")}

    @staticmethod
    def _parse_tsv(path: Path) -> list[dict]:
        """GLUE's `sentence<TAB>label` rows, or the shipped sample's `row<TAB>sentence<TAB>
        label` (the row's number in GLUE's train file)."""
        rows = []
        try:
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
                header = [h.strip() for h in next(reader, None) or []]
                if header not in (["sentence", "label"], ["row", "sentence", "label"]):
                    raise TaskError(f"{path}: expected a header 'sentence<TAB>label', got "
                                    f"{header}")
                for line, fields in enumerate(reader, start=2):
                    if len(fields) != len(header) or fields[-1].strip() not in ("0", "1"):
                        raise TaskError(f"{path}, line {line}: expected "
                                        f"'{'<TAB>'.join(header[:-1])}<TAB>0|1', got {fields!r}")
                    row = {"sentence": fields[-2], "label": int(fields[-1])}
                    if len(header) == 3:
                        row["row"] = int(fields[0])
                    rows.append(row)
        except UnicodeDecodeError:
            raise TaskError(f"{path}: not UTF-8 text; save the file as UTF-8") from None
        return rows

    def train_rows(self) -> list[dict]:
        folder = self._folder()
        if folder is not None:
            return self._parse_tsv(folder / "train.tsv")
        return load_from_hub("glue", "sst2", "train", self.sample_gap or "")

    def test_rows(self) -> list[dict]:
        folder = self._folder() or embedded_dir(self.name)
        if folder is not None:
            return self._parse_tsv(folder / "dev.tsv")
        return load_from_hub("glue", "sst2", "validation")

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
