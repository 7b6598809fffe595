"""A task's score on examples: accuracy of the candidate the model scores highest, F1
and exact match of the answers it writes (against the references), or the
log-likelihood of texts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from edgezo.tasks import answers
from edgezo.tasks.base import Encoder, Example, Task
from edgezo.tasks.generate import generate
from edgezo.tasks.loss import candidate_scores, token_logprob_means

Progress = Callable[[int, int], None] | None


@dataclass
class Scorer:
    """One evaluation's model, encoding and batch size. `admit(batch)` and
    `admit_prompts(prompts)` price a batch against the memory budget before it runs."""

    model: torch.nn.Module
    encoder: Encoder
    task: Task
    device: torch.device
    batch_size: int
    admit: Callable[[dict], None]
    admit_prompts: Callable[[list[str]], None]

    def score(self, examples: list[Example], progress: Progress = None) -> dict:
        if self.task.generative:
            return self.written(examples, progress)
        if self.task.metric == "log_likelihood":
            return self.likelihood(examples, progress)
        return self.accuracy(examples, progress)

    def accuracy(self, examples: list[Example], progress: Progress = None) -> dict:
        """The share of examples whose highest-scored candidate is the gold one; with
        grouped examples (MultiRC's answer options), also the share of groups entirely
        right (exact match)."""
        hits: list[bool] = []
        groups: dict[str, list[bool]] = {}
        for i in range(0, len(examples), self.batch_size):
            part = examples[i:i + self.batch_size]
            batch = self._on_device(self.encoder.encode(part))
            right = (candidate_scores(self.model, batch).argmax(-1) == batch["gold"]).tolist()
            hits += right
            for ex, ok in zip(part, right, strict=True):
                if ex.group is not None:
                    groups.setdefault(ex.group, []).append(ok)
            if progress is not None:
                progress(len(hits), len(examples))
        accuracy = sum(hits) / max(1, len(hits))
        result = {"metric": "accuracy", "score": accuracy, "accuracy": accuracy,
                  "examples": len(hits)}
        if groups:
            result["exact_match"] = sum(all(v) for v in groups.values()) / len(groups)
            result["groups"] = len(groups)
        return result

    def _on_device(self, batch: dict) -> dict:
        """`batch` admitted against the budget, then on the model's device."""
        self.admit(batch)
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()}

    def written(self, examples: list[Example], progress: Progress = None) -> dict:
        """F1 and exact match of the model's greedy answers (generate.py)."""
        f1s: list[float] = []
        ems: list[float] = []
        for i in range(0, len(examples), self.batch_size):
            part = examples[i:i + self.batch_size]
            prompts = [self.encoder.prompt_of(ex) for ex in part]
            self.admit_prompts(prompts)
            written = generate(self.model, self.encoder.tok, prompts,
                               self.task.max_new_tokens, self.device,
                               first_line=self.task.first_line,
                               max_length=self.encoder.max_length,
                               rendered=bool(part[0].messages))
            for ex, text in zip(part, written, strict=True):
                f1s.append(answers.f1(text, ex.references))
                ems.append(answers.exact_match(text, ex.references))
            if progress is not None:
                progress(len(f1s), len(examples))
        n = max(1, len(f1s))
        return {"metric": "f1", "score": sum(f1s) / n, "f1": sum(f1s) / n,
                "exact_match": sum(ems) / n, "examples": len(f1s)}

    def likelihood(self, examples: list[Example], progress: Progress = None) -> dict:
        """Texts: the mean log-likelihood of their tokens (higher is better)."""
        values: list[float] = []
        for i in range(0, len(examples), self.batch_size):
            batch = self._on_device(self.encoder.encode(examples[i:i + self.batch_size]))
            values += token_logprob_means(self.model, batch).tolist()
            if progress is not None:
                progress(len(values), len(examples))
        mean = sum(values) / max(1, len(values))
        return {"metric": "log_likelihood", "score": mean, "log_likelihood": mean,
                "examples": len(values)}
