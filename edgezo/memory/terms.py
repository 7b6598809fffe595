"""The activation terms of a plan: what a forward (or a backward) over a batch holds, from
the model's config alone. Each term was counted on real layers (see its docstring)."""

from __future__ import annotations

import torch

from edgezo.models.schemes import head_chunk_rows
from edgezo.zo.batch import LOGIT_CHUNK_VALUES


def _inter(text) -> int:
    """The MLP width, whatever the family calls it."""
    return (getattr(text, "intermediate_size", None) or getattr(text, "ffn_dim", None)
            or getattr(text, "n_inner", None) or 4 * text.hidden_size)


def activation_bytes(config, rows: int, seq_len: int, elem: int, positions: int = 1,
                      split: bool = False) -> int:
    """Largest per-layer transient of a no-grad forward plus the logits the loss reads
    (at `positions` positions per row).

    `split`: a pair-mode batch whose layers compute their two halves one after the other;
    the layer's transient is a half's, plus the doubled input and the first half's output
    kept while the second computes (rows x H). So a split pair step holds well under twice
    a two-pass step's transient (BENCHMARKS.md, "Planner accuracy")."""
    text = config.get_text_config()
    hidden = text.hidden_size
    inter = _inter(text)
    heads = text.num_attention_heads
    layer_rows = rows // 2 if split else rows
    tokens = layer_rows * seq_len
    # residual, normed input, q/k/v/attn out (~4H) and the MLP's gate/up/product (~3I)
    layer = tokens * (4 * hidden + 3 * inter) * elem
    scores = layer_rows * heads * seq_len * seq_len * 4  # attention scores if materialized
    kept = rows * seq_len * hidden * elem if split else 0
    vocab = text.vocab_size
    if positions > 1:  # the loss applies the head a chunk of positions at a time
        positions = min(positions, max(1, LOGIT_CHUNK_VALUES // (rows * vocab)))
    logits = rows * positions * vocab * (elem + 3 * 4)  # logits, fp32 copy, log-softmax
    if elem < 4:  # a half-precision head computes in fp32, a chunk of its rows at a time
        logits += min(vocab, head_chunk_rows(hidden)) * hidden * 4
    return layer + scores + kept + logits


def virtual_tokens(model) -> int:
    """Tokens prompt tuning (and p-tuning) put in front of every row's embeddings: each
    layer's hidden states, and the attention over them, are this much longer than the
    batch's text. Prefix tuning's virtual tokens live only in the key/value cache
    (prefix_cache_bytes); every other scheme has none."""
    cfg = getattr(model, "active_peft_config", None)
    kind = getattr(getattr(cfg, "peft_type", None), "value", None)
    if kind not in ("PROMPT_TUNING", "P_TUNING"):
        return 0
    return cfg.num_virtual_tokens


def prefix_cache_bytes(model, rows: int, seq_len: int, elem: int) -> int:
    """Prefix tuning hands its virtual keys/values to the model as a cache, which every
    layer extends with its own keys/values: all layers' K and V over prefix + sequence
    live until the forward ends. 0 for every other scheme."""
    cfg = getattr(model, "active_peft_config", None)
    kind = getattr(getattr(cfg, "peft_type", None), "value", None)
    if kind != "PREFIX_TUNING":
        return 0
    return kv_cache_bytes(model, rows, cfg.num_virtual_tokens + seq_len, elem)


def kv_cache_bytes(model, rows: int, tokens: int, elem: int) -> int:
    """Every layer's keys and values over `tokens` positions of `rows` rows."""
    text = model.config.get_text_config()
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return rows * text.num_hidden_layers * 2 * kv_heads * tokens * head_dim * elem


def lora_saved_bytes_per_token(model, elem: int) -> int:
    """What LoRA adds to a backward, per token, over all its adapted maps: lora_A's input
    (a copy when the adapter's dtype differs from the model's, as peft's fp32 adapters on
    a bf16 model do) and its rank-r output, kept for lora_B."""
    total = 0
    for name, module in model.named_modules():
        if not name.endswith("lora_A"):
            continue
        linears = module.values() if isinstance(module, torch.nn.ModuleDict) else [module]
        for linear in linears:
            w = getattr(linear, "weight", None)
            if w is None:
                continue
            size = w.element_size()
            r, fan_in = w.shape
            total += r * size + (fan_in * size if size != elem else 0)
    return total


def saved_activation_bytes(config, rows: int, seq_len: int, elem: int, layers: int,
                            positions: int = 1, weight_layers: int = 0) -> int:
    """What autograd keeps for a backward through `layers` decoder layers, `weight_layers`
    of which have weights that take a gradient, plus logits."""
    if layers == 0:
        return 0
    text = config.get_text_config()
    hidden = text.hidden_size
    inter = _inter(text)
    tokens = rows * seq_len
    # A layer whose weights are frozen (LoRA's base, prompt tuning) saves 8H + 3I values
    # a token for the backward: the norms' fp32 inputs, q/k/v after rotation, the
    # attention output and its log-sum-exp, and the MLP's gate, activation and up. A test
    # checks this against saved_tensors_hooks' count (BENCHMARKS.md, "Planner accuracy").
    # Fused attention keeps no T x T probabilities. A layer whose weights train also
    # keeps each linear's input for its weight's gradient: 4H + I more (12H + 4I).
    # With padded rows, SDPA also saves each layer's own copy of the additive mask
    # (rows x T x T in the compute dtype), which grows with T squared (BENCHMARKS.md,
    # "Generative tasks").
    # Counted always: a batch of rows of one length saves none, but a plan is a bound.
    frozen = tokens * (8 * hidden + 3 * inter) * elem + rows * seq_len * seq_len * elem
    weights = tokens * (4 * hidden + inter) * elem
    return (layers * frozen + min(weight_layers, layers) * weights
            + rows * positions * text.vocab_size * 3 * 4)


def backward_transient_bytes(config, rows: int, seq_len: int, elem: int) -> int:
    """The gradients a backward holds while it crosses one decoder layer, beside what
    the forward saved: about one layer's forward transient (4H + 3I values a token)."""
    text = config.get_text_config()
    return rows * seq_len * (4 * text.hidden_size + 3 * _inter(text)) * elem
