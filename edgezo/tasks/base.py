"""Tasks: examples, ZO-Bench splits, prompt templates and batch encoding.

A task turns raw rows into Examples (a prompt, candidate continuations and the gold
index). The encoder turns Examples into the tensors the losses in `loss.py` read. Splits
follow ZO-Bench: 1000 train and 500 validation examples sampled without overlap from the
training file with a fixed data seed, and the official dev file as the test set.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

import torch

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Example:
    prompt: str
    candidates: tuple[str, ...]
    gold: int


class Task(ABC):
    """Base class. Subclasses set `name` and implement `train_rows` / `test_rows` / `example`."""

    name = ""
    num_train = 1000
    num_validation = 500

    def __init__(self, data_dir: str | None = None, data_seed: int = 0):
        self.data_dir = data_dir
        self.data_seed = data_seed
        self._splits: dict[str, list[Example]] | None = None
        self.source_rows: dict[str, list[int]] = {}  # rows of the training file per split

    @abstractmethod
    def train_rows(self) -> list[dict]:
        """The rows of the training file (train and validation are sampled from them)."""

    @abstractmethod
    def test_rows(self) -> list[dict]:
        """The rows of the official evaluation file, used as the test set."""

    @abstractmethod
    def example(self, row: dict) -> Example:
        """One raw row as a prompt, its candidates and the gold index."""

    def split(self, name: str) -> list[Example]:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; valid: {', '.join(SPLITS)}")
        if self._splits is None:
            rows = self.train_rows()
            picked = random.Random(self.data_seed).sample(
                range(len(rows)), min(len(rows), self.num_train + self.num_validation))
            self.source_rows = {"train": picked[: self.num_train],
                                "validation": picked[self.num_train:]}
            train = [self.example(rows[i]) for i in self.source_rows["train"]]
            val = [self.example(rows[i]) for i in self.source_rows["validation"]]
            test = [self.example(r) for r in self.test_rows()]
            self._splits = {"train": train, "validation": val, "test": test}
        return self._splits[name]


class Encoder:
    """Turns Examples into left-padded tensors for `loss.example_losses`/`candidate_scores`.

    When every candidate is one token that extends the prompt's tokenization, a batch holds
    one row per example and the scores are read at its last position; otherwise one row
    per (example, candidate) with the candidate tokens as labels.
    """

    def __init__(self, tokenizer, max_length: int = 256):
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        tokenizer.truncation_side = "left"  # keep the template's end and the answer
        self.tok = tokenizer
        self.max_length = max_length
        self._single: dict[tuple[str, ...], list[int] | None] = {}

    def _single_token_ids(self, ex: Example) -> list[int] | None:
        key = ex.candidates
        if key not in self._single:
            ids = [self.tok(c, add_special_tokens=False).input_ids for c in key]
            ok = all(len(i) == 1 for i in ids)
            if ok:  # the candidate must also be one token when appended to a prompt
                base = self.tok(ex.prompt).input_ids
                ok = all(self.tok(ex.prompt + c).input_ids == base + i
                         for c, i in zip(key, ids, strict=True))
            self._single[key] = [i[0] for i in ids] if ok else None
        return self._single[key]

    def encode(self, examples: list[Example]) -> dict:
        singles = [self._single_token_ids(ex) for ex in examples]
        gold = torch.tensor([ex.gold for ex in examples])
        if all(s is not None for s in singles):
            enc = self.tok([ex.prompt for ex in examples], return_tensors="pt", padding=True,
                           truncation=True, max_length=self.max_length)
            return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask,
                    "candidate_ids": torch.tensor(singles), "gold": gold}
        counts = {len(ex.candidates) for ex in examples}
        if len(counts) != 1:
            raise ValueError("all examples of a batch must have the same number of candidates")
        prompts = [self.tok(ex.prompt).input_ids for ex in examples]
        rows, label_rows = [], []
        for ex, p in zip(examples, prompts, strict=True):
            for c in ex.candidates:
                full = self.tok(ex.prompt + c).input_ids
                # The candidate's tokens: what follows the longest common prefix with the
                # prompt (a merge at the boundary moves that token into the answer).
                common = 0
                while common < min(len(p), len(full)) and p[common] == full[common]:
                    common += 1
                full = full[-self.max_length:]
                n_answer = min(max(1, len(full) - common), len(full) - 1)
                rows.append(full)
                label_rows.append([-100] * (len(full) - n_answer) + full[-n_answer:])
        width = max(len(r) for r in rows)
        pad = self.tok.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        labels = torch.tensor([[-100] * (width - len(r)) + r for r in label_rows])
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels,
                "gold": gold, "num_candidates": counts.pop()}


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
