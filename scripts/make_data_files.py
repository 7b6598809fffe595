"""Write the data files the repository ships, from the staged task data (run once, by hand).

    python scripts/make_data_files.py SHARED_DATA_DIR

- edgezo/tasks/embedded/sst2/: the default task's ZO-Bench sample as edgezo draws it
  (data seed 0): the 1000 training and 500 validation rows of GLUE's SST-2 train file,
  each with its row number in that file, and GLUE's 872-row dev file, the test set.
- tests/fixtures/data/<task>/: the first rows of each task's files, in the task's own
  format, so the test suite reads real rows without the full data beside it (SQuAD: the
  first questions of the first paragraphs of the first articles, SQUAD_FIXTURE).

The sample is what `make_task("sst2", data_dir=SHARED_DATA_DIR)` picks; a test with the
full data checks the two stay equal.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from edgezo.tasks.make import make_task

ROOT = Path(__file__).resolve().parent.parent
FIXTURE_ROWS = {  # file: leading rows kept (a multirc row is a passage of several questions)
    "sst2/train.tsv": 61, "sst2/dev.tsv": 25, "copa/train.jsonl": 40, "copa/val.jsonl": 16,
    "winogrande/dev.jsonl": 48, "multirc/train.jsonl": 3, "multirc/val.jsonl": 2,
    "boolq/val.jsonl": 36, "wic/train.jsonl": 40, "wic/val.jsonl": 16,
    "wsc/train.jsonl": 40, "wsc/val.jsonl": 16,
}

SQUAD_FIXTURE = (8, 2, 3)  # articles, paragraphs of each, questions of each paragraph


def write_sst2_sample(data: Path, out: Path) -> None:
    task = make_task("sst2", data_dir=str(data))
    task.split("train")
    rows = task.train_rows()
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation"):
        with open(out / f"{split}.tsv", "w", encoding="utf-8", newline="\n") as f:
            f.write("row\tsentence\tlabel\n")
            for i in task.source_rows[split]:
                f.write(f"{i}\t{rows[i]['sentence']}\t{rows[i]['label']}\n")
    shutil.copyfile(data / "sst2" / "dev.tsv", out / "dev.tsv")


def write_fixtures(data: Path, out: Path) -> None:
    for name, n in FIXTURE_ROWS.items():
        target = out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(data / name, encoding="utf-8", newline="") as f:
            lines = [line for _, line in zip(range(n), f, strict=False)]
        target.write_text("".join(lines), encoding="utf-8", newline="")
    write_squad_fixture(data / "squad" / "dev-v1.1.json", out / "squad" / "dev-v1.1.json")


def write_squad_fixture(source: Path, target: Path) -> None:
    articles, paragraphs, questions = SQUAD_FIXTURE
    full = json.loads(source.read_text(encoding="utf-8"))
    data = [{**a, "paragraphs": [{**p, "qas": p["qas"][:questions]}
                                 for p in a["paragraphs"][:paragraphs]]}
            for a in full["data"][:articles]]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps({"version": full["version"], "data": data}), encoding="utf-8")


if __name__ == "__main__":
    shared = Path(sys.argv[1])
    write_sst2_sample(shared, ROOT / "edgezo" / "tasks" / "embedded" / "sst2")
    write_fixtures(shared, ROOT / "tests" / "fixtures" / "data")
