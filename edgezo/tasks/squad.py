"""SQuAD v1.1: the model writes the answer to a question about a Wikipedia paragraph.

MeZO's protocol: 1000 training, 500 validation and 1000 test questions sampled with a
fixed seed, the prompt "Title: <title>\\nContext: <paragraph>\\nQuestion: <question>\\n
Answer:", trained on the first reference answer's tokens (teacher forced), scored on what
the model writes (greedy, up to the first line break) by exact match and token F1
against every reference (answers.py). The "chat" template asks the same as a user turn
through the model's chat template, and trains on the assistant's answer.

Only the official dev file is used (SQuAD's train file is not staged here): its articles
are shuffled with the data seed and dealt into three groups, test first (about 30% of
the questions), then validation (about 15%), then training, so that no paragraph is on
two sides. The "empty" template drops the labels: "<paragraph>\\n<question>\\n".
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from edgezo.errors import TaskError
from edgezo.tasks.base import Example, Task
from edgezo.tasks.data import find_task_dir, load_from_hub

FILE = "dev-v1.1.json"
TEST_SHARE, VALIDATION_SHARE = 0.30, 0.15


def read_squad(path: Path) -> list[dict]:
    """One row a question: article index, title, context, question and answer texts."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))["data"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise TaskError(f"{path}: not a SQuAD v1.1 file ({err}); expected "
                        '{"data": [{"title", "paragraphs": [...]}, ...]}') from None
    rows = []
    for a, article in enumerate(data):
        for p, paragraph in enumerate(article.get("paragraphs", [])):
            for q, qa in enumerate(paragraph.get("qas", [])):
                answers = [x.get("text") for x in qa.get("answers", [])]
                where = f"{path}: article {a}, paragraph {p}, question {q}"
                if not isinstance(qa.get("question"), str) or not isinstance(
                        paragraph.get("context"), str):
                    raise TaskError(f"{where}: needs a 'question' and its paragraph a "
                                    "'context' (strings)")
                if not answers or not all(isinstance(x, str) and x.strip() for x in answers):
                    raise TaskError(f"{where}: needs at least one answer with a 'text'")
                rows.append({"article": a, "title": article.get("title", ""),
                             "context": paragraph["context"], "question": qa["question"],
                             "answers": answers, "id": qa.get("id", f"{a}-{p}-{q}")})
    if not rows:
        raise TaskError(f"{path}: holds no questions")
    return rows


def _hub_rows() -> list[dict]:
    """The dev split from the Hugging Face hub, as read_squad's rows (articles in order of
    first appearance)."""
    articles: dict[str, int] = {}
    rows = []
    for r in load_from_hub("squad", None, "validation"):
        a = articles.setdefault(r["title"], len(articles))
        rows.append({"article": a, "title": r["title"], "context": r["context"],
                     "question": r["question"], "answers": list(r["answers"]["text"]),
                     "id": r["id"]})
    return rows


class SQuAD(Task):
    name = "squad"
    loss = "lm"
    generative = True
    templates = ("aligned", "empty", "chat")
    max_new_tokens = 24  # MeZO's SQuAD answers are short spans; the first line is kept
    metric = "f1"

    def _rows(self) -> list[dict]:
        folder = find_task_dir(self.name, [FILE], self.data_dir)
        return _hub_rows() if folder is None else read_squad(folder / FILE)

    def train_rows(self) -> list[dict]:
        return self._rows()

    def test_rows(self) -> list[dict] | None:
        return None  # held out by article (_make_splits)

    def example(self, row: dict) -> Example:
        references = tuple(dict.fromkeys(a.strip() for a in row["answers"]))
        context, question = row["context"].strip(), row["question"].strip()
        if self.template == "chat":  # the model's chat template renders the turns
            ask = (f"Title: {row['title'].replace('_', ' ')}\nContext: {context}\n"
                   f"Question: {question}\nAnswer with a few words from the context.")
            return Example("", (references[0],), 0, references=references,
                           messages=(("user", ask), ("assistant", references[0])))
        if self.template == "empty":
            prompt = f"{context}\n{question}\n"
            answer = references[0]
        else:
            prompt = (f"Title: {row['title'].replace('_', ' ')}\nContext: {context}\n"
                      f"Question: {question}\nAnswer:")
            answer = " " + references[0]
        return Example(prompt, (answer,), 0, references=references)

    def _groups(self, rows: list[dict]) -> dict[str, list[int]]:
        """Row indices of the test, validation and training articles."""
        sizes: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            sizes.setdefault(r["article"], []).append(i)
        order = sorted(sizes)
        random.Random(self.data_seed ^ 0x5C0AD).shuffle(order)
        groups: dict[str, list[int]] = {"test": [], "validation": [], "train": []}
        for article in order:
            if len(groups["test"]) < TEST_SHARE * len(rows):
                groups["test"] += sizes[article]
            elif len(groups["validation"]) < VALIDATION_SHARE * len(rows):
                groups["validation"] += sizes[article]
            else:
                groups["train"] += sizes[article]
        if not groups["train"]:
            raise TaskError(f"squad: {len(order)} articles are too few to keep train, "
                            "validation and test apart; use the whole dev file")
        return groups

    def _make_splits(self) -> dict[str, list[Example]]:
        rows = self._rows()
        groups = self._groups(rows)
        rng = random.Random(self.data_seed)
        want = {"test": self.num_test_when_split, "validation": self.num_validation,
                "train": self.num_train}
        picked = {k: rng.sample(v, min(want[k], len(v))) for k, v in groups.items()}
        train = picked["train"]
        if self.train_examples == 0 or (self.train_examples or 0) > len(train):
            taken = set(train)
            rest = [i for i in groups["train"] if i not in taken]
            random.Random(self.data_seed ^ 0x7A1E).shuffle(rest)
            train = train + rest[:None if self.train_examples == 0
                                 else self.train_examples - len(train)]
        elif self.train_examples:
            train = train[:self.train_examples]
        picked["train"] = train
        self.source_rows = picked
        splits = {k: [self.example(rows[i]) for i in v] for k, v in picked.items()}
        articles = {k: len({rows[i]["article"] for i in v}) for k, v in groups.items()}
        self.split_info = {
            **{k: len(v) for k, v in splits.items()}, "template": self.template,
            "notes": [f"SQuAD's dev file split by article ({articles['train']} training, "
                      f"{articles['validation']} validation, {articles['test']} test "
                      "articles): no paragraph is on two sides"]}
        return splits
