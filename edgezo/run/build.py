"""How a Session comes to be, one stage a function, in the order a run needs them:

    profile → device → data → tokenizer → plan (refused before loading) → GGUF conversion
           → load + scheme → blocks → live plan → engine → streaming

`build(config)` runs them and returns the `Parts` a Session holds. Data comes before the
weights (a bad data folder fails in a second, not after a model load), and the plan
before the weights too (a model too big for the profile is refused in seconds, with the
changes that would make it fit; a GGUF's config and tokenizer come from its metadata, so
it is converted only for a run that fits).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from edgezo.config.defaults import default_max_length, lr_reason
from edgezo.config.rules import estimate_of
from edgezo.config.runconfig import RunConfig
from edgezo.device.hardware import preferred_dtype
from edgezo.device.heap import release_freed_memory, strict_heap
from edgezo.device.profiles import Profile, human_bytes, load_profile
from edgezo.device.threads import ThreadChoice, set_compute_threads
from edgezo.errors import ConfigError, OutOfBudgetError
from edgezo.memory import planner
from edgezo.memory.measure import MemoryMonitor
from edgezo.memory.peak import Plan
from edgezo.memory.planner import Decision, Shapes
from edgezo.memory.streaming import layer_bytes, streamed_layers
from edgezo.models.catalog import PEFT_SCHEMES, SCHEMES
from edgezo.models.convert import streamable_folder
from edgezo.models.loading import (
    ResolvedModel,
    compute_dtype,
    converted,
    load_config,
    load_weights,
    parse_dtype,
    resolve_model,
)
from edgezo.models.schemes import apply_scheme
from edgezo.tasks.base import Encoder, Task
from edgezo.tasks.catalog import OBJECTIVES
from edgezo.tasks.loss import LOSSES
from edgezo.tasks.make import make_task
from edgezo.tasks.shape import generation_shape, measure_shape
from edgezo.zo import graphs
from edgezo.zo.batch import Shape
from edgezo.zo.blocks import BlockMap, build_block_map
from edgezo.zo.engine import ZOEngine
from edgezo.zo.optimizers import make_optimizer
from edgezo.zo.stream import BlockStreamer


@dataclass
class Parts:
    """Everything a Session is made of."""

    config: RunConfig  # validated and resolved: what run.json records
    profile: Profile
    device: torch.device
    task: Task | None
    resolved: ResolvedModel  # where the model's files are, and its tokenizer
    encoder: Encoder
    shapes: Shapes
    monitor: MemoryMonitor
    model: nn.Module
    blocks: BlockMap
    plan: Plan
    engine: ZOEngine
    streamer: BlockStreamer | None
    dtype_reason: str  # why the run computes in its dtype (printed and reported)
    lr_reason: str | None  # why the run takes its learning rate, where --lr was left open
    threads: ThreadChoice  # the CPU threads it computes with, and why
    graphs: str | None  # on a GPU: whether the forwards are CUDA graphs, and why not

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"


def build(config: RunConfig, objective: Callable | None = None) -> Parts:
    """All stages, in order. `objective`: a loss function `(model, batch) -> per-example
    losses` instead of the configured one (the API's `objective=fn`)."""
    config.validate()
    if config.data.max_length is None:  # the task's own, before anything encodes
        config = config.override(max_length=default_max_length(config.data.task))
    profile = load_profile(config.runtime.profile)
    device = compute_device(profile, config.runtime.strict_memory)
    # before the plan: it prices a noise buffer for each of the pool's threads
    threads = set_compute_threads(config.runtime.threads, device.type == "cpu")
    dtype, why = preferred_dtype(config.model.dtype, profile.dtype, device)
    lr_why = (lr_reason(config.optimizer.optimizer, config.scheme.scheme)
              if config.optimizer.lr is None else None)
    loss_fn = objective_fn(config, objective)
    task = load_task(config)
    # a GGUF is not converted yet: its metadata and tokenizer are enough to plan with
    resolved = resolve_model(config.model.model, parse_dtype(dtype),
                             config.model.trust_remote_code, convert=False)
    encoder = Encoder(resolved.tokenizer, max_length=config.data.max_length,
                      loss=task.loss if task is not None else "classification",
                      train_on=config.data.train_on,
                      writes=(task.max_new_tokens, task.first_line)
                      if task is not None and task.generative else None)
    shapes = measure_shapes(task, encoder, config)
    config, decision, why = plan_before_loading(config, resolved, profile, shapes, dtype, why)
    if config.method.perturbs:  # recorded, so that a resume pairs alike
        config = config.override(pair=decision.pair)
    # the plan fits: a GGUF is converted now, once, in the dtype the plan settled on (the
    # profile's where fp32 did not fit)
    resolved = converted(resolved, parse_dtype(config.model.dtype))
    monitor, model = load(config, resolved, decision, device)
    blocks = build_block_map(model)
    plan = planner.price(config, planner.live_model(model, blocks), profile, shapes,
                         pair=decision.pair, streamed=decision.streamed)
    check_live_plan(config, plan, profile, device)
    o = config.optimizer
    estimate = estimate_of(config.estimator, o.optimizer, compute_dtype(model),
                           config.scheme.scheme)
    engine = ZOEngine(model, make_optimizer(
        o.optimizer, weight_decay=o.weight_decay, momentum=o.momentum, betas=o.betas,
        adam_eps=o.adam_eps, hessian_smoothing=config.estimator.hessian_smoothing),
        estimate, loss_fn=loss_fn, seed=config.runtime.seed, pair=decision.pair,
        blocks=blocks)
    if config.scheme.qat is not None:
        engine.enable_qat(config.scheme.qat, SCHEMES[config.scheme.scheme].adapts_linears)
    streamer = start_streaming(config, engine, plan, decision, device)
    return Parts(config, profile, device, task, resolved, encoder, shapes, monitor, model,
                 blocks, plan, engine, streamer, why, lr_why, threads,
                 use_cuda_graphs(config, engine, device))


def use_cuda_graphs(config: RunConfig, engine: ZOEngine, device: torch.device) -> str | None:
    """What the run's header says of CUDA graphs (edgezo.zo.graphs): None on a CPU."""
    if device.type != "cuda":
        return None
    if config.runtime.cuda_graphs == "off":
        return "off (--cuda-graphs off)"
    why = graphs.attach(engine)
    return ("on (each forward the run allows is one launch; a reason is printed for the "
            "others)" if why is None else f"off: {why}")


def compute_device(profile: Profile, strict_memory: bool) -> torch.device:
    """CUDA when the profile asks for it and a GPU exists; else the CPU, which emulates a
    GPU profile (same plan, same budget). `strict_memory` shapes the CPU's heap."""
    on_cuda = profile.device == "cuda" and torch.cuda.is_available()
    if strict_memory:
        if on_cuda:
            raise ConfigError("--strict-memory shapes the CPU's heap; on a GPU the "
                              "allocator's cap holds the budget: drop it")
        if not strict_heap():
            raise ConfigError("--strict-memory needs glibc's malloc (Linux); drop it")
    if not on_cuda:
        return torch.device("cpu")
    # with its index: torch.device("cuda") equals no tensor's device, and the allocator's
    # per-device calls (the budget cap) refuse it. Under torchrun, the rank's own GPU.
    local = os.environ.get("LOCAL_RANK")
    return torch.device("cuda", int(local) if local is not None else torch.cuda.current_device())


def objective_fn(config: RunConfig, objective: Callable | None) -> Callable:
    if objective is not None:
        return objective
    # "custom" in a config: the function itself is not in it, so the registry refuses it
    return LOSSES[OBJECTIVES[config.estimator.objective].name]


def load_task(config: RunConfig) -> Task | None:
    """The task with its three splits read (a bad file fails here, before the model)."""
    d = config.data
    if d.task is None:
        return None
    task = make_task(d.task, data_dir=d.data_dir, data_seed=d.data_seed, template=d.template,
                     train_examples=d.train_examples)
    check_task_options(config, task)
    for split in ("train", "validation", "test"):
        task.split(split)
    return task


def check_task_options(config: RunConfig, task: Task) -> None:
    """Options that only some tasks can take: refused where the task would ignore them."""
    d, objective = config.data, config.estimator.objective
    if objective == "f1" and not task.generative:
        raise ConfigError(f"the f1 objective scores answers the model writes; {d.task} "
                          "scores a choice among candidates (or texts): use --task squad "
                          "or a conversation file, or --objective ce")
    if objective == "accuracy" and task.metric != "accuracy":
        raise ConfigError(f"the accuracy objective counts right choices among candidates; "
                          f"{d.task} is scored by {task.metric}: use --objective "
                          f"{'f1' if task.generative else 'ce'}")
    if d.train_on != "assistant" and not any(ex.messages and ex.messages[0][0] != "text"
                                             for ex in task.split("train")[:1]):
        raise ConfigError(f"--train-on chooses which turns of a conversation train; {d.task} "
                          "has no conversations: drop it")


def measure_shapes(task: Task | None, encoder: Encoder, config: RunConfig) -> Shapes:
    d = config.data
    if task is None:
        return Shapes(Shape(d.batch_size, d.max_length), None)
    if config.estimator.objective == "f1":  # a step writes its answers, twice
        train = generation_shape(task.split("train"), encoder, d.batch_size,
                                 task.max_new_tokens)
    else:
        train = measure_shape(task.split("train"), encoder, d.batch_size)
    evaluated = task.split("validation") + task.split("test")
    if task.generative:
        return Shapes(train, generation_shape(evaluated, encoder, d.eval_batch_size,
                                              task.max_new_tokens))
    return Shapes(train, measure_shape(evaluated, encoder, d.eval_batch_size))


def plan_before_loading(config: RunConfig, resolved: ResolvedModel, profile: Profile,
                        shapes: Shapes, dtype: str, why: str
                        ) -> tuple[RunConfig, Decision, str]:
    """The resolved config and the decision (pair mode, what streams) from the model's
    config alone. A run over budget is refused here, with the changes that would make it
    fit; fp32 chosen for a CPU without native half precision gives way to the profile's
    dtype when only that fits. Returns (config, decision, why the dtype)."""
    model_config = (resolved.config if resolved.config is not None
                    else load_config(resolved.folder, config.model.trust_remote_code))
    budget = config.runtime.check_budget
    cfg = config.resolved(dtype)
    result = planner.plan_run(cfg, shapes, model_config, profile, budget=budget)
    if budget and not result.plan.fits and config.model.dtype is None \
            and dtype != profile.dtype:
        need = human_bytes(result.plan.total_bytes)
        cfg = config.resolved(profile.dtype)
        result = planner.plan_run(cfg, shapes, model_config, profile, budget=budget)
        why = (f"the profile's {profile.dtype}: fp32 (faster on this CPU) would need {need}, "
               "over the budget")
    if budget and not result.plan.fits:
        raise OutOfBudgetError(budget_message(result.plan, profile, result.alternatives))
    return cfg, result.decision, why


def budget_message(plan: Plan, profile: Profile, alternatives: list[dict] = ()) -> str:
    phase = max(plan.phases, key=plan.phases.get)  # the phase that sets the peak
    parts = ", ".join(f"{k} {human_bytes(v)}" for k, v in
                      (plan.eval_components if phase == "eval" else plan.components).items())
    advice = "; ".join(f"{a['change']} -> {human_bytes(a['predicted_total_bytes'])}"
                       f"{'' if a['fits'] else ' (still too big)'}" for a in alternatives)
    return (f"the run needs {human_bytes(plan.total_bytes)} at its {phase} peak ({parts}, "
            f"runtime {human_bytes(plan.runtime_overhead_bytes)}) but profile "
            f"{profile.name} allows {human_bytes(profile.budget_bytes)}. "
            + (f"What would fit: {advice}" if advice else
               "Try a smaller --batch-size, a bf16/fp16 --dtype, --scheme lora, "
               "--quantize nf4 or a larger profile"))


def load(config: RunConfig, resolved: ResolvedModel, decision: Decision,
         device: torch.device) -> tuple[MemoryMonitor, nn.Module]:
    """The memory baseline, then the weights with the scheme applied (a model that
    streams loads memory-mapped, on the host)."""
    dtype = parse_dtype(config.model.dtype)
    if decision.streamed and config.model.quantize is None:
        # streamed layers must load memory-mapped: weights stored in the run's dtype
        resolved.folder = streamable_folder(resolved, dtype)
    # Modules the load would import (peft and, through it, bitsandbytes, large beside a
    # small model) are the interpreter's memory, not the run's: import them before the
    # baseline is taken, as the tokenizer and the data already are (BENCHMARKS.md,
    # "Planner accuracy").
    if config.scheme.scheme in PEFT_SCHEMES or config.model.quantize:
        import peft  # noqa: F401
    release_freed_memory()  # what conversion or imports freed is not the run's memory
    monitor = MemoryMonitor(device)  # the baseline: everything but the weights
    load_device = torch.device("cpu") if decision.streamed else device
    with monitor.phase("load"):
        model = apply_scheme(load_weights(resolved, dtype, load_device, config.model.quantize,
                                          train_scales=SCHEMES[config.scheme.scheme].quantized_scales),
                             config.scheme, seed=config.runtime.seed)
        release_freed_memory()
    return monitor, model


def check_live_plan(config: RunConfig, plan: Plan, profile: Profile,
                    device: torch.device) -> None:
    """The loaded model's own plan must fit too; on CUDA the allocator is then capped at
    the budget, so an over-budget step fails as a clean error instead of slowing the
    whole machine."""
    if not config.runtime.check_budget:
        return
    if not plan.fits:
        raise OutOfBudgetError(budget_message(plan, profile))
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        total = torch.cuda.get_device_properties(index).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, profile.budget_bytes / total),
                                                   index)


