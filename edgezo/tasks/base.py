"""Tasks: examples, ZO-Bench splits, prompt templates and batch encoding.

A task turns raw rows into Examples (a prompt, candidate continuations and the gold
index). The encoder turns Examples into the tensors the losses in `loss.py` read. Splits
follow ZO-Bench: 1000 train and 500 validation examples sampled without overlap from the
training file with a fixed data seed, and the official dev file as the test set.
`train_examples` takes more (or fewer) training rows without moving the validation set.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from edgezo.errors import TaskError
from edgezo.tasks import chat_format
from edgezo.tasks.catalog import TEMPLATES
from edgezo.tasks.generate import Writing

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Example:
    """A prompt, the candidate continuations and the gold index.

    `prompts` gives each candidate its own prompt (WinoGrande puts the option before a
    shared continuation); `group` ties examples scored together (a MultiRC question's
    answer options, for exact match). A generative task's example has one candidate, the
    answer it trains on, and the `references` a written answer is scored against. A
    conversation's example holds its `messages` ((role, content) pairs; chat_format.py),
    which the model's chat template renders: its prompt is then empty.
    """

    prompt: str
    candidates: tuple[str, ...]
    gold: int
    prompts: tuple[str, ...] | None = None
    group: str | None = None
    references: tuple[str, ...] = ()
    messages: tuple[tuple[str, str], ...] = ()

    def prompt_for(self, i: int) -> str:
        return self.prompt if self.prompts is None else self.prompts[i]


class Task(ABC):
    """Base class. Subclasses set `name` and implement `train_rows` / `test_rows` / `example`.

    `loss` is "classification" (cross-entropy over the candidates' scores: the verbalizer
    loss) or "lm" (the gold answer's token log-likelihood, for multiple choice).
    `template` is "aligned" (ZO-Bench's prompt) or "empty" (the bare inputs with the
    same candidates), for the task-alignment study; a task may define more (`templates`).
    "auto" takes `default_template`: the prompt that scored best zero-shot on the task's
    validation rows, since the prompt decides where a ZO run starts (BENCHMARKS.md,
    "SST-2's prompt, chosen on validation").
    """

    name = ""
    loss = "classification"
    # A generative task is scored on what the model writes (greedy, at most
    # max_new_tokens, up to the first line break) by `metric` (answers.py), not by
    # ranking candidates: then "f1", with exact match beside it.
    generative = False
    max_new_tokens = 0
    first_line = True
    metric = "accuracy"
    templates: tuple[str, ...] = ("aligned", "empty")
    default_template = "aligned"
    num_train = 1000
    num_validation = 500
    num_test_when_split = 1000  # at most this many held out when there is no test file

    def __init__(self, data_dir: str | None = None, data_seed: int = 0,
                 template: str = "auto", train_examples: int | None = None):
        if template not in TEMPLATES:
            raise TEMPLATES.unknown(template)
        template = self.default_template if template == "auto" else template
        if template not in self.templates:
            raise TaskError(f"{self.name or 'this task'} has no {template!r} "
                            f"template; it has: auto, {', '.join(self.templates)}")
        self.data_dir = data_dir
        self.data_seed = data_seed
        self.template = template
        if train_examples is not None and train_examples < 0:
            raise TaskError(f"train_examples must be 0 (every row) or more, got {train_examples}")
        # None: num_train (ZO-Bench's 1000); 0: every row not held out for validation/test
        self.train_examples = train_examples
        self._splits: dict[str, list[Example]] | None = None
        self.source_rows: dict[str, list[int]] = {}  # rows of the training file per split
        self.split_info: dict = {}
        self.sample_gap: str | None = None  # why the shipped sample could not serve

    @abstractmethod
    def train_rows(self) -> list[dict]:
        """The rows of the training file (train and validation are sampled from them)."""

    @abstractmethod
    def test_rows(self) -> list[dict] | None:
        """The rows of the official evaluation file (the test set); None when the data has
        no separate file, and the test set is held out of `train_rows` instead."""

    @abstractmethod
    def example(self, row: dict) -> Example | list[Example]:
        """One raw row as a prompt, its candidates and the gold index (or several)."""

    def _examples(self, rows: list[dict], picked: list[int]) -> list[Example]:
        out: list[Example] = []
        for i in picked:
            ex = self.example(rows[i])
            out.extend(ex if isinstance(ex, list) else [ex])
        return out

    def split(self, name: str) -> list[Example]:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; valid: {', '.join(SPLITS)}")
        if self._splits is None:
            self._splits = self._make_splits()
        return self._splits[name]

    def sample_rows(self) -> dict[str, list[tuple[int, dict]]] | None:
        """The train and validation rows shipped inside the package (data seed 0's
        sample, in order), each with its row number in the task's training file; None
        when the task ships none, or a data folder was given."""
        return None

    def _sample_gap(self) -> str | None:
        """Why the shipped sample cannot serve this task's settings, or None when it can:
        it holds data seed 0's draw and no training rows beyond it."""
        if self.data_seed != 0:
            return (f"the {self.name} data shipped with edgezo is data seed 0's sample; "
                    f"data seed {self.data_seed} draws from the whole training file")
        if self.train_examples == 0 or (self.train_examples or 0) > self.num_train:
            return (f"the {self.name} data shipped with edgezo holds {self.num_train} "
                    f"training rows; train_examples {self.train_examples} needs the whole "
                    "training file")
        return None

    def _make_splits(self) -> dict[str, list[Example]]:
        sample = self.sample_rows()
        if sample is not None:
            self.sample_gap = self._sample_gap()
            if self.sample_gap is None:
                return self._splits_of_sample(sample)
        rows = self.train_rows()
        test_rows = self.test_rows()
        order = list(range(len(rows)))
        notes = []
        if test_rows is None:
            # No evaluation file here: hold the test set out of the only file first.
            random.Random(self.data_seed ^ 0x7E57).shuffle(order)
            n_test = min(self.num_test_when_split, len(rows) // 3)
            test_idx, order = order[:n_test], order[n_test:]
            test = self._examples(rows, test_idx)
            self.source_rows["test"] = test_idx
            notes.append(f"no separate evaluation file: the test set is {n_test} rows held "
                         "out of the only file, disjoint from train and validation")
        else:
            test = [e for r in test_rows for e in self._examples([r], [0])]
        want = self.num_train + self.num_validation
        if len(order) >= want:
            picked = [order[i] for i in random.Random(self.data_seed).sample(range(len(order)),
                                                                              want)]
            n_train = self.num_train
        else:
            # Too few rows for 1000 + 500: the same 2:1 proportion, disjoint.
            picked = [order[i] for i in random.Random(self.data_seed).sample(range(len(order)),
                                                                              len(order))]
            n_train = round(len(order) * self.num_train / want)
            notes.append(f"only {len(order)} rows for train + validation: split "
                         f"{n_train}/{len(order) - n_train}")
        self.source_rows["validation"] = picked[n_train:]
        self.source_rows["train"] = self._train_rows(picked[:n_train], order, picked, notes)
        splits = {"train": self._examples(rows, self.source_rows["train"]),
                  "validation": self._examples(rows, self.source_rows["validation"]),
                  "test": test}
        self.split_info = {"train": len(splits["train"]),
                           "validation": len(splits["validation"]),
                           "test": len(splits["test"]), "template": self.template,
                           "notes": notes}
        return splits

    def _splits_of_sample(self, sample: dict[str, list[tuple[int, dict]]]
                          ) -> dict[str, list[Example]]:
        """The splits from the shipped sample: the same examples, in the same order, as
        the whole training file gives with data seed 0 (a test with the full data checks
        it)."""
        train = sample["train"][:self.train_examples or None]
        self.source_rows = {"train": [i for i, _ in train],
                            "validation": [i for i, _ in sample["validation"]]}
        test_rows = self.test_rows() or []
        splits = {"train": [e for _, r in train for e in self._examples([r], [0])],
                  "validation": [e for _, r in sample["validation"]
                                 for e in self._examples([r], [0])],
                  "test": [e for r in test_rows for e in self._examples([r], [0])]}
        self.split_info = {**{k: len(v) for k, v in splits.items()},
                           "template": self.template,
                           "notes": [f"the {self.name} sample shipped with edgezo (data "
                                     "seed 0); --data-dir or $EDGEZO_DATA_DIR reads other "
                                     "files"]}
        return splits

    def _train_rows(self, default: list[int], order: list[int], picked: list[int],
                    notes: list[str]) -> list[int]:
        """The training rows: ZO-Bench's sample (`default`), a prefix of it, or it followed
        by rows drawn from the rest of the file.

        The validation rows are the default split's whatever the count, so runs with
        different `train_examples` are scored on the same validation set, and the default
        split stays the one every earlier run used.
        """
        want = self.train_examples
        if want is None or want == len(default):
            return default
        if 0 < want < len(default):
            return default[:want]
        taken = set(picked)
        rest = [i for i in order if i not in taken]
        random.Random(self.data_seed ^ 0x7A1E).shuffle(rest)
        extra = rest if want == 0 else rest[:want - len(default)]
        if want and len(default) + len(extra) < want:
            notes.append(f"train_examples {want}: the file has {len(default) + len(extra)} "
                         "rows besides validation (and test), all used")
        return default + extra


class Encoder:
    """Turns Examples into left-padded tensors for `loss.example_losses`/`candidate_scores`.

    When every candidate is one token that extends the prompt's tokenization, a batch holds
    one row per example and the scores are read at its last position; otherwise one row
    per (example, candidate) with the candidate tokens as labels.
    """

    def __init__(self, tokenizer, max_length: int = 256, loss: str = "classification",
                 pad_to_multiple_of: int = 8, train_on: str = "assistant",
                 writes: tuple[int, bool] | None = None):
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        tokenizer.truncation_side = "left"  # keep the template's end and the answer
        self.tok = tokenizer
        self.max_length = max_length
        self.loss = loss  # "lm": the batch's loss is the gold answer's log-likelihood
        # Widths rounded up to a multiple of 8 tokens: a CPU's kernel libraries cache
        # per input shape (oneDNN keeps a cache for each), so free widths would grow the
        # process with every new width over a run; 8 also suits GPU tensor cores
        # (BENCHMARKS.md, "Planner accuracy").
        self.multiple = pad_to_multiple_of
        self._single: dict[tuple[str, ...], list[int] | None] = {}
        self.train_on = train_on  # what a conversation's loss covers (chat_format.TRAIN_ON)
        # a generative task's (max_new_tokens, first_line): its batches also carry their
        # prompts and references ("written"), for the f1 objective
        self.writes = writes

    def prompt_of(self, ex: Example) -> str:
        """The text a generative evaluation continues: the prompt, or a conversation
        rendered up to its last assistant turn by the chat template."""
        return chat_format.prompt_text(self.tok, ex.messages) if ex.messages else ex.prompt

    def _single_token_ids(self, ex: Example) -> list[int] | None:
        if ex.prompts is not None:
            return None
        key = ex.candidates
        if key not in self._single:
            ids = [self.tok(c, add_special_tokens=False).input_ids for c in key]
            if self.loss == "classification" and len({tuple(i) for i in ids}) < len(ids):
                # e.g. both words unknown to the vocabulary: every score would tie and the
                # loss, which compares the candidates, would be flat (an LM loss, on the
                # gold answer alone, still trains)
                raise TaskError(f"the candidates {list(key)} tokenize to the same ids "
                                f"({ids}) with this model's tokenizer, so no answer can "
                                "win; pick answer words the tokenizer tells apart")
            ok = all(len(i) == 1 for i in ids)
            if ok:  # the candidate must also be one token when appended to a prompt
                base = self.tok(ex.prompt).input_ids
                ok = all(self.tok(ex.prompt + c).input_ids == base + i
                         for c, i in zip(key, ids, strict=True))
            self._single[key] = [i[0] for i in ids] if ok else None
        return self._single[key]

    def encode(self, examples: list[Example]) -> dict:
        batch = self._encode(examples)
        if self.writes is not None and examples and examples[0].references:
            batch["written"] = Writing(
                [self.prompt_of(ex) for ex in examples], [ex.references for ex in examples],
                self.tok, self.writes[0], self.writes[1], self.max_length,
                bool(examples[0].messages))
        return batch

    def _encode(self, examples: list[Example]) -> dict:
        if examples and examples[0].messages:
            return chat_format.encode(self, examples, self.train_on)
        singles = [self._single_token_ids(ex) for ex in examples]
        gold = torch.tensor([ex.gold for ex in examples])
        if all(s is not None for s in singles):
            enc = self.tok([ex.prompt for ex in examples], return_tensors="pt", padding=True,
                           truncation=True, max_length=self.max_length,
                           pad_to_multiple_of=self.multiple)
            return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask,
                    "candidate_ids": torch.tensor(singles), "gold": gold,
                    "loss_type": self.loss}
        counts = {len(ex.candidates) for ex in examples}
        if len(counts) != 1:
            raise ValueError("all examples of a batch must have the same number of candidates")
        rows, label_rows = [], []
        for ex in examples:
            for i, c in enumerate(ex.candidates):
                prompt = ex.prompt_for(i)
                p = self.tok(prompt).input_ids
                full = self.tok(prompt + c).input_ids
                # The candidate's tokens: what follows the longest common prefix with the
                # prompt (a merge at the boundary moves that token into the answer).
                common = 0
                while common < min(len(p), len(full)) and p[common] == full[common]:
                    common += 1
                full = full[-self.max_length:]
                n_answer = min(max(1, len(full) - common), len(full) - 1)
                rows.append(full)
                label_rows.append([-100] * (len(full) - n_answer) + full[-n_answer:])
        width = -(-max(len(r) for r in rows) // self.multiple) * self.multiple
        pad = self.tok.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        labels = torch.tensor([[-100] * (width - len(r)) + r for r in label_rows])
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels,
                "gold": gold, "num_candidates": counts.pop(), "loss_type": self.loss}


def batches(examples: list[Example], batch_size: int, seed: int, start_step: int = 0
            ) -> Iterator[list[Example]]:
    """An endless stream of training batches: a fresh shuffle every epoch, from `seed`.

    Step t's batch is a pure function of (examples, batch_size, seed, t), so a run resumed
    at step t sees exactly the batches the uninterrupted run would have.
    """
    per_epoch = max(1, len(examples) // batch_size)
    step, epoch, order = start_step, -1, []
    while True:
        e, offset = divmod(step, per_epoch)
        if e != epoch:
            epoch, order = e, list(range(len(examples)))
            random.Random(seed * 1_000_003 + epoch).shuffle(order)
        i = offset * batch_size
        yield [examples[j] for j in order[i: i + batch_size]]
        step += 1
