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
  by the first steps and their per-shape caches (oneDNN keeps a cache for each distinct
  input shape; batches are padded to a multiple of 8 tokens, which bounds the shapes);
- runtime overhead: the CUDA context on GPU profiles (absent when a GPU profile is
  emulated on the CPU, so it is reported but not compared with the CPU measurement).

Two phases are planned: the training step and evaluation (no perturbation, no pair
doubling, but its own batch size and the longest evaluated example); the plan's peak is
the larger of the two.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from edgezo.device.profiles import Profile
from edgezo.memory import terms
from edgezo.memory.streaming import streaming_terms
from edgezo.models.quantized import tensor_bytes
from edgezo.zo import chunking, fused, noise_table
from edgezo.zo.batch import Shape
from edgezo.zo.blocks import BlockMap
from edgezo.zo.intercept import LINEAR_SPAN, linear_slots

CUDA_CONTEXT_BYTES = 450 * 1024**2
# Resident memory a CPU process gains on its first steps beyond the tensors it allocates:
# kernel code paged in from libtorch/oneDNN and their per-shape caches. No tensor count
# predicts it, so it is a constant, set from `benchmarks/planner_accuracy.py --calibrate`
# (BENCHMARKS.md, "Planner accuracy").
CPU_RUNTIME_BYTES = 34 * 1024**2
# What a backward adds to that (autograd's and oneDNN's backward kernels and caches), set
# by the same calibration on FO-SGD and FO-Adam.
CPU_BACKWARD_RUNTIME_BYTES = 30 * 1024**2
THREAD_BUFFERS = 5


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


def peak_summary(plan: Plan) -> str:
    """The plan's peak as `edgezo plan` and `edgezo finetune` both state it: the peak of
    the tensors edgezo allocates (what the memory monitor measures), then what the budget
    check adds to it, a GPU profile's CUDA context, which a CPU emulating the profile
    counts but has not got, so never measures. E.g. "0.36 GiB (+ 0.44 GiB CUDA context =
    0.80 GiB against the budget; no CUDA context on this CPU, which emulates the
    profile)"."""
    gib = 1024**3
    peak = f"{plan.peak_bytes / gib:.2f} GiB"
    context = plan.runtime_overhead_bytes
    if not context:
        return peak
    where = ("; no CUDA context on this CPU, which emulates the profile" if plan.emulated
             else "")
    return (f"{peak} (+ {context / gib:.2f} GiB CUDA context = "
            f"{plan.total_bytes / gib:.2f} GiB against the budget{where})")


def _bytes(t: torch.Tensor) -> int:
    return tensor_bytes(t)  # a quanto weight by its codes and scales


@dataclass(frozen=True)
class FOPart:
    """The first-order part of a step (fo-sgd/fo-adam, or hybrid --fo-blocks): how many
    parameters take a backpropagated gradient, how many decoder layers the backward
    crosses, and in how many of those the layer's own weights train
    (blocks.weight_grad_layers)."""

    params: int
    backward_layers: int
    weight_grad_layers: int


@dataclass(frozen=True)
class StreamPart:
    """Decoder layers kept in `tier` (host or disk) and brought to the device through
    layer-sized buffers; `masters`: the trainable tensors' master dtype (streaming.py)."""

    layers: tuple[int, ...]
    tier: str
    masters: str = "auto"


@dataclass(frozen=True)
class StepSpec:
    """Everything about a run that its memory depends on, besides the model and the
    profile: what `planner.step_spec` derives from a RunConfig for one decision."""

    train: Shape
    eval: Shape | None = None
    pair: bool = True
    on_cuda: bool = False
    optimizer_state_bytes: int = 0  # in all: the rule's declaration for these parameters
    noise_threads: int = 1  # the noise pool's threads (0: the chunk work stays on the caller's)
    sparsity: bool = False
    fo: FOPart | None = None
    split_layers: bool = False  # pair mode computes each layer's halves in turn
    forward_grad: bool = False
    perturbs: bool = True  # False: a pure FO step builds no perturbed copy
    stream: StreamPart | None = None
    noise_table: bool = False  # z comes from the shared table (noise_table.table), resident
    noise_table_bf16: bool = False  # bf16 weights' perturbed copies read its twin (CPU)
    direction_bases: int = 0  # bytes of the lowrank/subspace bases kept (bases.basis)
    cheap_noise: bool = False  # z re-read per pair half: one scratch copy (perturb._cheap_z)
    fuses: bool = False  # z has values (not coordinates): the fused path may run (fused.py)
    qat_bytes: int = 0  # QAT's fp32 masters (full) or quantized merged weights (lora)


