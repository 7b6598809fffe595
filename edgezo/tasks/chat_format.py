"""Conversations as a task: JSONL rows in the formats chat fine-tuning tools read,
rendered by the model's own chat template, trained on the assistant's tokens.

    {"messages": [{"role": "system", "content": ...}, {"role": "user", ...},
                  {"role": "assistant", ...}, ...]}       # several turns
    {"prompt": "...", "completion": "..."}              # or message lists for either
    {"text": "..."}                                     # plain text, no template

A file holds one format. A conversation ends with the assistant's turn: that turn is
what an evaluation asks the model to write (greedy, up to its end of turn; F1 and exact
match against it). What the loss covers is `train_on`: "assistant" (every assistant
turn, the default), "last" (the last one only) or "all" (every token, the template's
included). Text rows train on every token and are scored by the mean log-likelihood of
their tokens.

Assistant turns are found by rendering the conversation up to each turn (with the
template's generation prompt) and up to its end: the characters between are the turn's,
and the tokens that start inside them carry labels (the tokenizer's offsets).
"""

from __future__ import annotations

import torch

from edgezo.errors import TaskError

ROLES = ("system", "user", "assistant")
TRAIN_ON = ("assistant", "last", "all")
FORMATS = {"messages": ("messages",), "prompt-completion": ("prompt", "completion"),
           "text": ("text",)}


def row_format(row: dict) -> str | None:
    """Which chat format a JSONL row is in, or None (a classification row: one with a
    label or candidates, whatever else it holds, e.g. a "text" field its template reads)."""
    if "label" in row or "candidates" in row:
        return None
    for name, fields in FORMATS.items():
        if all(f in row for f in fields):
            return name
    return None


def _messages(value, where: str, field: str, default_role: str) -> list[tuple[str, str]]:
    if isinstance(value, str):
        return [(default_role, value)]
    if not isinstance(value, list) or not value:
        raise TaskError(f"{where}: field {field!r} must be a string or a non-empty list of "
                        '{"role", "content"} messages')
    out = []
    for k, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) \
                or m.get("role") not in ROLES:
            raise TaskError(f"{where}: {field}[{k}] must be {{\"role\": one of "
                            f"{', '.join(ROLES)}, \"content\": a string}}, got {m!r}")
        out.append((m["role"], m["content"]))
    return out


def parse_row(row: dict, fmt: str, where: str) -> tuple[tuple[str, str], ...]:
    """A row as (role, content) messages; a text row is one ("text", content)."""
    if row_format(row) != fmt:
        raise TaskError(f"{where}: expected a {fmt} row ({', '.join(FORMATS[fmt])}) like "
                        "the file's first; one file holds one format")
    if fmt == "text":
        if not isinstance(row["text"], str) or not row["text"].strip():
            raise TaskError(f"{where}: field 'text' must be a non-empty string")
        return (("text", row["text"]),)
    if fmt == "messages":
        messages = _messages(row["messages"], where, "messages", "user")
    else:
        messages = (_messages(row["prompt"], where, "prompt", "user")
                    + _messages(row["completion"], where, "completion", "assistant"))
    if messages[-1][0] != "assistant":
        raise TaskError(f"{where}: the conversation must end with an assistant message "
                        "(the answer it teaches)")
    first = next(r for r, _ in messages if r != "system")
    if first != "user":
        raise TaskError(f"{where}: the conversation must start with a user message (after "
                        "any system message): an assistant answers something")
    return tuple(messages)


def _template_check(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise TaskError("this model's tokenizer has no chat template, so conversations "
                        "cannot be rendered as it was trained to read them; use an "
                        "instruction-tuned model (one with a chat template), or {\"text\"} "
                        "rows")


def _render(tokenizer, messages, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        [{"role": r, "content": c} for r, c in messages], tokenize=False,
        add_generation_prompt=generation_prompt)


def prompt_text(tokenizer, messages: tuple[tuple[str, str], ...]) -> str:
    """The conversation up to its last assistant turn, with the template's cue for the
    assistant to answer: what a generative evaluation continues."""
    return cue(tokenizer, messages[:-1])


def cue(tokenizer, messages) -> str:
    """The conversation so far ((role, content) pairs, or {"role", "content"} dicts),
    rendered with the template's cue for the assistant's next turn."""
    _template_check(tokenizer)
    pairs = [(m["role"], m["content"]) if isinstance(m, dict) else m for m in messages]
    return _render(tokenizer, pairs, True)


def segments(tokenizer, messages: tuple[tuple[str, str], ...], train_on: str
             ) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans the loss covers."""
    if messages[0][0] == "text":
        text = messages[0][1]
        return text, [(0, len(text))]
    _template_check(tokenizer)
    text = _render(tokenizer, messages, False)
    if train_on == "all":
        return text, [(0, len(text))]
    spans = []
    for i, (role, _) in enumerate(messages):
        if role != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True)
        upto = _render(tokenizer, messages[:i + 1], False)
        if not text.startswith(upto) or not upto.startswith(before):
            raise TaskError("this model's chat template renders a conversation differently "
                            "from its turns one by one; use train_on all")
        spans.append((len(before), len(upto)))
    return text, spans[-1:] if train_on == "last" else spans


def encode(encoder, examples: list, train_on: str) -> dict:
    """A language-modelling batch (input_ids, attention_mask, labels; left-padded) whose
    labels are the tokens that start inside the trained spans."""
    tok = encoder.tok
    rows, label_rows = [], []
    for ex in examples:
        text, spans = segments(tok, ex.messages, train_on)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc.input_ids
        labels = [t if any(a <= start < b for a, b in spans) else -100
                  for t, (start, _) in zip(ids, enc.offset_mapping, strict=True)]
        ids, labels = ids[-encoder.max_length:], labels[-encoder.max_length:]
        labels[0] = -100  # nothing before it to predict it from (left padding comes first)
        if all(x == -100 for x in labels[1:]):
            raise TaskError(f"an example has no trained tokens within max_length "
                            f"{encoder.max_length} ({len(enc.input_ids)} tokens): raise "
                            "--max-length")
        rows.append(ids)
        label_rows.append(labels)
    width = -(-max(len(r) for r in rows) // encoder.multiple) * encoder.multiple
    pad = tok.pad_token_id
    return {"input_ids": torch.tensor([[pad] * (width - len(r)) + r for r in rows]),
            "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r)
                                            for r in rows]),
            "labels": torch.tensor([[-100] * (width - len(r)) + r for r in label_rows])}