def start_streaming(config: RunConfig, engine: ZOEngine, plan: Plan, decision: Decision,
                    device: torch.device) -> BlockStreamer | None:
    """Move the decided layers into their tier; the resident rest goes to the device."""
    if not decision.streamed:
        return None
    n_layers = len(layer_bytes(engine.blocks))
    st = plan.streaming
    # the plan's buffers: two for a GPU profile, also when emulated on the CPU, where the
    # second lets the disk tier read ahead on its worker thread
    streamer = engine.stream(streamed_layers(n_layers, decision.streamed), device, st["tier"],
                             config.streaming.offload_dir, st["buffers"],
                             master_dtype=torch.float32 if st["master_dtype"] == "fp32"
                             else None)
    model = engine.model
    if device.type == "cuda":  # the resident layers go up; the optimizer state follows
        model.to(device)
        engine.optimizer.rule.init_state([p.detach() for p in engine.blocks.params])
        return streamer
    # Loaded tensors can be views of one memory-mapped checkpoint, which stays mapped (and
    # resident) while any of them lives: give the resident ones their own memory so the
    # streamed layers' pages are let go.
    streamed = {id(t.param) for layer in streamer.layers for t in layer.tensors}
    with torch.no_grad():
        for p in model.parameters():
            if id(p) not in streamed:
                p.data = p.data.clone()
        for b in model.buffers():
            b.data = b.data.clone()
    release_freed_memory()
    return streamer


def join_process_group(engine: ZOEngine, on_cuda: bool, batch_size: int) -> tuple[int, int]:
    """Data-parallel ZO over torch.distributed (launched by torchrun): gloo on CPUs, NCCL
    on GPUs. Every rank draws the same directions; each evaluates its share of the batch;
    the per-example losses are gathered once per query. Returns (rank, world)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise ConfigError("--distributed needs the process group's address: launch with "
                              "torchrun --nproc-per-node N -m edgezo.cli finetune ...")
        dist.init_process_group("nccl" if on_cuda else "gloo")
    if on_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    world = engine.data_parallel()
    if batch_size % world:
        raise ConfigError(f"--batch-size {batch_size} does not split over {world} ranks; "
                          f"use a multiple of {world}")
    return dist.get_rank(), world
