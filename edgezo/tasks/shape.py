"""The batch geometry a phase's plan must cover, measured from a task's data."""

from __future__ import annotations

from edgezo.tasks.base import Encoder, Example
from edgezo.zo.batch import Shape


def measure_shape(examples: list[Example], encoder: Encoder, batch_size: int) -> Shape:
    """The longest example's tokens, the rows each example becomes and the positions the
    loss reads logits at, over `examples` (an empty list plans no width)."""
    tokenizer = encoder.tok
    if examples and examples[0].messages:  # conversations: each one rendered and encoded
        widths = [encoder.encode([e])["input_ids"].shape[1] for e in examples]
        return Shape(batch_size, max(widths), 1, max(widths))
    # Token counts of every (prompt + candidate) and candidate, in two batched calls of
    # the fast tokenizer; the longest of each is then encoded as a run would.
    pairs = [(k, e.prompt_for(i), c) for k, e in enumerate(examples)
             for i, c in enumerate(e.candidates)]
    if not pairs:  # an empty split (a small user task): nothing of it will run
        return Shape(batch_size, 0)
    full = tokenizer([p + c for _, p, c in pairs]).input_ids
    answers = tokenizer([c for _, _, c in pairs], add_special_tokens=False).input_ids
    longest = pairs[max(range(len(pairs)), key=lambda j: len(full[j]))][0]
    widest = pairs[max(range(len(pairs)), key=lambda j: len(answers[j]))][0]
    seq_len, rows, positions = 0, 1, 1
    for ex in (examples[longest], examples[widest]):
        enc = encoder.encode([ex])
        seq_len = max(seq_len, int(enc["input_ids"].shape[1]))
        rows = max(rows, int(enc["input_ids"].shape[0]))
        positions = max(positions, logit_positions(enc))
    return Shape(batch_size, seq_len, rows, positions)


def logit_positions(batch: dict) -> int:
    """Positions a batch's loss reads logits at: from the first label on, or the last."""
    if "labels" not in batch:
        return 1
    width = int(batch["labels"].shape[1])
    has = (batch["labels"] != -100).any(0).nonzero()
    first = max(1, int(has[0])) if has.numel() else width - 1
    return width - first + 1


def batch_shape(batch: dict) -> Shape:
    """The geometry of one given batch (an app's learn() or step(batch))."""
    rows, width = (int(n) for n in batch["input_ids"].shape)
    return Shape(rows, width, 1, logit_positions(batch))


def generation_shape(examples: list[Example], encoder: Encoder, batch_size: int,
                     new_tokens: int) -> Shape:
    """A generative evaluation's geometry: its longest prompt (cut to the encoder's
    max_length) and the tokens it writes after it."""
    if not examples:
        return Shape(batch_size, 0)
    lengths = encoder.tok([encoder.prompt_of(e) for e in examples]).input_ids
    longest = min(max(len(ids) for ids in lengths), encoder.max_length)
    return Shape(batch_size, longest + new_tokens, 1, 1, new_tokens)


def prompts_shape(tokenizer, prompts: list[str], max_length: int, new_tokens: int) -> Shape:
    """The geometry of one batch of prompts to write `new_tokens` after."""
    longest = max((len(ids) for ids in tokenizer(prompts).input_ids), default=0)
    return Shape(len(prompts), min(longest, max_length) + new_tokens, 1, 1, new_tokens)
