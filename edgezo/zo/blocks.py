"""Blocks: trainable parameters grouped in execution order, found from the HF model itself.

A block is one decoder layer, or the modules that run before the first layer ("pre":
embeddings) or after the last ("post": final norm, LM head). Blocks are the unit of
perturbation, update, streaming and memory accounting.

Nothing here is per-architecture code: the layer list is the model's ModuleList whose
length is the config's layer count, and the placement of every other module is learned
by tracing one tiny forward pass.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from edgezo.errors import ConfigError, ModelLoadError, unknown_choice
from edgezo.zo.methods import GRANULARITIES


@dataclass
class Unit:
    """A module whose forward edgezo wraps, with the trainable parameters it perturbs.

    `slots` are (local name, global parameter index). A tied parameter appears in the
    units of every module that uses it, under the same global index, so every use sees
    the same z.
    """

    module: nn.Module
    name: str
    kind: str  # "layer", "embedding", "linear" or "module"
    slots: list[tuple[str, int]]


@dataclass
class Block:
    index: int
    name: str
    units: list[Unit] = field(default_factory=list)
    param_indices: list[int] = field(default_factory=list)  # owned (updated) here


@dataclass
class BlockMap:
    blocks: list[Block]
    params: list[nn.Parameter]  # trainable parameters, deduplicated, in execution order
    names: list[str]  # their first (canonical) names

    @property
    def units(self) -> list[Unit]:
        return [u for b in self.blocks for u in b.units]

    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder layer list: the ModuleList with as many entries as the config has layers."""
    config = model.config.get_text_config() if hasattr(model, "config") else None
    n_layers = getattr(config, "num_hidden_layers", None)
    candidates = [
        (name, mod) for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) > 0
    ]
    exact = [(n, m) for n, m in candidates if len(m) == n_layers]
    pool = exact or candidates
    if not pool:
        raise ModelLoadError(
            f"cannot find the decoder layer list of {type(model).__name__}; edgezo needs a "
            "model whose transformer layers are an nn.ModuleList"
        )
    return max(pool, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))


def _unit_kind(module: nn.Module) -> str:
    if isinstance(module, nn.Embedding):
        return "embedding"
    if type(module) is nn.Linear:
        return "linear"
    return "module"


def _trace_order(model: nn.Module, modules: list[nn.Module], first_layer: nn.Module) -> list[int]:
    """Call order of `modules` (indices) in one tiny forward; the first layer is marked -1."""
    order: list[int] = []
    handles = [
        m.register_forward_pre_hook(lambda _m, _a, i=i: order.append(i))
        for i, m in enumerate(modules)
    ]
    handles.append(first_layer.register_forward_pre_hook(lambda _m, _a: order.append(-1)))
    device = next(model.parameters()).device
    ids = torch.zeros((1, 2), dtype=torch.long, device=device)
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    seen: list[int] = []
    for i in order:
        if i not in seen:
            seen.append(i)
    return seen


def _registration_order(model: nn.Module, modules: list[nn.Module], layers: nn.ModuleList
                        ) -> list[int]:
    """Like _trace_order, from the order modules are registered instead of called.

    One exception: peft registers a prompt-learning model's prompt encoder after the base
    model but runs it first (its virtual tokens are the base model's input).
    """
    named = list(model.named_modules())
    position = {id(m): (-1 if name.startswith("prompt_encoder") else k)
                for k, (name, m) in enumerate(named)}
    marks = [(position[id(m)], i) for i, m in enumerate(modules)]
    marks.append((position[id(layers)], -1))
    return [i for _, i in sorted(marks)]


def build_block_map(model: nn.Module) -> BlockMap:
    """Group the model's trainable parameters into blocks in execution order."""
    layers_name, layers = find_layers(model)
    in_layers = {id(p) for p in layers.parameters()}
    # Modules outside the layers that own trainable parameters directly.
    outer = [
        (name, mod) for name, mod in model.named_modules()
        if any(p.requires_grad and id(p) not in in_layers for p in mod.parameters(recurse=False))
    ]
    if next(model.parameters()).device.type == "meta":
        # No values to trace with (planning from a config): registration order places
        # the outer modules, which is what HF models do in their forward anyway.
        order = _registration_order(model, [m for _, m in outer], layers)
    else:
        order = _trace_order(model, [m for _, m in outer], layers[0])
    split = order.index(-1) if -1 in order else 0
    pre_ids = [i for i in order[:split] if i >= 0]
    post_ids = [i for i in order[split + 1:] if i >= 0]
    post_ids += [i for i in range(len(outer)) if i not in pre_ids and i not in post_ids]

    params: list[nn.Parameter] = []
    names: list[str] = []
    index_of: dict[int, int] = {}

    def unit_for(name: str, module: nn.Module, kind: str, recurse: bool, block: Block) -> None:
        slots = []
        for local, p in module.named_parameters(recurse=recurse):
            if not p.requires_grad:
                continue
            if id(p) not in index_of:
                index_of[id(p)] = len(params)
                params.append(p)
                names.append(f"{name}.{local}" if name else local)
                block.param_indices.append(index_of[id(p)])
            slots.append((local, index_of[id(p)]))
        # Every decoder layer gets a unit, trainable or not: the streamer moves frozen
        # layers too, and the planner and the FO backward depth count them.
        if slots or kind == "layer":
            block.units.append(Unit(module, name, kind, slots))

    blocks: list[Block] = []
    pre = Block(0, "pre")
    for i in pre_ids:
        name, mod = outer[i]
        unit_for(name, mod, _unit_kind(mod), False, pre)
    blocks.append(pre)
    for j, layer in enumerate(layers):
        block = Block(len(blocks), f"{layers_name}.{j}")
        unit_for(f"{layers_name}.{j}", layer, "layer", True, block)
        blocks.append(block)
    post = Block(len(blocks), "post")
    for i in post_ids:
        name, mod = outer[i]
        unit_for(name, mod, _unit_kind(mod), False, post)
    blocks.append(post)
    blocks = [b for b in blocks if b.units]
    for k, b in enumerate(blocks):
        b.index = k
    return BlockMap(blocks, params, names)


