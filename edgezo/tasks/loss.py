"""Losses and scores of a causal LM on encoded batches, one value per example.

Per-example values (not a batch mean) let the engine split a pair-mode batch [x; x] into
its + and − halves. Logits are computed only at the positions a loss reads
(`logits_to_keep`), which with left padding are the last few: for SST-2 that is one
position instead of the whole sequence, a 64th of the logits at 64 tokens.

Batch formats (all tensors have the example or row count as dim 0):
- single-token candidates: input_ids, attention_mask (left-padded prompts),
  candidate_ids (N, C), gold (N,)
- multi-token candidates: rows are prompt+candidate for each (example, candidate),
  example-major; labels (N*C, T) mark candidate tokens (-100 elsewhere); gold (N,);
  num_candidates C (an int)
- language modelling: input_ids, attention_mask, labels (-100 where no loss)
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch
import torch.nn.functional as F

from edgezo.errors import ConfigError
from edgezo.tasks.answers import f1
from edgezo.tasks.generate import generate
from edgezo.zo.batch import LOGIT_CHUNK_VALUES, batch_rows
from edgezo.zo.staging import static


def _position_ids(model, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Positions that count real tokens only, so a left-padded row scores the same however
    much padding its batch needs (without them every pad shifts the rotary angles, which
    in bf16 moves a log-probability by ~0.1). Prompt-learning adapters place their virtual
    tokens themselves and ignore position ids, so they get none."""
    if not isinstance(model, torch.nn.Module):  # a wrapper (forward-grad's functional call)
        model = getattr(model, "model", None)
    if attention_mask is None or model is None:
        return None
    config = getattr(model, "active_peft_config", None)
    if config is not None and config.is_prompt_learning:
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not _takes_position_ids(type(base)):  # a custom model class may not
        return None
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@functools.cache
def _takes_position_ids(cls: type) -> bool:
    return "position_ids" in inspect.signature(cls.forward).parameters


def _forward(model, batch: dict, keep: int):
    mask = batch.get("attention_mask")
    positions = _position_ids(model, mask)
    extra = {} if positions is None else {"position_ids": positions}
    return model(input_ids=batch["input_ids"], attention_mask=mask, logits_to_keep=keep,
                 use_cache=False, **extra)