def _scratch_bytes(blocks: BlockMap, spec: StepSpec, rows: int) -> int:
    """The largest unit's perturbed copies (one per sign) plus the chunks being drawn;
    embeddings copy only the looked-up rows, linear heads one chunk (span, on CUDA) per
    thread."""
    if not spec.perturbs:
        return 0
    copies = 2 if spec.pair and not spec.cheap_noise else 1
    seq_len, scratch = spec.train.seq_len, 0
    for unit in blocks.units:
        params = [blocks.params[i] for _, i in unit.slots]
        if unit.kind == "embedding":
            p = params[0]
            used = min(chunking.num_rows(p.shape), rows * seq_len)
            need = used * (p.numel() // max(1, chunking.num_rows(p.shape))) * p.element_size()
            need = need * (copies + 1)
        elif unit.kind == "linear":
            p = params[0]
            chunk = chunking.largest_chunk([p.shape], _device(spec)) * p.element_size()
            need = chunk * (copies + 1) * max(1, spec.noise_threads)
        else:
            # with cheap z, a unit's linear maps compute span by span (no copy of them),
            # from one perturbed span of the weight built from chunk-sized z
            inside = ({i for pair in linear_slots(unit).values() for i in pair
                       if i is not None} if spec.cheap_noise else set())
            need = sum(_bytes(blocks.params[i]) for _, i in unit.slots
                       if i not in inside) * copies
            limit = LINEAR_SPAN.get(_device(spec))
            need += max((_linear_span_bytes(blocks.params[i], _device(spec), limit)
                         for i in inside), default=0)
        scratch = max(scratch, need)
    return scratch


def _linear_span_bytes(p: torch.Tensor, device: str, limit: int | None) -> int:
    """A linear map computed from z (intercept.PerturbedLinears): its perturbed span of
    the weight, built one chunk at a time from a chunk of z (fp32), of d when the direction
    is not z itself (masks, a preconditioner), and for half precision of the fp32 sum each
    chunk is rounded from (intercept.perturbed_into)."""
    elem = p.element_size()
    per_chunk = 4 + 4 + (4 if elem < 4 else 0)
    return (chunking.largest_chunk([p.shape], device, limit) * elem
            + chunking.largest_chunk([p.shape], device) * per_chunk)


def _fused_bytes(blocks: BlockMap, spec: StepSpec) -> int:
    """The fused path's buffers (zo/fused.py: a piece's z, its fp32 copy for the update
    and the rounding dither, 4 bytes a value each; a piece holds at most FUSED_VALUES
    values), and its pieces' row layouts (two int64 a row, kept for the units' pieces and
    for a flush's, and the table offsets of the largest piece's rows), where it runs: on
    a fused device, for directions with values."""
    if not (spec.perturbs and spec.fuses and _device(spec) in fused.FUSED_DEVICES):
        return 0
    values = sum(p.numel() for p in blocks.params)
    rows = sum(chunking.num_rows(p.shape) for p in blocks.params)
    return (3 * 4 * min(fused.FUSED_VALUES, values) + 2 * 2 * 8 * rows
            + 8 * min(rows, fused.FUSED_VALUES))


def _device(spec: StepSpec) -> str:
    """Where the step computes: noise buffers hold a chunk on the CPU, a span on CUDA."""
    return "cuda" if spec.on_cuda else "cpu"


def _fo_terms(model, spec: StepSpec, elem: int, virtual: int) -> dict[str, int]:
    """Gradients of the FO parameters and what autograd keeps for their backward."""
    fo, train = spec.fo, spec.train
    tokens = train.seq_len + virtual
    saved = terms.saved_activation_bytes(model.config, train.rows, tokens, elem,
                                         fo.backward_layers, train.logit_positions,
                                         fo.weight_grad_layers)
    layers = model.config.get_text_config().num_hidden_layers
    saved += (terms.lora_saved_bytes_per_token(model, elem) * train.rows * tokens
              * fo.backward_layers // max(1, layers))
    return {"fo_gradients": fo.params * elem, "fo_activations": saved}


def _eval_terms(model, components: dict[str, int], spec: StepSpec, elem: int,
                virtual: int) -> dict[str, int]:
    """Evaluation: the same resident state; the step's scratch, FO parts and tangents
    are gone; its own batch and widest example."""
    kept = ("weights", "noise_buffers", "noise_table", "direction_bases", "optimizer_state",
            "qat_masters",
            "sparsity_masks", "stream_buffers", "cpu_runtime")
    out = {k: v for k, v in components.items() if k in kept}
    ev = spec.eval
    out["activations"] = terms.activation_bytes(model.config, ev.rows, ev.seq_len + virtual,
                                                elem, ev.logit_positions)
    cache = terms.prefix_cache_bytes(model, ev.rows, ev.seq_len, elem)
    if cache:
        out["prefix_kv_cache"] = cache
    if ev.new_tokens:  # a generative evaluation: every layer's keys and values, all tokens
        out["generation_kv_cache"] = terms.kv_cache_bytes(model, ev.rows,
                                                          ev.seq_len + virtual, elem)
    return out


def plan_step(model: torch.nn.Module, blocks: BlockMap, profile: Profile, spec: StepSpec
              ) -> Plan:
    """Predict the peak device memory of one step of `model` under `profile`, and of
    evaluation when `spec.eval` is given.

    Streamed layers leave the device weights and add their buffers: two for a GPU
    profile (one computing, one arriving; the same plan when the profile is emulated on
    a CPU, which uses one of them), one for a CPU profile.
    """
    train = spec.train
    rows = train.rows * (2 if spec.pair else 1)
    elem = next(model.parameters()).element_size()
    virtual = terms.virtual_tokens(model)
    # Each thread that draws noise keeps its reusable one-chunk buffers for the whole run:
    # z, d, the fp32 copy of the weights, the rounding dither and the fp32 sum (4 bytes a
    # value each). The pool's threads and the calling thread all hold a set.
    components = {
        # a zo_scale shares its quantized weight's scale storage (the scales scheme)
        "weights": sum(_bytes(p) for n, p in model.named_parameters()
                       if not n.endswith("zo_scale"))
        + sum(_bytes(b) for b in model.buffers()),
        "perturbation_scratch": _scratch_bytes(blocks, spec, rows),
        "noise_buffers": THREAD_BUFFERS * 4 * (spec.noise_threads + 1)
        * chunking.largest_chunk((p.shape for p in blocks.params), _device(spec))
        + _fused_bytes(blocks, spec),
        "activations": terms.activation_bytes(model.config, rows, train.seq_len + virtual,
                                              elem, train.logit_positions,
                                              split=spec.pair and spec.split_layers),
        "optimizer_state": spec.optimizer_state_bytes,
    }
    if train.new_tokens:  # the step writes answers (the f1 objective): their KV cache
        components["generation_kv_cache"] = terms.kv_cache_bytes(
            model, rows, train.seq_len + virtual, elem)
    components.update(_step_terms(model, blocks, spec, components, elem, virtual))
    streaming = _stream_terms(model, blocks, profile, spec, components, rows)
    eval_components = (None if spec.eval is None
                       else _eval_terms(model, components, spec, elem, virtual))
    cuda_profile = profile.device == "cuda"
    return Plan(profile=profile.name, device="cuda" if spec.on_cuda else "cpu",
                emulated=cuda_profile and not spec.on_cuda, pair=spec.pair,
                batch_size=train.batch_size, seq_len=train.seq_len, components=components,
                runtime_overhead_bytes=CUDA_CONTEXT_BYTES if cuda_profile else 0,
                budget_bytes=profile.budget_bytes, streaming=streaming,
                eval_components=eval_components, rows_per_example=train.rows_per_example,
                logit_positions=train.logit_positions, eval_shape=spec.eval)


def _step_terms(model, blocks: BlockMap, spec: StepSpec, components: dict[str, int],
                elem: int, virtual: int) -> dict[str, int]:
    """The step's terms beyond the core five: prefix cache, masks, FO parts, tangents and
    the CPU runtime (`components` is adjusted in place where a term replaces one)."""
    rows = spec.train.rows * (2 if spec.pair else 1)
    out = {}
    cache = terms.prefix_cache_bytes(model, rows, spec.train.seq_len, elem)
    if cache:
        out["prefix_kv_cache"] = cache
    if spec.sparsity:
        out["sparsity_masks"] = blocks.numel()
    if spec.noise_table:
        out["noise_table"] = noise_table.TABLE_VALUES * (4 + (2 if spec.noise_table_bf16 else 0))
    if spec.direction_bases:
        out["direction_bases"] = spec.direction_bases
    if spec.qat_bytes:
        out["qat_masters"] = spec.qat_bytes
    fo = spec.fo is not None and spec.fo.params
    if fo:
        out.update(_fo_terms(model, spec, elem, virtual))
        if not spec.perturbs:
            # a pure FO step's forward is the one that saves: its transients are among
            # the saved activations; the backward adds one layer's gradients to them
            components["activations"] = terms.backward_transient_bytes(
                model.config, spec.train.rows, spec.train.seq_len + virtual, elem)
    if spec.forward_grad:
        out["forward_grad_tangents"] = blocks.numel() * elem
        components["activations"] *= 2  # every activation carries its tangent
    if not spec.on_cuda:
        out["cpu_runtime"] = CPU_RUNTIME_BYTES + (CPU_BACKWARD_RUNTIME_BYTES if fo else 0)
    return out


def _stream_terms(model, blocks: BlockMap, profile: Profile, spec: StepSpec,
                  components: dict[str, int], rows: int) -> dict | None:
    """Streamed layers leave the device weights and add their buffers; returns the plan's
    streaming section (None when nothing streams)."""
    if spec.stream is None or not spec.stream.layers:
        return None
    # the forward's multiply-adds: 2 FLOPs per weight per token, rows x seq tokens
    flops = 2.0 * sum(p.numel() for p in model.parameters()) * rows * spec.train.seq_len
    moved, buffer, section = streaming_terms(
        blocks, profile, list(spec.stream.layers), spec.stream.tier,
        2 if profile.device == "cuda" else 1, flops, spec.stream.masters)
    components["weights"] -= moved
    components["stream_buffers"] = buffer
    return section
