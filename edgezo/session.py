"""`edgezo.Session`: the embedding API. profile → plan → load → task → engine → report.

    sess = edgezo.Session(profile="8gb-gpu", task="sst2", lr=1e-5)
    sess.evaluate("test")          # {"accuracy": ..., "examples": 872}
    for _ in range(100):
        sess.step()                 # one ZO step on the next training batch
    sess.save("my-model")

The Session only wires parts together; the logic lives in `edgezo.zo`, `edgezo.tasks`,
`edgezo.models` and `edgezo.memory`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from edgezo import __version__
from edgezo.checkpoint import (
    RUN_FILE,
    SeedLog,
    latest_valid,
    load_snapshot,
    read_run_file,
    read_seed_log,
    save_snapshot,
    snapshots,
    write_run_file,
)
from edgezo.errors import CheckpointError, ConfigError, OutOfBudgetError, unknown_choice
from edgezo.memory.measure import MemoryMonitor, release_freed_memory, strict_heap
from edgezo.memory.plan import MASTERS, Plan, Shape, layer_bytes, plan_step, streamed_layers
from edgezo.memory.planner import OFFLOAD, stream_tier
from edgezo.models.loading import (
    DEFAULT_MODEL,
    load_weights,
    parse_dtype,
    resolve_model,
    streamable_folder,
)
from edgezo.profiles import human_bytes, load_profile
from edgezo.schemes import PEFT_SCHEMES, SchemeOptions, apply_scheme, check_scheme
from edgezo.tasks import Encoder, Example, make_task
from edgezo.tasks.base import batches
from edgezo.tasks.loss import OBJECTIVES, candidate_scores, example_losses, shard_batch
from edgezo.zo import noise
from edgezo.zo.blocks import (
    backward_depth,
    build_block_map,
    pair_splits_layers,
    resolve_fo_blocks,
    weight_grad_layers,
)
from edgezo.zo.engine import StepResult, ZOEngine
from edgezo.zo.optimizers import make_optimizer
from edgezo.zo.schedule import Schedule


class Session:
    """A fine-tuning session on one model, task and device profile."""

    def __init__(self, model: str | None = None, profile: str = "8gb-gpu",
                 task: str | None = "sst2",
                 optimizer: str = "zo-sgd", scheme: str = "full", lr: float = 1e-5,
                 eps: float = 1e-3, batch_size: int = 16, seed: int = 0,
                 dtype: str | None = None, *, data_dir: str | None = None,
                 pair: bool | None = None, weight_decay: float = 0.0, max_length: int = 256,
                 eval_batch_size: int = 32, data_seed: int = 0, check_budget: bool = True,
                 q: int = 1, estimate: str = "two-sided", directions: str = "gaussian",
                 block_wise: bool = False, granularity: str = "layer",
                 sparsity: float = 0.0, sparsity_mask: str = "random", sparsity_every: int = 0,
                 fo_blocks: list[str | int] | None = None, momentum: float | None = None,
                 betas: tuple[float, float] | None = None, adam_eps: float | None = None,
                 objective: str | Callable = "ce", schedule: str = "constant",
                 warmup_steps: int = 0, total_steps: int | None = None,
                 template: str = "aligned", lora_r: int = 8, lora_alpha: float = 16.0,
                 lora_targets: list[str] | None = None, prefix_tokens: int = 5,
                 prompt_tokens: int = 10, quantize: str | None = None,
                 offload: str = "auto", stream_layers: int | None = None,
                 stream_masters: str = "auto",
                 offload_dir: str | None = None, distributed: bool = False,
                 trust_remote_code: bool = False, strict_memory: bool = False):
        """Every option of `edgezo finetune` has the keyword of the same name here. An
        option that does not apply to the chosen optimizer is an error, not ignored."""
        # what a run folder's run.json records, so that Session.resume rebuilds this one
        self.settings = {k: v for k, v in locals().items() if k not in ("self", "objective")}
        self.settings["objective"] = objective if isinstance(objective, str) else None
        self._log: SeedLog | None = None
        self.run_dir: Path | None = None
        self.scheme_options = SchemeOptions(lora_r, lora_alpha, list(lora_targets or []),
                                            prefix_tokens, prompt_tokens, init_seed=seed)
        check_scheme(scheme, self.scheme_options)
        if quantize is not None and scheme == "full":
            raise ConfigError(f"{quantize} weights cannot take ZO updates; train adapters on "
                              "the quantized base with --scheme lora (or prefix, prompt, head)")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if eps <= 0:
            raise ConfigError(f"eps must be > 0, got {eps}")
        self.schedule = Schedule(lr, schedule, total_steps, warmup_steps)
        self.profile = load_profile(profile)
        # Data before weights: a bad data folder fails in a second, not after a model load,
        # and the rows are not counted as the run's memory.
        self.task = None if task is None else make_task(task, data_dir=data_dir,
                                                         data_seed=data_seed, template=template)
        if self.task is not None:
            for split in ("train", "validation", "test"):
                self.task.split(split)
        self.optimizer = make_optimizer(optimizer, weight_decay=weight_decay, momentum=momentum,
                                        betas=betas, adam_eps=adam_eps)
        loss_fn = self._objective(objective)
        self.on_cuda = self.profile.device == "cuda" and torch.cuda.is_available()
        self.device = torch.device("cuda" if self.on_cuda else "cpu")
        self.emulated = self.profile.device == "cuda" and not self.on_cuda
        self.dtype_name = dtype or self.profile.dtype
        self.strict_memory = strict_memory
        if strict_memory:
            if self.on_cuda:
                raise ConfigError("--strict-memory shapes the CPU's heap; on a GPU the "
                                  "allocator's cap holds the budget: drop it")
            if not strict_heap():
                raise ConfigError("--strict-memory needs glibc's malloc (Linux); drop it")
        self.estimator_options = dict(q=q, estimate=estimate, directions=directions,
                                      block_wise=block_wise, granularity=granularity,
                                      sparsity=sparsity, sparsity_mask=sparsity_mask,
                                      sparsity_every=sparsity_every,
                                      fo_blocks=list(fo_blocks or []))
        rule = self.optimizer.rule
        self.config = dict(model=model or DEFAULT_MODEL, task=task, optimizer=optimizer,
                           scheme=scheme, profile=self.profile.name, seed=seed,
                           lr=lr, eps=eps, batch_size=batch_size, dtype=self.dtype_name,
                           weight_decay=weight_decay, max_length=max_length,
                           data_seed=data_seed, eval_batch_size=eval_batch_size,
                           template=template, lora_r=lora_r, lora_alpha=lora_alpha,
                           lora_targets=list(lora_targets or []), prefix_tokens=prefix_tokens,
                           prompt_tokens=prompt_tokens, quantize=quantize,
                           schedule=schedule, warmup_steps=warmup_steps,
                           total_steps=total_steps, offload=offload,
                           stream_layers=stream_layers, stream_masters=stream_masters,
                           strict_memory=strict_memory,
                           objective=objective if isinstance(objective, str) else "custom",
                           momentum=getattr(rule, "momentum", None),
                           betas=getattr(rule, "betas", None),
                           adam_eps=getattr(rule, "eps", None),
                           **self.estimator_options)
        self.eps, self.batch_size, self.seed = eps, batch_size, seed
        self.eval_batch_size = eval_batch_size

        kind = self.optimizer.estimator
        if pair is not None and kind != "zo":
            raise ConfigError(f"--pair/--two-pass choose how ZO evaluates L(θ ± εz); "
                              f"{optimizer} makes no such pair: drop the option")
        resolved = resolve_model(model, parse_dtype(self.dtype_name), trust_remote_code)
        self.tokenizer, self.model_source = resolved.tokenizer, resolved
        self.encoder = Encoder(self.tokenizer, max_length=max_length,
                               loss=self.task.loss if self.task is not None else "classification")
        self._train_shape = self._shape(("train",), batch_size)
        self._eval_shape = (None if self.task is None
                            else self._shape(("validation", "test"), eval_batch_size))
        if offload not in OFFLOAD:
            raise unknown_choice("offload", offload, OFFLOAD)
        if stream_masters not in MASTERS:
            raise unknown_choice("stream masters", stream_masters, MASTERS)
        if offload == "off" and (stream_layers or offload_dir or stream_masters != "auto"):
            raise ConfigError("--stream-layers, --offload-dir and --stream-masters are for "
                              "streaming; --offload off forbids it: drop them")
        self.stream_masters = stream_masters
        if offload == "host" and offload_dir:
            raise ConfigError("--offload-dir holds the disk tier's files; --offload host "
                              "keeps layers in memory: drop one of them")
        self.offload, self.offload_dir, self._stream_opt = offload, offload_dir, stream_layers
        # layers to stream: forced ones now; under a budget check the plan decides below
        self._stream_k = (stream_layers if stream_layers is not None
                          else -1 if offload in ("host", "disk") else 0)
        if check_budget:
            # Planned from the config before any weight is loaded: a model too big for
            # the profile fails in seconds, with the changes that would make it fit.
            self._check_plan_from_config(resolved.folder, scheme, optimizer, quantize,
                                         pair)
        if not self._stream_k and (offload_dir or stream_masters != "auto"):
            given = [f for f, on in (("--offload-dir", offload_dir),
                                     ("--stream-masters", stream_masters != "auto")) if on]
            raise ConfigError(f"{' and '.join(given)} set how layers stream, and under this "
                              "plan none does (the weights fit): drop them, or stream with "
                              "--offload disk (or host on a GPU)")
        if self._stream_k and quantize is None:
            # streamed layers must load memory-mapped: weights stored in the run's dtype
            resolved.folder = streamable_folder(resolved, parse_dtype(self.dtype_name))
        # Modules the load would import (peft and, through it, bitsandbytes: ~150 MiB of
        # Python) are the interpreter's memory, not the run's: import them before the
        # baseline is taken, as the tokenizer and the data already are.
        if scheme in PEFT_SCHEMES or quantize:
            import peft  # noqa: F401
        release_freed_memory()  # what conversion or imports freed is not the run's memory
        self.monitor = MemoryMonitor(self.device)  # the baseline: everything but the weights
        # A model that streams is loaded on the host; the resident part moves up after.
        load_device = torch.device("cpu") if self._stream_k and self.on_cuda else self.device
        with self.monitor.phase("load"):
            self._model = apply_scheme(
                load_weights(resolved, parse_dtype(self.dtype_name), load_device, quantize),
                scheme,
                self.scheme_options)
            release_freed_memory()

        self._block_map = build_block_map(self._model)
        sizes = layer_bytes(self._block_map)
        n_layers = len(sizes)
        if self._stream_k == -1:
            self._stream_k = n_layers
        if not 0 <= self._stream_k <= n_layers:
            raise ConfigError(f"--stream-layers must be in 0..{n_layers} (the model's layers), "
                              f"got {self._stream_k}")
        self._stream = streamed_layers(n_layers, self._stream_k)
        # On a CPU the compute device is the host: streamed layers always come from disk.
        # On a GPU, pinned host memory when the profile's host holds the layers, else disk.
        self._tier = ("disk" if not self.on_cuda else stream_tier(
            offload, self.profile, sum(sizes[i].total for i in self._stream)))
        fo = (set(range(len(self._block_map.params))) if kind == "fo"
              else resolve_fo_blocks(self._block_map, self.estimator_options["fo_blocks"]))
        # the plan's view of the FO group: its size, the layers a backward crosses, and
        # how many of them train their own weights
        self._fo = (sum(self._block_map.params[i].numel() for i in fo),
                    backward_depth(self._block_map, fo),
                    weight_grad_layers(self._block_map, fo))
        self._split_layers = pair_splits_layers(self._block_map, fo,
                                                self.estimator_options["block_wise"])
        pair_plan = self._plan(pair=kind == "zo")
        self.pair = pair if pair is not None else (pair_plan.fits or not check_budget)
        self.pair = self.pair and kind == "zo"
        self.plan: Plan = pair_plan if self.pair else self._plan(pair=False)
        if check_budget and not self.plan.fits:
            raise OutOfBudgetError(self._budget_message())
        self.check_budget = check_budget
        if check_budget and self.on_cuda:
            # The allocator refuses to grow past the budget: an over-budget step fails
            # as a clean error here instead of slowing the whole machine.
            total = torch.cuda.get_device_properties(self.device).total_memory
            torch.cuda.set_per_process_memory_fraction(
                min(1.0, self.profile.budget_bytes / total), self.device)
        self.engine = ZOEngine(self._model, self.optimizer, eps=eps, seed=seed, pair=self.pair,
                               blocks=self._block_map, loss_fn=loss_fn,
                               **self.estimator_options)
        self.rank, self.world = 0, 1
        if distributed or int(os.environ.get("WORLD_SIZE", "1")) > 1:
            self._join_process_group()
        self.streamer = None
        if self._stream:
            wide = self.plan.streaming["master_dtype"] == "fp32"
            # the plan's buffers: two for a GPU profile, also when emulated on the CPU,
            # where the second lets the disk tier read ahead on its worker thread
            self.streamer = self.engine.stream(self._stream, self.device, self._tier,
                                               offload_dir, self.plan.streaming["buffers"],
                                               master_dtype=torch.float32 if wide else None)
            if load_device != self.device:  # the resident layers go up; state follows
                self._model.to(self.device)
                self.optimizer.rule.init_state([p.detach() for p in self._block_map.params])
            else:
                # Loaded tensors can be views of one memory-mapped checkpoint, which stays
                # mapped (and resident) while any of them lives: give the resident ones
                # their own memory so the streamed layers' pages are let go.
                streamed = {id(t.param) for layer in self.streamer.layers
                            for t in layer.tensors}
                with torch.no_grad():
                    for p in self._model.parameters():
                        if id(p) not in streamed:
                            p.data = p.data.clone()
                    for b in self._model.buffers():
                        b.data = b.data.clone()
                release_freed_memory()
        self._batches = None
        self.history: list[StepResult] = []
        self.evaluations: dict[str, dict] = {}

    def _objective(self, objective: str | Callable) -> Callable:
        if callable(objective):
            fn = objective
        elif objective in OBJECTIVES:
            fn = OBJECTIVES[objective]
        else:
            raise unknown_choice("objective", objective, list(OBJECTIVES))
        if fn is not example_losses and self.optimizer.estimator != "zo":
            raise ConfigError(f"{self.optimizer.name} differentiates the loss; the "
                              f"{objective if isinstance(objective, str) else 'custom'} "
                              "objective needs a ZO optimizer (it is not differentiable)")
        return fn

    # -- planning ---------------------------------------------------------------------
    def _shape(self, splits: tuple[str, ...], batch_size: int) -> Shape:
        """The batch geometry a phase's plan must cover: its longest example's tokens, the
        rows each example becomes and the positions the loss reads logits at."""
        if self.task is None:
            return Shape(batch_size, self.config["max_length"])
        examples = [e for split in splits for e in self.task.split(split)]
        # Token counts of every (prompt + candidate) and candidate, in two batched calls
        # of the fast tokenizer; the longest of each is then encoded as a run would.
        pairs = [(k, e.prompt_for(i), c) for k, e in enumerate(examples)
                 for i, c in enumerate(e.candidates)]
        if not pairs:  # an empty split (a small user task): nothing of it will run
            return Shape(batch_size, 0)
        full = self.tokenizer([p + c for _, p, c in pairs]).input_ids
        answers = self.tokenizer([c for _, _, c in pairs], add_special_tokens=False).input_ids
        longest = pairs[max(range(len(pairs)), key=lambda j: len(full[j]))][0]
        widest = pairs[max(range(len(pairs)), key=lambda j: len(answers[j]))][0]
        seq_len, rows, positions = 0, 1, 1
        for ex in (examples[longest], examples[widest]):
            enc = self.encoder.encode([ex])
            seq_len = max(seq_len, int(enc["input_ids"].shape[1]))
            rows = max(rows, int(enc["input_ids"].shape[0]))
            if "labels" in enc:  # the loss reads logits from the first label on
                has = (enc["labels"] != -100).any(0).nonzero()
                first = max(1, int(has[0])) if has.numel() else seq_len - 1
                positions = max(positions, int(enc["labels"].shape[1]) - first + 1)
        return Shape(batch_size, seq_len, rows, positions)

    def _plan(self, pair: bool, train: Shape | None = None,
              evaluation: Shape | None = None) -> Plan:
        threads = 1 if self.on_cuda else noise.worker_threads()
        fo_params, backward_layers, weight_layers = self._fo
        t = train or self._train_shape
        return plan_step(self._model, self._block_map, self.profile, batch_size=t.batch_size,
                         seq_len=t.seq_len, pair=pair, on_cuda=self.on_cuda,
                         optimizer_state_bytes=self.optimizer.state_bytes_per_param,
                         noise_threads=threads,
                         sparsity=self.estimator_options["sparsity"] > 0,
                         fo_params=fo_params, backward_layers=backward_layers,
                         weight_grad_layers=weight_layers,
                         split_layers=self._split_layers,
                         forward_grad=self.optimizer.estimator == "forward-grad",
                         stream_layers=self._stream, stream_tier=self._tier,
                         rows_per_example=t.rows_per_example,
                         logit_positions=t.logit_positions,
                         eval_shape=evaluation or self._eval_shape,
                         perturbs=self.optimizer.estimator != "fo",
                         stream_masters=self.stream_masters)

    def _admit(self, batch: dict, phase: str) -> None:
        """The ledger: a batch bigger than the plan's shapes (an app's long example, more
        rows than --batch-size) is priced before it runs, and refused if it cannot fit.

        Raised before any weight moves, so the session stays usable with smaller batches.
        """
        if not self.check_budget:
            return
        rows, width = (int(n) for n in batch["input_ids"].shape)
        positions = 1
        if "labels" in batch:
            has = (batch["labels"] != -100).any(0).nonzero()
            positions = width - (max(1, int(has[0])) if has.numel() else width - 1) + 1
        planned = self._train_shape if phase == "train" else self._eval_shape
        if planned is not None and (rows <= planned.rows and width <= planned.seq_len
                                    and positions <= planned.logit_positions):
            return
        shape = Shape(rows, width, 1, positions)
        plan = (self._plan(self.pair, train=shape) if phase == "train"
                else self._plan(self.pair, evaluation=shape))
        need = plan.phases[phase] + plan.runtime_overhead_bytes
        if need > self.profile.budget_bytes:
            raise OutOfBudgetError(
                f"this {phase} batch ({rows} rows x {width} tokens) needs "
                f"{human_bytes(need)}, over profile {self.profile.name}'s "
                f"{human_bytes(self.profile.budget_bytes)}; the plan was made for "
                f"{planned.rows if planned else '?'} rows x "
                f"{planned.seq_len if planned else '?'} tokens. Pass fewer examples at once "
                "or shorter ones (max_length), or pick a larger profile. Nothing was changed")

    def _check_plan_from_config(self, folder: str, scheme: str, optimizer: str,
                                quantize: str | None, pair: bool | None) -> None:
        from edgezo.memory.planner import PlanRequest, plan_run

        o = self.estimator_options
        result = plan_run(PlanRequest(
            model=folder, profile=str(self.profile.source), scheme=scheme,
            optimizer=optimizer, quantize=quantize, dtype=self.dtype_name,
            batch_size=self.batch_size, seq_len=self._train_shape.seq_len, pair=pair,
            sparsity=o["sparsity"], fo_blocks=o["fo_blocks"], block_wise=o["block_wise"],
            offload=self.offload,
            stream_layers=self._stream_opt, stream_masters=self.stream_masters,
            trust_remote_code=self.settings["trust_remote_code"],
            rows_per_example=self._train_shape.rows_per_example,
            logit_positions=self._train_shape.logit_positions, eval_shape=self._eval_shape))
        streaming = result.plan.streaming
        self._stream_k = len(streaming["layers"]) if streaming else 0
        if result.plan.fits:
            return
        self.plan = result.plan
        advice = "; ".join(
            f"{a['change']} -> {human_bytes(a['predicted_total_bytes'])}"
            f"{'' if a['fits'] else ' (still too big)'}" for a in result.alternatives)
        raise OutOfBudgetError(self._budget_message(advice))

    def _budget_message(self, advice: str = "") -> str:
        p = self.plan
        phase = max(p.phases, key=p.phases.get)  # the phase that sets the peak
        parts = ", ".join(f"{k} {human_bytes(v)}" for k, v in
                          (p.eval_components if phase == "eval" else p.components).items())
        return (f"the run needs {human_bytes(p.total_bytes)} at its {phase} peak ({parts}, runtime "
                f"{human_bytes(p.runtime_overhead_bytes)}) but profile {self.profile.name} "
                f"allows {human_bytes(self.profile.budget_bytes)}. "
                + (f"What would fit: {advice}" if advice else
                   "Try a smaller --batch-size, a bf16/fp16 --dtype, --scheme lora, "
                   "--quantize nf4 or a larger profile"))

    # -- the embedding API ------------------------------------------------------------
    @property
    def lr(self) -> float:
        """The peak learning rate; the schedule gives each step's (`schedule(step)`)."""
        return self.schedule.lr

    @lr.setter
    def lr(self, value: float) -> None:
        self.schedule = dataclasses.replace(self.schedule, lr=value)
        self.config["lr"] = value

    @property
    def model(self) -> torch.nn.Module:
        """The model, with every completed step applied (flushes the deferred update)."""
        self.engine.flush()
        return self._model

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()}

    def _check_batch(self, batch: dict) -> None:
        if "input_ids" not in batch:
            raise ConfigError("a batch needs 'input_ids' (and 'attention_mask', plus 'labels' "
                              "for a language-modelling loss)")
        if "labels" not in batch and "candidate_ids" not in batch:
            raise ConfigError("a batch needs 'labels' (token ids, -100 where no loss applies) "
                              "or 'candidate_ids' and 'gold'")

    def _require_task(self) -> None:
        if self.task is None:
            raise ConfigError("this Session has no task (task=None): pass batches to step(), "
                              "or create it with a task to use its data")

    def next_batch(self) -> dict:
        """The next training batch; data-parallel, this rank's share of it (the whole
        batch is encoded first, so every row is padded exactly as on one process)."""
        self._require_task()
        if self._batches is None:
            self._batches = batches(self.task.split("train"), self.batch_size, self.seed,
                                    start_step=self.engine.step_index)
        batch = self.encoder.encode(next(self._batches))
        if self.world > 1:
            batch = shard_batch(batch, self.rank, self.world)
        return self._to_device(batch)

    def _join_process_group(self) -> None:
        """Data-parallel ZO over torch.distributed (launched by torchrun): gloo on CPUs,
        NCCL on GPUs. Every rank draws the same directions; each evaluates its share of
        the batch; the per-example losses are gathered once per query."""
        import torch.distributed as dist

        if not dist.is_initialized():
            if "MASTER_ADDR" not in os.environ:
                raise ConfigError("--distributed needs the process group's address: launch "
                                  "with torchrun --nproc-per-node N -m edgezo.cli finetune ...")
            dist.init_process_group("nccl" if self.on_cuda else "gloo")
        if self.on_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        world = self.engine.data_parallel()
        if self.batch_size % world:
            raise ConfigError(f"--batch-size {self.batch_size} does not split over {world} "
                              f"ranks; use a multiple of {world}")
        self.rank, self.world = dist.get_rank(), world

    def step(self, batch: dict | None = None) -> StepResult:
        """One ZO step on the next training batch, or on the given dict of tensors."""
        if batch is None:
            batch = self.next_batch()
        else:
            self._check_batch(batch)
            self._admit(batch, "train")
            batch = self._to_device(batch)
        try:
            with self.monitor.phase("train"):
                result = self.engine.step(batch, self.schedule(self.engine.step_index))
        except torch.cuda.OutOfMemoryError:
            self.engine.flush()  # the weights of the last completed step, all applied
            raise OutOfBudgetError(
                f"step {self.engine.step_index + 1} ran out of device memory under profile "
                f"{self.profile.name} ({human_bytes(self.profile.budget_bytes)}); the model "
                "holds every completed step. Lower --batch-size or use --two-pass") from None
        self.history.append(result)
        if self._log is not None:
            self._log.append(result.log_entry())
        self._guard()
        return result

    # -- on-device personalisation ----------------------------------------------------------
    def learn(self, examples: Example | list[Example]) -> StepResult:
        """One ZO step on the app's own examples (no task files needed): what an app calls
        each time its user corrects or confirms a prediction."""
        examples = [examples] if isinstance(examples, Example) else list(examples)
        if not examples:
            raise ConfigError("learn() needs at least one Example")
        return self.step(self.encoder.encode(examples))

    @torch.no_grad()
    def predict(self, examples: Example | list[Example]) -> list[int]:
        """The index of the candidate the model now scores highest, per example."""
        examples = [examples] if isinstance(examples, Example) else list(examples)
        self.engine.flush()
        self.engine.release_scratch()
        out: list[int] = []
        for i in range(0, len(examples), self.eval_batch_size):
            batch = self.encoder.encode(examples[i:i + self.eval_batch_size])
            self._admit(batch, "eval")
            out += candidate_scores(self._model, self._to_device(batch)).argmax(-1).tolist()
        return out

    # -- run folders: seed log, snapshots, resume -------------------------------------------
    def record(self, run_dir: str | os.PathLike) -> None:
        """Log every step of this session to `run_dir` (run.json + seedlog.jsonl), so
        that it can be snapshotted, resumed and replayed."""
        if self.settings["objective"] is None:
            raise ConfigError("a run with a custom objective callable cannot be recorded "
                              "for resume (run.json cannot hold a function)")
        self.run_dir = Path(run_dir)
        if not (self.run_dir / RUN_FILE).is_file():
            write_run_file(self.run_dir, self.settings)
        if self._log is None:
            self._log = SeedLog(self.run_dir)

    def checkpoint(self, keep: int = 3) -> Path:
        """Snapshot the trainable weights, optimizer state, masks and RNG into the run
        folder (atomically), keeping the newest `keep` snapshots."""
        if self.run_dir is None:
            raise ConfigError("call record(run_dir) before checkpoint()")
        done = snapshots(self.run_dir)
        if done and done[-1].name == f"step-{self.engine.step_index:08d}":
            return done[-1]  # this step is already saved
        state = self.engine.state_tensors()  # flushes the pending update first
        state["torch_rng"] = torch.get_rng_state()
        blocks = self.engine.blocks
        name_of = {id(p): n for n, p in zip(blocks.names, blocks.params, strict=True)}
        weights = {}
        # streamed layers one at a time (materializing them all would need the whole model
        # in memory, which is what streaming avoids); only trainable tensors are kept, as
        # their masters (fp32 where the tier keeps fp32), so a resume continues exactly
        for layer in self.streamer.layers if self.streamer else []:
            with self.streamer.hold(layer.unit.module):
                for t in layer.tensors:
                    if id(t.param) in name_of:
                        master = self.streamer.master_view(t.param)
                        weights[name_of[id(t.param)]] = master.cpu().clone()
        for n, p in zip(blocks.names, blocks.params, strict=True):
            if n not in weights:
                weights[n] = p.detach().cpu().clone()
        masks = self.engine.masks
        meta = {"edgezo_version": __version__, "mask_epoch": masks.epoch if masks else None,
                "settings": self.settings}
        return save_snapshot(self.run_dir, self.engine.step_index, weights, state, meta, keep)

    @classmethod
    def resume(cls, run_dir: str | os.PathLike, warn: Callable[[str], None] = print,
               **overrides) -> Session:
        """The session of a recorded run, at its last logged step: the newest intact
        snapshot, then the seed log's steps after it, replayed (bit-identical on the same
        kind of device). `overrides` may change settings that do not alter the run's
        updates (data_dir, eval_batch_size, check_budget, offload_dir, strict_memory)."""
        run_dir = Path(run_dir)
        settings = read_run_file(run_dir)
        allowed = {"data_dir", "eval_batch_size", "check_budget", "offload_dir",
                   "strict_memory"}
        if set(overrides) - allowed:
            raise ConfigError(f"resume keeps the run's settings; only {sorted(allowed)} may "
                              f"change, not {sorted(set(overrides) - allowed)}")
        session = cls(**{**settings, **overrides})
        found = latest_valid(run_dir, warn)
        log = read_seed_log(run_dir)
        if found is not None:
            snap, meta = found
            weights, state = load_snapshot(snap)
            session._restore(weights, state, meta)
        elif log and not session.engine.replayable:
            raise CheckpointError(f"{run_dir} has no intact snapshot, and "
                                  f"{session.optimizer.name} cannot be replayed from its seed "
                                  "log; start the run again")
        todo = [e for e in log if e["step"] >= session.engine.step_index]
        if todo and not session.engine.replayable:
            warn(f"{len(todo)} steps after the last snapshot use backpropagated gradients "
                 "and cannot be replayed; continuing from the snapshot")
            todo = []
        for entry in todo:
            session.engine.replay(entry)
        if todo:
            session.engine.flush()
        session.record(run_dir)
        return session

    @classmethod
    def replay_run(cls, run_dir: str | os.PathLike, **overrides) -> Session:
        """The base model with every step of a run's seed log re-applied: the run's
        weights rebuilt from run.json, the seed log and the base model alone (no data,
        no snapshot), bit-identical on the same kind of device."""
        run_dir = Path(run_dir)
        settings = {**read_run_file(run_dir), "task": None, **overrides}
        session = cls(**settings)
        if not session.engine.replayable:
            session.close()
            raise CheckpointError(f"{settings['optimizer']} steps use backpropagated "
                                  "gradients, which a seed log does not hold")
        for entry in read_seed_log(run_dir):
            session.engine.replay(entry)
        session.engine.flush()
        return session

    def _restore(self, weights: dict, state: dict, meta: dict) -> None:
        blocks = self.engine.blocks
        missing = [n for n in blocks.names if n not in weights]
        if missing:
            raise CheckpointError(f"the snapshot lacks {len(missing)} trainable tensors (e.g. "
                                  f"{missing[0]}): it belongs to another model or scheme")
        self.engine.flush()
        name_of = {id(p): n for n, p in zip(blocks.names, blocks.params, strict=True)}
        done: set[int] = set()
        with torch.no_grad():
            for layer in self.streamer.layers if self.streamer else []:
                with self.streamer.hold(layer.unit.module):  # restored values go to the tier
                    for t in layer.tensors:
                        if id(t.param) in name_of:
                            master = self.streamer.master_view(t.param)
                            master.copy_(weights[name_of[id(t.param)]])
                            self.streamer.mark_updated(t.param)  # re-rounds the compute copy
                            done.add(id(t.param))
            for n, p in zip(blocks.names, blocks.params, strict=True):
                if id(p) not in done:
                    p.copy_(weights[n])
        self.engine.load_state_tensors(state, meta["step"], meta.get("mask_epoch"))
        torch.set_rng_state(state["torch_rng"])

    def _guard(self) -> None:
        """On a CPU-emulated profile, the measured process memory must stay in budget
        (on CUDA the allocator's per-process limit enforces it)."""
        if not self.check_budget or self.on_cuda:
            return
        measured = self.monitor.peaks.get("train", 0)
        if measured > self.profile.budget_bytes:
            raise OutOfBudgetError(
                f"step {self.engine.step_index} used {human_bytes(measured)}, over profile "
                f"{self.profile.name}'s {human_bytes(self.profile.budget_bytes)} budget (the "
                f"plan predicted {human_bytes(self.plan.total_bytes)}). Lower --batch-size, "
                "use --two-pass, or pick a larger profile")

    @torch.no_grad()
    def evaluate(self, split: str = "test", max_examples: int | None = None) -> dict:
        """Accuracy by candidate log-likelihood on a task split, batched."""
        self._require_task()
        self.engine.flush()
        self.engine.release_scratch()
        examples = self.task.split(split)[:max_examples]
        hits: list[bool] = []
        groups: dict[str, list[bool]] = {}
        with self.monitor.phase("eval"):
            for i in range(0, len(examples), self.eval_batch_size):
                part = examples[i:i + self.eval_batch_size]
                batch = self.encoder.encode(part)
                self._admit(batch, "eval")
                batch = self._to_device(batch)
                scores = candidate_scores(self._model, batch)
                right = (scores.argmax(-1) == batch["gold"]).tolist()
                hits += right
                for ex, ok in zip(part, right, strict=True):
                    if ex.group is not None:
                        groups.setdefault(ex.group, []).append(ok)
        release_freed_memory()  # eval batches differ in shape; return their freed heap
        result = {"accuracy": sum(hits) / max(1, len(hits)), "examples": len(hits),
                  "split": split}
        if groups:  # MultiRC: a question counts when every answer option is right
            result["exact_match"] = sum(all(v) for v in groups.values()) / len(groups)
            result["groups"] = len(groups)
        self.evaluations[split] = result
        return result

    def report(self) -> dict:
        """Everything a run knows about itself; `edgezo finetune` writes it as report.json."""
        times = [r.time_s for r in self.history[1:]] or [r.time_s for r in self.history]
        return {
            "edgezo_version": __version__,
            "model": self.config["model"],
            "model_source": self.model_source.source,
            "task": self.config["task"],
            "optimizer": self.config["optimizer"],
            "scheme": self.config["scheme"],
            "profile": self.profile.name,
            "steps": len(self.history),
            "seed": self.seed,
            "hyperparameters": {k: v for k, v in self.config.items() if k not in
                                ("model", "task", "optimizer", "scheme", "profile", "seed")}
            | {"pair": self.pair},
            "device": str(self.device),
            "emulated_profile": self.emulated,
            "forward_passes_per_step": self.engine.forward_passes_per_step,
            "backward_passes_per_step": 1 if self.engine.fo_indices else 0,
            "optimizer_state_bytes_per_param": self.optimizer.state_bytes_per_param,
            "step_time_s": sum(times) / len(times) if times else None,
            "skipped_steps": sum(r.skipped for r in self.history),
            "peak_memory_bytes": self.monitor.run_peak_bytes,
            "peak_memory_by_phase": dict(self.monitor.peaks),
            "reserved_peak_memory_by_phase": dict(self.monitor.reserved_peaks) or None,
            "predicted_peak_memory_bytes": self.plan.peak_bytes,
            "streaming": self.streamer.stats() if self.streamer else None,
            "plan": self.plan.to_dict(),
            "trainable_parameters": self.engine.blocks.numel(),
            "data_parallel": {"ranks": self.world,
                              "bytes_communicated": self.engine.bytes_communicated}
            if self.world > 1 else None,
            "evaluations": self.evaluations,
            "memory_samples": list(self.monitor.samples),
            "splits": self.task.split_info if self.task is not None else None,
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the fine-tuned model (safetensors; a peft adapter folder for the lora,
        prefix and prompt schemes), its tokenizer and report.json."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.engine.flush()
        self.engine.perturbation.remove()  # save the plain HF module
        try:
            with self.streamer.materialized() if self.streamer else contextlib.nullcontext():
                self._model.save_pretrained(out)
        finally:
            self.engine.perturbation.install()
        self.tokenizer.save_pretrained(out)
        (out / "report.json").write_text(json.dumps(self.report(), indent=2))
        return out

    def close(self) -> None:
        self.engine.close()
        self.monitor.close()
        if self._log is not None:
            self._log.close()
            self._log = None
