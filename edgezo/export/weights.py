"""The weights an export writes: the trained model as plain transformers tensors.

A LoRA model is merged on the fly, one projection at a time (base weight + B·A·scale),
without touching the model: `merge_and_unload` would rewrite the base weights in place
(and `unmerge` would not restore them bit for bit), which a live Session, whose runs are
bit-identical on resume and replay, cannot allow. Unchanged tensors are shared, not
copied, so viewing a model this way costs only the merged projections.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from edgezo.errors import ConfigError


def _peft_parts(model: nn.Module) -> tuple[nn.Module, bool]:
    """(the transformers model underneath, whether it carries LoRA layers); refuses the
    adapters that have no weight form."""
    config = getattr(model, "active_peft_config", None)
    if config is None:
        return model, False
    if config.is_prompt_learning:
        kind = str(config.peft_type.value).lower().replace("_tuning", "")
        raise ConfigError(f"{kind} tuning adds virtual tokens that no plain model holds, so "
                          "it cannot be exported as GGUF or ONNX; ship the adapter with "
                          "--format peft, or train with --scheme lora, full or head")
    if str(config.peft_type.value) != "LORA":
        raise ConfigError(f"{config.peft_type.value} adapters cannot be merged for export; "
                          "use --format peft")
    return model.get_base_model(), True


def _refuse_quantized(model: nn.Module) -> None:
    if getattr(model, "hf_quantizer", None) is not None or any(
            hasattr(p, "quant_state") or type(p).__name__ == "Int8Params"
            for p in model.parameters()):
        raise ConfigError("this model's base is quantized by bitsandbytes (--quantize), whose "
                          "blocks GGUF and ONNX cannot take; export the run folder with "
                          "`edgezo export RUN --format gguf`, which merges the adapter into "
                          "the full-precision base")


def _merged_lora(layer: nn.Module) -> dict[str, torch.Tensor]:
    """A LoRA layer's weight and bias as one plain layer would hold them, merged in fp32:
    a ZO update's B·A is often below a bf16 weight's rounding step, and the live model
    adds it as a separate output, so merging in bf16 would drop part of what trained
    (callers that want the base's dtype cast after)."""
    base = layer.get_base_layer()
    weight = base.weight.detach()
    if not getattr(layer, "merged", False):  # a merged layer's base already holds B·A
        for name in layer.active_adapters:
            if name in getattr(layer, "lora_A", {}) or name in getattr(layer,
                                                                       "lora_embedding_A", {}):
                weight = weight.float() + layer.get_delta_weight(name).float()
    out = {"weight": weight}
    if getattr(base, "bias", None) is not None:
        out["bias"] = base.bias.detach()
    return out


def trained_state(model: nn.Module) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """(the transformers model, its state dict with LoRA merged), named as a plain model
    of its class names them (`model.layers.0.self_attn.q_proj.weight`). Refuses prefix
    and prompt adapters (no weight form) and bitsandbytes-quantized bases."""
    base, has_lora = _peft_parts(model)
    _refuse_quantized(base)
    if not has_lora:
        return base, {k: v.detach() for k, v in base.state_dict().items()}
    from peft.tuners.lora import LoraLayer

    state: dict[str, torch.Tensor] = {}
    lora_prefixes = []
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            lora_prefixes.append(name + ".")
            state.update({f"{name}.{k}": v for k, v in _merged_lora(module).items()})
    for key, value in base.state_dict().items():
        if not key.startswith(tuple(lora_prefixes)):
            state[key] = value.detach()
    return base, state


def _moved(state: dict[str, torch.Tensor], dtype: torch.dtype | None,
           device: torch.device | str | None) -> dict[str, torch.Tensor]:
    """The state in `dtype` (floating tensors) on `device`; a tensor already there is not
    copied, and tied tensors stay one tensor."""
    done: dict[tuple, torch.Tensor] = {}
    out = {}
    for key, value in state.items():
        # tied tensors are distinct detach() views of one storage: one cast for them all
        same = (value.untyped_storage().data_ptr(), value.storage_offset(), value.shape)
        if same not in done:
            kind = dtype if dtype is not None and value.is_floating_point() else value.dtype
            done[same] = value.to(device=device or value.device, dtype=kind)
        out[key] = done[same]
    return out


def plain_model(model: nn.Module, dtype: torch.dtype | None = None,
                device: torch.device | str | None = None) -> nn.Module:
    """A fresh transformers model (no peft wrappers, no hooks) holding the trained
    weights, in `dtype` and on `device` if given. Built on the meta device and filled by
    assignment, so the tensors it does not merge, cast or move are the trained model's
    own, not copies."""
    base, state = trained_state(model)
    with torch.device("meta"):  # its own config: an export's settings stay out of the model
        fresh = type(base)._from_config(copy.deepcopy(base.config))
    dtype = dtype or base.dtype  # LoRA layers come merged in fp32: back to the model's
    fresh.load_state_dict(_moved(state, dtype, device), strict=False, assign=True)
    buffers = dict(base.named_buffers())  # non-persistent ones (rotary inv_freq) too
    for name, buffer in fresh.named_buffers():
        if buffer.is_meta and name in buffers:
            owner, _, leaf = name.rpartition(".")
            value = buffers[name].detach().to(device or buffers[name].device)
            fresh.get_submodule(owner).register_buffer(leaf, value, persistent=False)
    fresh.tie_weights()
    missing = [n for n, p in [*fresh.named_parameters(), *fresh.named_buffers()] if p.is_meta]
    if missing:
        raise ConfigError(f"cannot rebuild {type(base).__name__} for export: {missing[0]} has "
                          "no value in the trained model")
    return fresh.eval()
