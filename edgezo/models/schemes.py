"""Fine-tuning schemes: which parameters train. The engine perturbs only those.

- full: every parameter;
- lora: peft LoRA adapters (default r=8, α=16 on the attention query/value projections,
  i.e. peft's per-architecture default targets), base frozen;
- prefix: peft prefix tuning, 5 key/value vectors per layer, initialised from the keys
  and values the model computes for 5 real tokens (MeZO's "real activations" init);
- prompt: peft prompt tuning, 10 virtual tokens initialised from embeddings of randomly
  sampled vocabulary tokens;
- head: the LM head only (with tied embeddings, the shared matrix);
- scales: QZO, the per-group scales of a quantized base (edgezo.models.quantized).

Blocks are found the same way for every scheme (`edgezo.zo.blocks`), so a scheme needs no
per-architecture code: LoRA matrices live inside the layers, the prefix/prompt encoder
runs before them.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from edgezo.config.options import SchemeOptions
from edgezo.errors import ConfigError
from edgezo.models import quantized
from edgezo.models.catalog import SCHEMES

# Values of a half-precision head cast to fp32 at a time (4 MiB): SmolLM2's head is 27
# chunks of 1820 rows, a 7B Llama's 125 of 256. The plan prices one chunk for a
# half-precision head; a count of values, not rows, keeps that chunk small whatever the
# model's width (BENCHMARKS.md, "Planned against measured, bf16: the head's fp32 chunk").
HEAD_CHUNK_VALUES = 1 << 20


def head_chunk_rows(hidden: int) -> int:
    """Vocabulary rows of a half-precision head that _fp32_logits casts to fp32 at once."""
    return max(1, HEAD_CHUNK_VALUES // hidden)


def _fp32_logits(head: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The head's logits computed in fp32 from a half-precision head and input, a chunk of
    vocabulary rows at a time (no fp32 copy of the whole matrix).

    Why: in bf16 a logit of magnitude 10-20 has an ulp of 0.06-0.125, so the loss
    difference L(θ+εz) − L(θ−εz) that a ZO estimate reads is lost in the logits' rounding,
    and the projected gradient can come out exactly zero. The loss reads logits at a few
    positions only, so fp32 there costs little (BENCHMARKS.md, "Generative tasks").
    """
    return _HalfHeadLogits.apply(x, head.weight, head.bias)


def _chunked_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                    ) -> torch.Tensor:
    x = x.contiguous().float()
    out = torch.empty(*x.shape[:-1], weight.shape[0], dtype=torch.float32, device=x.device)
    step = head_chunk_rows(weight.shape[1])
    for lo in range(0, weight.shape[0], step):
        hi = min(lo + step, weight.shape[0])
        out[..., lo:hi] = F.linear(x, weight[lo:hi].float(),
                                   None if bias is None else bias[lo:hi].float())
    return out


class _HalfHeadLogits(torch.autograd.Function):
    """fp32 logits of a half-precision head whose backward keeps no fp32 weight.

    Plain autograd would save every chunk's fp32 cast for the backward: the whole head
    in fp32 (108 MiB for SmolLM2) once per call, and a token-level loss calls the head
    once per chunk of positions. Here the backward casts each chunk again."""

    @staticmethod
    def forward(x, weight, bias):
        return _chunked_logits(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight, bias)
        ctx.save_for_forward(x, weight, bias)  # forward-mode AD (the forward gradient)

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        flat = grad.reshape(-1, weight.shape[0])
        xf = x.reshape(-1, x.shape[-1]).float() if need_w else None
        gx = torch.zeros(flat.shape[0], weight.shape[1], device=x.device) if need_x else None
        gw = torch.empty_like(weight) if need_w else None
        step = head_chunk_rows(weight.shape[1])
        for lo in range(0, weight.shape[0], step):
            g = flat[:, lo:lo + step]
            if need_x:
                gx.addmm_(g, weight[lo:lo + step].float())
            if need_w:
                gw[lo:lo + step] = (g.t() @ xf).to(weight.dtype)
        return (None if gx is None else gx.reshape(x.shape).to(x.dtype), gw,
                flat.sum(0).to(bias.dtype) if need_b else None)

    @staticmethod
    def jvp(ctx, x_t, weight_t, bias_t):
        x, weight, _ = ctx.saved_tensors
        out = None if x_t is None else _chunked_logits(x_t, weight, None)
        if weight_t is not None or bias_t is not None:
            part = (_chunked_logits(x, weight_t, bias_t) if weight_t is not None
                    else bias_t.float().expand(*x.shape[:-1], -1))
            out = part if out is None else out + part
        return out


