"""Greedy answers, batched, with a KV cache and stop rules: what a generative task is
scored on, and what `Session.generate` returns.

Prompts are left-padded into one batch (their positions count real tokens only, as the
losses' do) and decoded by transformers' `generate` with its KV cache, so each new token
costs one position's forward, not the whole sequence's. A row stops at the tokenizer's
end of sequence or end of turn, or, with `first_line`, at any token whose text holds a
line break (the answer of a task like SQuAD is one line); the batch stops when every row
has. Greedy decoding is deterministic: no sampling settings of the model's own
generation config are inherited.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from edgezo.errors import ConfigError
from edgezo.tasks import chat_format
from edgezo.tasks.answers import first_line as first_line_of


@dataclass(frozen=True)
class Writing:
    """What a batch of a generative task needs for the model to write its answers (the
    f1 objective): the prompts, their references and how to write."""

    prompts: list[str]
    references: list[tuple[str, ...]]
    tokenizer: object
    max_new_tokens: int
    first_line: bool
    max_length: int
    rendered: bool  # prompts from a chat template (generate's `rendered`)


# End-of-turn markers of the chat templates edgezo meets (ChatML, Llama 3, Phi-3, Gemma).
TURN_ENDS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


def stop_ids(tokenizer, first_line: bool) -> list[int]:
    """The token ids that end a row: end of sequence, end of turn, and with `first_line`
    every token whose text holds a line break."""
    return list(_stop_ids(tokenizer, first_line))


@functools.lru_cache(maxsize=8)
def _stop_ids(tokenizer, first_line: bool) -> tuple[int, ...]:
    vocab = tokenizer.get_vocab()
    ids = {tokenizer.eos_token_id} | {vocab[t] for t in TURN_ENDS if t in vocab}
    if first_line:
        size = len(tokenizer)
        texts = tokenizer.batch_decode([[i] for i in range(size)])
        ids |= {i for i, text in enumerate(texts) if "\n" in text}
    return tuple(sorted(i for i in ids if i is not None))


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int,
             device: torch.device, *, first_line: bool = False,
             max_length: int | None = None, streamer=None,
             rendered: bool = False) -> list[str]:
    """Each prompt's greedy continuation, at most `max_new_tokens` tokens (`first_line`:
    up to its first line break, stripped). `max_length`: prompts longer than this many
    tokens keep their last ones (the question and the cue at the end). `streamer`: a
    transformers streamer that hears each token as it is written (one prompt).
    `rendered`: the prompts come from a chat template, which writes the special tokens
    (BOS) itself, so the tokenizer adds none (as chat_format.encode trains them)."""
    from transformers import GenerationConfig

    if not prompts:
        return []
    side, cut = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side = tokenizer.truncation_side = "left"
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True,
                        truncation=max_length is not None, max_length=max_length,
                        add_special_tokens=not rendered)
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = side, cut
    stops = stop_ids(tokenizer, first_line)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    settings = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False,
                                num_beams=1, pad_token_id=pad, eos_token_id=stops,
                                use_cache=True)
    width = enc.input_ids.shape[1]
    out = model.generate(input_ids=enc.input_ids.to(device),
                         attention_mask=enc.attention_mask.to(device),
                         generation_config=settings, streamer=streamer)
    texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return [first_line_of(t) for t in texts] if first_line else texts


def reply(model, tokenizer, prompts: str | list[str] | list[dict] | list[list[dict]],
          max_new_tokens: int, device: torch.device, streamer=None) -> list[str]:
    """Greedy answers to strings, or to conversations ({"role", "content"} messages) that
    the model's chat template renders (an answer then ends with the assistant's turn).
    A long conversation keeps its latest turns: the model's context, less the answer."""
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], dict)):
        prompts = [prompts]
    rendered = [not isinstance(p, str) for p in prompts]
    if len(set(rendered)) > 1:
        raise ConfigError("generate() takes strings or conversations, not both at once")
    texts = [p if isinstance(p, str) else chat_format.cue(tokenizer, p) for p in prompts]
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    return generate(model, tokenizer, texts, max_new_tokens, device, streamer=streamer,
                    rendered=bool(rendered and rendered[0]),
                    max_length=max(8, context - max_new_tokens) if context else None)
