"""Predicted peak memory of a ZO run on the compute device, by component.

Pure arithmetic over parameter counts and the model config, so it also works on a model
built on the meta device (no weights loaded). Components:

- weights: every parameter and buffer at its dtype;
- perturbation scratch: the largest unit's θ ± εz copies (two in pair mode, one in
  two-pass mode) plus the noise chunks being drawn; embeddings and linear heads are
  perturbed row-wise or chunk-wise and need far less than a full copy;
- activations: the largest per-layer transient of a no-grad forward over the batch
  (times the candidate rows of a multiple-choice task, plus prompt tuning's virtual
  tokens) and the logits the loss reads (at every answer position). Pair mode doubles
  the batch; a layer that computes its two halves in turn holds one half's transient;
- prefix tuning's key/value cache: every layer's keys and values over prefix + sequence;
- optimizer state: bytes per trainable parameter, declared by the optimizer's rule;
- sparsity masks: one byte per trainable parameter when --sparsity is on;
- first-order parts (fo-sgd/fo-adam, hybrid --fo-blocks): the gradients of the FO
  parameters and the activations autograd keeps for the layers the backward crosses;
- forward gradient: the tangent v (one model-sized copy) and the dual activations;
- CPU runtime: when the compute device is the CPU, the kernel libraries' code paged in
  by the first steps and their per-shape caches (oneDNN keeps about 1-2 MiB per distinct
  input shape; batches are padded to a multiple of 8 tokens, which bounds the shapes);
- runtime overhead: the CUDA context on GPU profiles (absent when a GPU profile is
  emulated on the CPU, so it is reported but not compared with the CPU measurement).

Two phases are planned: the training step and evaluation (no perturbation, no pair
doubling, but its own batch size and the longest evaluated example); the plan's peak is
the larger of the two.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch

from edgezo.profiles import Profile
from edgezo.zo import noise
from edgezo.zo.blocks import BlockMap

CUDA_CONTEXT_BYTES = 450 * 1024**2
# Resident memory a CPU process gains on its first steps beyond the tensors it allocates:
# kernel code paged in from libtorch/oneDNN and their per-shape caches, measured by
# `benchmarks/planner_accuracy.py --calibrate` (33.8 MiB on x86-64, torch 2.13, bf16).
CPU_RUNTIME_BYTES = 34 * 1024**2
# What a backward adds to that (autograd's and oneDNN's backward kernels and caches), by
# the same calibration on FO-SGD and FO-Adam: 63.5-64.7 MiB in all against 34.3 for ZO.
CPU_BACKWARD_RUNTIME_BYTES = 30 * 1024**2
THREAD_BUFFERS = 5


@dataclass(frozen=True)
class Shape:
    """What one forward of a phase feeds the model.

    `rows_per_example`: a task whose candidates are scored as separate rows (COPA's two
    sentences) multiplies the batch; `logit_positions`: how many positions the loss reads
    logits at (1 for a one-token answer, the answer's length otherwise).
    """

    batch_size: int
    seq_len: int
    rows_per_example: int = 1
    logit_positions: int = 1

    @property
    def rows(self) -> int:
        return self.batch_size * self.rows_per_example


@dataclass
class Plan:
    profile: str
    device: str
    emulated: bool
    pair: bool
    batch_size: int
    seq_len: int
    components: dict[str, int]  # the training step's
    runtime_overhead_bytes: int
    budget_bytes: int
    streaming: dict | None = None  # which layers stream, from where, at what cost
    eval_components: dict[str, int] | None = None  # evaluation's, when planned
    rows_per_example: int = 1  # the training batch's geometry beyond batch x seq_len
    logit_positions: int = 1
    eval_shape: Shape | None = None

    @property
    def phases(self) -> dict[str, int]:
        """Predicted peak of each planned phase (what the monitor measures per phase)."""
        out = {"train": sum(self.components.values())}
        if self.eval_components is not None:
            out["eval"] = sum(self.eval_components.values())
        return out

    @property
    def peak_bytes(self) -> int:
        """Predicted peak of the tensors edgezo allocates (what the monitor measures)."""
        return max(self.phases.values())

    @property
    def total_bytes(self) -> int:
        return self.peak_bytes + self.runtime_overhead_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.budget_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "phases": self.phases, "peak_bytes": self.peak_bytes,
                "total_bytes": self.total_bytes, "fits": self.fits}


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _activation_bytes(config, rows: int, seq_len: int, elem: int, positions: int = 1,
                      split: bool = False) -> int:
    """Largest per-layer transient of a no-grad forward plus the logits the loss reads
    (at `positions` positions per row).

    `split`: a pair-mode batch whose layers compute their two halves one after the other;
    the layer's transient is a half's, plus the doubled input and the first half's output
    kept while the second computes (rows x H). Counted live at dispatch on SmolLM2, batch
    16 x 64: 17.5 MiB in a pair step against 13.8 two-pass."""
    text = config.get_text_config()
    hidden = text.hidden_size
    inter = getattr(text, "intermediate_size", None) or getattr(text, "ffn_dim", None) \
        or getattr(text, "n_inner", None) or 4 * hidden
    heads = text.num_attention_heads
    layer_rows = rows // 2 if split else rows
    tokens = layer_rows * seq_len
    # residual, normed input, q/k/v/attn out (~4H) and the MLP's gate/up/product (~3I)
    layer = tokens * (4 * hidden + 3 * inter) * elem
    scores = layer_rows * heads * seq_len * seq_len * 4  # attention scores if materialized
    kept = rows * seq_len * hidden * elem if split else 0
    vocab = text.vocab_size
    logits = rows * positions * vocab * (elem + 3 * 4)  # logits, fp32 copy, log-softmax
    return layer + scores + kept + logits


def _virtual_tokens(model) -> int:
    """Tokens prompt tuning (and p-tuning) put in front of every row's embeddings: each
    layer's hidden states, and the attention over them, are this much longer than the
    batch's text. Prefix tuning's virtual tokens live only in the key/value cache
    (_prefix_cache_bytes); every other scheme has none."""
    cfg = getattr(model, "active_peft_config", None)
    kind = getattr(getattr(cfg, "peft_type", None), "value", None)
    if kind not in ("PROMPT_TUNING", "P_TUNING"):
        return 0
    return cfg.num_virtual_tokens


def _prefix_cache_bytes(model, rows: int, seq_len: int, elem: int) -> int:
    """Prefix tuning hands its virtual keys/values to the model as a cache, which every
    layer extends with its own keys/values: all layers' K and V over prefix + sequence
    live until the forward ends. 0 for every other scheme."""
    cfg = getattr(model, "active_peft_config", None)
    kind = getattr(getattr(cfg, "peft_type", None), "value", None)
    if kind != "PREFIX_TUNING":
        return 0
    text = model.config.get_text_config()
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    tokens = cfg.num_virtual_tokens + seq_len
    return rows * text.num_hidden_layers * 2 * kv_heads * tokens * head_dim * elem


def _lora_saved_bytes_per_token(model, elem: int) -> int:
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


def _saved_activation_bytes(config, rows: int, seq_len: int, elem: int, layers: int,
                            positions: int = 1, weight_layers: int = 0) -> int:
    """What autograd keeps for a backward through `layers` decoder layers, `weight_layers`
    of which have weights that take a gradient, plus logits."""
    if layers == 0:
        return 0
    text = config.get_text_config()
    hidden = text.hidden_size
    inter = getattr(text, "intermediate_size", None) or getattr(text, "ffn_dim", None) \
        or getattr(text, "n_inner", None) or 4 * hidden
    tokens = rows * seq_len
    # Counted with saved_tensors_hooks on Llama layers with a padding mask (H 576-1024,
    # I 1536-2816), within 1% of 8H + 3I values a token in a layer whose weights are
    # frozen (LoRA's base, prompt tuning): the norms' fp32 inputs, q/k/v after rotation,
    # the attention output and its log-sum-exp, and the MLP's gate, activation and up.
    # Fused attention keeps no T x T probabilities. A layer whose weights train also
    # keeps each linear's input for its weight's gradient: 4H + I more (12H + 4I).
    frozen = tokens * (8 * hidden + 3 * inter) * elem
    weights = tokens * (4 * hidden + inter) * elem
    return (layers * frozen + min(weight_layers, layers) * weights
            + rows * positions * text.vocab_size * 3 * 4)


def streamed_layers(n_layers: int, k: int) -> list[int]:
    """Which k of n layers stream: spread evenly, so that a streamed layer's upload can
    overlap the compute of the resident layers before it."""
    if k <= 0:
        return []
    if k >= n_layers:
        return list(range(n_layers))
    return sorted({int((j + 0.5) * n_layers / k) for j in range(k)})


class LayerBytes(NamedTuple):
    total: int  # every parameter, in its own dtype
    trainable: int  # the parameters the optimizer updates
    masters: int  # fp32 masters of its trainable fp16/bf16 tensors (4 bytes a value)

    @property
    def widen(self) -> int:
        """What the fp32 masters add to the tier over the tensors' own 2-byte copies."""
        return self.masters // 2


def layer_bytes(blocks: BlockMap) -> list[LayerBytes]:
    """The parameter bytes of each decoder layer, in order."""
    trainable = {id(p) for p in blocks.params}
    out = []
    for unit in blocks.units:
        if unit.kind == "layer":
            ps = list(unit.module.parameters())
            train = [p for p in ps if id(p) in trainable]
            out.append(LayerBytes(
                sum(_bytes(p) for p in ps), sum(_bytes(p) for p in train),
                sum(p.numel() * 4 for p in train
                    if p.dtype in (torch.float16, torch.bfloat16))))
    return out


MASTERS = ("auto", "fp32", "model")


def _streaming(blocks: BlockMap, profile: Profile, layers: list[int], tier: str,
               buffers: int, flops: float, masters: str = "auto") -> tuple[int, int, dict]:
    """(device bytes freed, buffer bytes, the plan's streaming section).

    Trainable half-precision tensors keep fp32 masters in the tier with `masters="fp32"`,
    and with "auto" whenever the tier holds them: always on disk, and in pinned host
    memory when the layers fit in 90% of the profile's host memory with them. They then
    travel as fp32 both ways, and a layer's buffer holds its fp32 masters beside its
    compute copy. "model" keeps every tensor in the model's dtype.
    """
    sizes = layer_bytes(blocks)
    chosen = [sizes[i] for i in layers]
    moved = sum(s.total for s in chosen)
    widen = sum(s.widen for s in chosen)
    room = tier == "disk" or moved + widen <= 0.9 * profile.host_memory_bytes
    fp32 = widen > 0 and (masters == "fp32" or (masters == "auto" and room))
    if not fp32:
        widen = 0
    # a layer's buffer holds its compute copy and, beside it, its fp32 masters
    slot = max((s.total + (s.masters if fp32 else 0) for s in chosen), default=0)
    buffer = min(buffers, len(layers)) * slot
    out_bytes = sum(s.trainable for s in chosen) + widen  # only trainable tensors go back
    bandwidth = (profile.host_device_bandwidth_gbps if tier == "host"
                 else profile.disk_bandwidth_gbps) * 1e9
    transfer_s = (moved + widen + out_bytes) / bandwidth if bandwidth > 0 else float("inf")
    compute_s = flops / (profile.device_tflops * 1e12) if profile.device_tflops else None
    section = {
        "tier": tier, "layers": layers, "buffers": min(buffers, len(layers)),
        "master_dtype": "fp32" if fp32 else "same",
        # on a GPU the disk tier goes through pinned host twins of the device buffers
        "host_bytes": (moved + widen if tier == "host"
                       else buffer if profile.device == "cuda" else 0),
        "disk_bytes": moved + widen if tier == "disk" else 0,
        "bytes_in_per_step": moved + widen, "bytes_out_per_step": out_bytes,
        "transfer_s": transfer_s, "compute_s": compute_s,
        "step_bound_s": max(transfer_s, compute_s or 0.0),
    }
    return moved, buffer, section


def plan_step(model: torch.nn.Module, blocks: BlockMap, profile: Profile, *, batch_size: int,
              seq_len: int, pair: bool, on_cuda: bool, optimizer_state_bytes: int = 0,
              noise_threads: int = 1, sparsity: bool = False, fo_params: int = 0,
              backward_layers: int = 0, weight_grad_layers: int = 0,
              split_layers: bool = False, forward_grad: bool = False,
              stream_layers: list[int] | None = None, stream_tier: str = "host",
              rows_per_example: int = 1, logit_positions: int = 1,
              eval_shape: Shape | None = None, perturbs: bool = True,
              stream_masters: str = "auto") -> Plan:
    """Predict the peak device memory of one ZO step of `model` under `profile`, and of
    evaluation when `eval_shape` is given.

    `perturbs`: False for a pure FO run (no ZO group): no perturbation scratch.
    `backward_layers`: decoder layers an FO backward crosses; `weight_grad_layers` of
    them train their own weights (blocks.weight_grad_layers).
    `split_layers`: pair mode computes each layer's halves in turn (blocks.pair_splits_layers).
    `stream_masters`: the streamed layers' master dtype, see _streaming.
    `stream_layers`: decoder layers kept in `stream_tier` (host or disk) and brought to
    the device through layer-sized buffers: two for a GPU profile (one computing, one
    arriving; the same plan when the profile is emulated on a CPU, which uses one of
    them), one for a CPU profile, where a layer is read just before it computes.
    """
    stream_buffers = 2 if profile.device == "cuda" else 1
    weights = sum(_bytes(p) for p in model.parameters()) + sum(_bytes(b) for b in model.buffers())
    copies = 2 if pair else 1
    train = Shape(batch_size, seq_len, rows_per_example, logit_positions)
    rows = train.rows * copies
    scratch = 0
    for unit in blocks.units:
        params = [blocks.params[i] for _, i in unit.slots]
        if unit.kind == "embedding":
            # only the looked-up rows (at most one per token) are copied, plus their z
            p = params[0]
            used = min(noise.num_rows(p.shape), rows * seq_len)
            need = used * (p.numel() // max(1, noise.num_rows(p.shape))) * p.element_size()
            need = need * (copies + 1)
        elif unit.kind == "linear":
            p = params[0]
            chunk = min(p.numel(), noise.CHUNK_ELEMENTS) * p.element_size()
            need = chunk * (copies + 1) * noise_threads
        else:
            need = sum(_bytes(p) for p in params) * copies
        scratch = max(scratch, need)
    if not perturbs:  # a pure FO run never builds a perturbed copy
        scratch = 0
    elem = next(model.parameters()).element_size()
    virtual = _virtual_tokens(model)
    # Each thread that draws noise keeps its reusable one-chunk buffers for the whole run:
    # z, d, the fp32 copy of the weights, the rounding dither and the fp32 sum (4 bytes a
    # value each). The pool's threads and the calling thread all hold a set.
    components = {
        "weights": weights,
        "perturbation_scratch": scratch,
        "noise_buffers": THREAD_BUFFERS * 4 * (noise_threads + 1)
        * noise.largest_chunk(p.shape for p in blocks.params),
        "activations": _activation_bytes(model.config, rows, seq_len + virtual, elem,
                                         logit_positions, split=pair and split_layers),
        "optimizer_state": optimizer_state_bytes * blocks.numel(),
    }
    prefix_cache = _prefix_cache_bytes(model, rows, seq_len, elem)
    if prefix_cache:
        components["prefix_kv_cache"] = prefix_cache
    if sparsity:
        components["sparsity_masks"] = blocks.numel()
    if fo_params:
        components["fo_gradients"] = fo_params * elem
        components["fo_activations"] = _saved_activation_bytes(
            model.config, train.rows, seq_len + virtual, elem, backward_layers,
            logit_positions, weight_grad_layers)
        layers = model.config.get_text_config().num_hidden_layers
        components["fo_activations"] += (_lora_saved_bytes_per_token(model, elem)
                                         * train.rows * (seq_len + virtual) * backward_layers
                                         // max(1, layers))
        if not perturbs:
            # a pure FO step's forward is the one that saves: its transients are among
            # the saved activations (dispatch-level peaks on a width-1024 Llama, batch 16:
            # 107.6 MiB new in a full step against 106.5 planned without this term, 89.4
            # against 84.3 for LoRA)
            del components["activations"]
    if forward_grad:
        components["forward_grad_tangents"] = blocks.numel() * elem
        components["activations"] *= 2  # every activation carries its tangent
    streaming = None
    if stream_layers:
        # the forward's multiply-adds: 2 FLOPs per weight per token, rows x seq tokens
        flops = 2.0 * sum(p.numel() for p in model.parameters()) * rows * seq_len
        moved, buffer, streaming = _streaming(blocks, profile, stream_layers, stream_tier,
                                              stream_buffers, flops, stream_masters)
        components["weights"] -= moved
        components["stream_buffers"] = buffer
    if not on_cuda:
        components["cpu_runtime"] = CPU_RUNTIME_BYTES
        if fo_params:
            components["cpu_runtime"] += CPU_BACKWARD_RUNTIME_BYTES
    eval_components = None
    if eval_shape is not None:
        # The same resident state; the step's scratch, FO parts and tangents are gone.
        kept = ("weights", "noise_buffers", "optimizer_state", "sparsity_masks",
                "stream_buffers", "cpu_runtime")
        eval_components = {k: v for k, v in components.items() if k in kept}
        eval_components["activations"] = _activation_bytes(
            model.config, eval_shape.rows, eval_shape.seq_len + virtual, elem,
            eval_shape.logit_positions)
        if prefix_cache:
            eval_components["prefix_kv_cache"] = _prefix_cache_bytes(
                model, eval_shape.rows, eval_shape.seq_len, elem)
    cuda_profile = profile.device == "cuda"
    return Plan(
        profile=profile.name,
        device="cuda" if on_cuda else "cpu",
        emulated=cuda_profile and not on_cuda,
        pair=pair,
        batch_size=batch_size,
        seq_len=seq_len,
        components=components,
        runtime_overhead_bytes=CUDA_CONTEXT_BYTES if cuda_profile else 0,
        budget_bytes=profile.budget_bytes,
        streaming=streaming,
        eval_components=eval_components,
        rows_per_example=rows_per_example,
        logit_positions=logit_positions,
        eval_shape=eval_shape,
    )