def _prepare_head(model: nn.Module) -> None:
    """Feed the LM head a contiguous input, and compute a half-precision head's logits in
    fp32 (see _fp32_logits).

    Contiguous: with `logits_to_keep`, transformers hands the head a strided slice (rows,
    k, hidden) of the hidden states, and torch's matmul then runs a batched product over a
    copy of the weight expanded to every row: the whole head once per row, for a few rows
    of logits. A contiguous copy of the slice (a few KiB) makes it one plain matrix
    product (BENCHMARKS.md, "Generative tasks").
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear) or getattr(head, "_edgezo_head", False):
        return
    if head.weight.dtype in (torch.float16, torch.bfloat16) and head.weight.device.type != "meta":
        # a bound method: a deep copy of the model rebinds it to the copy's head
        head.forward = types.MethodType(_fp32_logits, head)
    else:
        head.register_forward_pre_hook(
            lambda _module, args: (args[0].contiguous(), *args[1:]) if args else None)
    head._edgezo_head = True


def apply_scheme(model: nn.Module, options: SchemeOptions | str, seed: int = 0,
                 quantize: str | None = None) -> nn.Module:
    """Return the model to train (a peft model for adapter schemes), trainable set by the
    scheme (a name, or RunConfig's scheme section with its options); `seed` draws the
    prompt's and prefix's initial tokens; `quantize` sizes the scales of a meta model
    the planner prices (a loaded model carries its own)."""
    if isinstance(options, str):
        options = SchemeOptions(scheme=options)
    _prepare_head(model)
    return APPLY[SCHEMES[options.scheme].name](model, options, seed, quantize)


def _full(model: nn.Module, options: SchemeOptions, seed: int, quantize: str | None
          ) -> nn.Module:
    return model


def _scales(model: nn.Module, options: SchemeOptions, seed: int, quantize: str | None
            ) -> nn.Module:
    if _on_meta(model) and quantize is not None:
        return quantized.add_scale_placeholders(model, quantize)
    return quantized.train_scales(model)


def _head(model: nn.Module, options: SchemeOptions, seed: int, quantize: str | None
          ) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    head = model.get_output_embeddings()
    if head is None:
        raise ConfigError(f"{type(model).__name__} has no output embedding to train")
    head.weight.requires_grad_(True)
    return model


def _lora(model: nn.Module, options: SchemeOptions, seed: int, quantize: str | None
          ) -> nn.Module:
    import peft

    config = peft.LoraConfig(task_type="CAUSAL_LM", r=options.lora_r,
                             lora_alpha=options.lora_alpha, lora_dropout=0.0,
                             target_modules=options.lora_targets or None)
    try:
        # peft draws the adapters' initial values from torch's global generator: seed it
        # with the run's seed, so the adapters are a function of the run alone (and a
        # resume or replay in another process builds the same ones)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return peft.get_peft_model(model, config)
    except ValueError as err:
        raise ConfigError(f"LoRA cannot target {options.lora_targets or 'the defaults'} "
                          f"in {type(model).__name__}: {err}") from None


def _prompt(model: nn.Module, options: SchemeOptions, seed: int, quantize: str | None
            ) -> nn.Module:
    import peft

    config = peft.PromptTuningConfig(task_type="CAUSAL_LM",
                                     num_virtual_tokens=options.prompt_tokens)
    wrapped = peft.get_peft_model(model, config)
    if not _on_meta(model):  # a plan from a config has no values to start from
        _init_prompt_from_vocab(wrapped, torch.Generator().manual_seed(seed))
    _prompt_per_row(wrapped)
    return wrapped


def _prefix(model: nn.Module, options: SchemeOptions, seed: int, quantize: str | None
            ) -> nn.Module:
    import peft

    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                     num_virtual_tokens=options.prefix_tokens)
    wrapped = peft.get_peft_model(model, config)
    if not _on_meta(model):
        _init_prefix_from_activations(wrapped, torch.Generator().manual_seed(seed))
    return wrapped


# How each registered scheme (edgezo.models.catalog) is applied; a test checks that every
# registered scheme has its function here.
APPLY = {"full": _full, "scales": _scales, "head": _head, "lora": _lora, "prompt": _prompt,
         "prefix": _prefix}


def _on_meta(model: nn.Module) -> bool:
    return next(model.parameters()).device.type == "meta"


def _active_encoder(wrapped) -> nn.Module:
    return wrapped.prompt_encoder[wrapped.active_adapter]


@torch.no_grad()
def _init_prompt_from_vocab(wrapped, generator: torch.Generator) -> None:
    """Virtual tokens start as the embeddings of randomly drawn vocabulary tokens."""
    vocab = wrapped.get_input_embeddings().weight
    weight = _active_encoder(wrapped).embedding.weight
    ids = torch.randint(0, vocab.shape[0], (weight.shape[0],), generator=generator)
    weight.copy_(vocab[ids.to(vocab.device)].to(weight.dtype))


def _prompt_per_row(wrapped) -> None:
    """Make the prompt encoder see one row of virtual-token ids per batch row.

    peft looks the prompt up once and repeats it over the batch; in pair mode the two
    halves of the batch need their own (±εz) prompts, so the lookup must be per row.
    """
    base_get_prompt = wrapped.get_prompt

    def get_prompt(batch_size: int, task_ids=None, **kwargs):
        config = wrapped.active_peft_config
        if config.inference_mode:
            return base_get_prompt(batch_size, task_ids, **kwargs)
        encoder = _active_encoder(wrapped)
        tokens = wrapped.prompt_tokens[wrapped.active_adapter].unsqueeze(0)
        tokens = tokens.expand(batch_size, -1).to(encoder.embedding.weight.device)
        return encoder(tokens)

    wrapped.get_prompt = get_prompt


@torch.no_grad()
def _init_prefix_from_activations(wrapped, generator: torch.Generator) -> None:
    """Prefix keys/values start as the ones the model computes for real tokens.

    peft's prefix embedding row t holds, for every layer l and k ∈ {key, value}, the
    vectors of its (key/value) heads: flat index ((l·2 + k)·H + h)·D + d.
    """
    base = wrapped.get_base_model()
    weight = _active_encoder(wrapped).embedding.weight
    n = weight.shape[0]
    vocab = base.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (1, n), generator=generator).to(weight.device)
    out = base(input_ids=ids, use_cache=True)
    cache = out.past_key_values
    rows = []
    for layer in range(len(cache.layers)):
        keys, values = cache.layers[layer].keys, cache.layers[layer].values  # (1, H, n, D)
        rows += [keys[0].permute(1, 0, 2), values[0].permute(1, 0, 2)]  # (n, H, D)
    flat = torch.stack(rows, dim=1).reshape(n, -1)
    if flat.shape != weight.shape:
        raise ConfigError(f"cannot initialise the prefix of {type(base).__name__}: its cache "
                          f"holds {tuple(flat.shape)} values per prefix, peft expects "
                          f"{tuple(weight.shape)}")
    weight.copy_(flat.to(weight.dtype))