# ---------------------------------------------------------------------------------------
# Parameter groups for block-wise ZO and hybrid ZO/FO.
# ---------------------------------------------------------------------------------------
_ATTENTION = re.compile(r"(attn|attention)$")


def _child_order(layer: nn.Module, model: nn.Module) -> list[str]:
    """Names of a layer's direct children in the order one forward calls them."""
    order: list[str] = []
    handles = [child.register_forward_pre_hook(lambda _m, _a, n=name: order.append(n))
               for name, child in layer.named_children()]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros((1, 2), dtype=torch.long, device=device),
                  use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return list(dict.fromkeys(order))


def estimation_groups(model: nn.Module, blocks: BlockMap, granularity: str = "layer"
                      ) -> list[list[int]]:
    """Parameter index groups that block-wise ZO estimates and updates one at a time.

    "layer": the pre-layer modules, each decoder layer, the post-layer modules.
    "half": each layer split in two: its children up to and including the last one named
    like an attention module (e.g. the input norm and self-attention), then the rest
    (e.g. the second norm and the MLP). The split comes from the call order, so it needs
    no per-architecture table.
    """
    if granularity not in GRANULARITIES:
        raise unknown_choice("block granularity", granularity, GRANULARITIES)
    layers_name, layers = find_layers(model)
    if granularity == "layer":
        return [list(b.param_indices) for b in blocks.blocks]
    order = _child_order(layers[0], model)
    attention = [i for i, n in enumerate(order) if _ATTENTION.search(n)]
    first_half = set(order[: attention[-1] + 1]) if attention else set(order[:1])
    groups: list[list[int]] = []
    prefix = f"{layers_name}."
    for b in blocks.blocks:
        if not b.name.startswith(prefix):
            groups.append(list(b.param_indices))
            continue
        head: list[int] = []
        tail: list[int] = []
        for i in b.param_indices:
            child = blocks.names[i][len(b.name) + 1:].split(".")[0]
            (head if child in first_half else tail).append(i)
        groups += [g for g in (head, tail) if g]
    return groups


def resolve_fo_blocks(blocks: BlockMap, spec: list[str | int]) -> set[int]:
    """Parameter indices of the blocks named in `spec` (hybrid ZO/FO).

    Names: "pre" (alias "embed": what runs before the first layer), "post" (alias "head":
    final norm and LM head), or a layer number (negative counts from the end). A block
    brings every parameter its modules use, so with tied embeddings "head" includes the
    embedding matrix.
    """
    layers = [b for b in blocks.blocks if b.name not in ("pre", "post")]
    by_name = {b.name: b for b in blocks.blocks}
    chosen: set[int] = set()
    for item in spec:
        token = str(item).strip()
        alias = {"embed": "pre", "head": "post"}.get(token, token)
        if alias in ("pre", "post"):
            block = by_name.get(alias)
            if block is None:
                raise ConfigError(f"this model has no {token!r} block with trainable parameters")
        else:
            try:
                n = int(token)
            except ValueError:
                raise ConfigError(f"unknown FO block {token!r}; use pre/embed, post/head or a "
                                  f"layer number from 0 to {len(layers) - 1} (negative from "
                                  "the end)") from None
            if not -len(layers) <= n < len(layers):
                raise ConfigError(f"FO block {n} is out of range: the model has {len(layers)} "
                                  "layers")
            block = layers[n]
        chosen.update(i for u in block.units for _, i in u.slots)
    return chosen


def backward_depth(blocks: BlockMap, indices: set[int]) -> int:
    """Decoder layers a backward pass for `indices` must go through: from the first block
    that uses one of them to the end of the model (the memory cost of hybrid ZO/FO)."""
    first = next((k for k, b in enumerate(blocks.blocks)
                  if any(i in indices for u in b.units for _, i in u.slots)), None)
    if first is None:
        return 0
    return sum(1 for b in blocks.blocks[first:] if b.name not in ("pre", "post"))


def weight_grad_layers(blocks: BlockMap, indices: set[int]) -> int:
    """Decoder layers holding one of `indices` that is the layer's own weight (not a
    LoRA adapter). Autograd saves a linear's input only for its weight's gradient, so a
    backward keeps more in such a layer than in one it merely crosses (see memory/peak.py)."""
    return sum(1 for b in blocks.blocks if b.name not in ("pre", "post")
               and any(i in indices and "lora_" not in blocks.names[i]
                       for u in b.units for _, i in u.slots))


def pair_splits_layers(blocks: BlockMap, fo: set[int], block_wise: bool) -> bool:
    """Whether a pair-mode forward runs every decoder layer as two halves, one after the
    other (perturb.Perturbation._functional): true when each layer holds a parameter every
    ZO estimate perturbs. A layer with nothing perturbed (frozen, FO, or outside the
    current block of block-wise ZO) computes the doubled batch at once."""
    layers = [u for u in blocks.units if u.kind == "layer"]
    return (not block_wise and bool(layers)
            and all(any(i not in fo for _, i in u.slots) for u in layers))