def _promote(logits: torch.Tensor) -> torch.Tensor:
    """The loss difference needs at least fp32, whatever the model dtype (fp64 stays)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _logits(model, batch: dict, keep: int) -> torch.Tensor:
    return _promote(_forward(model, batch, keep).logits)



def token_logprob_means(model, batch: dict) -> torch.Tensor:
    """Mean log-probability of the label tokens of each row, shape (rows,)."""
    labels = batch["labels"]
    T = labels.shape[1]
    if static():  # as a CUDA graph's forward (zo/graphs.py): every position, no host read
        first = 1
    else:
        has = (labels != -100).any(0).nonzero()
        first = max(1, int(has[0])) if has.numel() else T - 1  # a host sync, once a batch
    keep = T - first + 1  # logits at positions first-1 .. T-1
    targets = labels[:, T - keep + 1:]
    mask = targets != -100
    head = _chunkable_head(model)
    if head is None:
        logits = _logits(model, batch, keep)[:, :-1]  # predict positions first .. T-1
        total = _label_logprob_sums(logits, targets, mask)
    else:
        with _head_as_identity(head):
            hidden = _forward(model, batch, keep).logits[:, :-1]  # the head's inputs
        perturbed = getattr(head, "label_logprob_sums", None)  # a ZO step's (zo/head.py)
        total = None if perturbed is None else perturbed(hidden, targets, mask)
        if total is None:
            per = max(1, LOGIT_CHUNK_VALUES // (hidden.shape[0] * head.weight.shape[0]))
            total = sum(_label_logprob_sums(
                _promote(head(hidden[:, lo:lo + per].contiguous())),
                targets[:, lo:lo + per], mask[:, lo:lo + per])
                for lo in range(0, hidden.shape[1], per))
    return total / mask.sum(1).clamp(min=1)


def _label_logprob_sums(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
                        ) -> torch.Tensor:
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1))
    return (logp.squeeze(-1) * mask).sum(1)


def _chunkable_head(model):
    """The LM head when the loss can apply it itself, a chunk of positions at a time:
    a module model (not forward-grad's functional wrapper) whose head is a linear map
    and whose logits transformers does not post-process (no final soft-capping)."""
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "get_output_embeddings"):
        return None
    head = model.get_output_embeddings()
    config = getattr(model, "config", None)
    text = config.get_text_config() if config is not None else None
    if not isinstance(head, torch.nn.Linear) or getattr(text, "final_logit_softcapping",
                                                          None):
        return None
    return head


@contextlib.contextmanager
def _head_as_identity(head: torch.nn.Module):
    """For one forward, the head returns its input: the model hands back the hidden
    states it would have turned into logits."""
    saved = head.__dict__.get("forward")
    head.forward = lambda x, *args, **kwargs: x
    try:
        yield
    finally:
        if saved is None:
            del head.forward
        else:
            head.forward = saved


def candidate_scores(model, batch: dict) -> torch.Tensor:
    """Length-normalised log-likelihood of every candidate, shape (N, C)."""
    if "candidate_ids" in batch:
        logp = torch.log_softmax(_logits(model, batch, 1)[:, -1], dim=-1)
        return logp.gather(1, batch["candidate_ids"])
    return token_logprob_means(model, batch).view(-1, batch["num_candidates"])


def example_losses(model, batch: dict) -> torch.Tensor:
    """The per-example training loss, shape (N,)."""
    if "gold" in batch:
        scores = candidate_scores(model, batch)
        if batch.get("loss_type") == "lm":
            # Multiple choice: the gold answer's (length-normalised) negative log-likelihood.
            return -scores.gather(1, batch["gold"][:, None]).squeeze(1)
        # Verbalizer classification loss: cross-entropy across the candidates' scores.
        return F.cross_entropy(scores, batch["gold"], reduction="none")
    return -token_logprob_means(model, batch)


def check_batch(batch: dict) -> None:
    """A batch given to Session.step() has what the loss reads."""
    if "input_ids" not in batch:
        raise ConfigError("a batch needs 'input_ids' (and 'attention_mask', plus 'labels' "
                          "for a language-modelling loss)")
    if "labels" not in batch and "candidate_ids" not in batch:
        raise ConfigError("a batch needs 'labels' (token ids, -100 where no loss applies) "
                          "or 'candidate_ids' and 'gold'")


def shard_batch(batch: dict, rank: int, world: int) -> dict:
    """Rank `rank`'s contiguous share of a batch's examples, padding kept as encoded, so
    that every row is exactly the row the single-process run computes. Multi-token
    candidate batches hold C rows per example (example-major): their rows move together."""
    n = num_examples(batch)
    if n % world:
        raise ValueError(f"a batch of {n} examples does not split over {world} ranks")
    share = n // world
    lo, hi = rank * share, (rank + 1) * share
    per_row = batch_rows(batch) // n  # 1, or the candidates of each example
    out = {}
    for k, v in batch.items():
        if not isinstance(v, torch.Tensor):
            out[k] = v
        elif v.shape[0] == n and k == "gold":
            out[k] = v[lo:hi]
        else:
            out[k] = v[lo * per_row:hi * per_row] if v.shape[0] == n * per_row else v[lo:hi]
    return out


def num_examples(batch: dict) -> int:
    """Examples in a batch, the length of the per-example loss vector."""
    if "gold" in batch:
        return batch["gold"].shape[0]
    return batch_rows(batch)


def negative_accuracy(model, batch: dict) -> torch.Tensor:
    """−1 for each example the model gets right, 0 otherwise: a non-differentiable
    objective that ZO can still minimise, since it only ever compares loss values."""
    if "gold" not in batch:
        raise ValueError("the accuracy objective needs a batch with candidates and 'gold'")
    hits = candidate_scores(model, batch).argmax(-1) == batch["gold"]
    return -hits.to(torch.float32)


def negative_f1(model, batch: dict) -> torch.Tensor:
    """−F1 of the answer the model writes to each prompt (greedy; a generative task's
    batch carries its prompts and references under "written"): SQuAD's score itself,
    which only a ZO estimate can follow. It writes with a KV cache, so it runs in two
    passes, one sign at a time (pair mode's doubled batch cannot share a cache)."""
    spec = batch.get("written")
    if spec is None:
        raise ValueError("the f1 objective needs a generative task's batch (prompts and "
                         "references): --task squad or a conversation file")
    device = next(model.parameters()).device
    texts = generate(model, spec.tokenizer, spec.prompts, spec.max_new_tokens, device,
                     first_line=spec.first_line, max_length=spec.max_length,
                     rendered=spec.rendered)
    return -torch.tensor([f1(t, refs) for t, refs in zip(texts, spec.references,
                                                         strict=True)], device=device)


# The loss function of each objective in edgezo.tasks.catalog's registry.
LOSSES = {"ce": example_losses, "accuracy": negative_accuracy, "f1": negative_f1}
