"""`edgezo.Session`: the embedding API.

    sess = edgezo.Session(profile="8gb-gpu", task="sst2", lr=1e-5)   # or Session(config)
    sess.evaluate("test")          # {"accuracy": ..., "examples": 872}
    for _ in range(100):
        sess.step()                 # one ZO step on the next training batch
    sess.save("my-model")

A Session is built by `edgezo.run.build` (profile → data → plan → load → engine) from a
`RunConfig`; run folders live in `edgezo.run.folder` (record, checkpoint) and
`edgezo.run.resume` (resume, replay), the memory budget's guard in `edgezo.run.guard`.
This module only wires them to the API.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from edgezo.config.defaults import DEFAULT_KEEP
from edgezo.config.runconfig import RunConfig
from edgezo.device.heap import release_freed_memory
from edgezo.device.profiles import human_bytes
from edgezo.errors import CheckpointError, ConfigError, OutOfBudgetError
from edgezo.run import folder as runs
from edgezo.run import guard
from edgezo.run.build import build, join_process_group
from edgezo.run.feedback import ranked_step
from edgezo.run.report import session_report
from edgezo.run.resume import replay as replay_folder
from edgezo.run.resume import resume as resume_folder
from edgezo.run.resume import rewind
from edgezo.run.save import save_session
from edgezo.run.snapshots import read_seed_log
from edgezo.tasks import scoring
from edgezo.tasks.base import Example, batches
from edgezo.tasks.generate import reply
from edgezo.tasks.loss import candidate_scores, check_batch, shard_batch
from edgezo.zo.ranking import RankFn, RankResult
from edgezo.zo.result import StepResult
from edgezo.zo.schedule import Schedule

__all__ = ["OutOfBudgetError", "Session"]


def _config(config: RunConfig | str | None, options: dict) -> RunConfig:
    """A RunConfig from Session's arguments: a config, a model path, or neither, with
    keyword options on top (`Session("model/")` names the model, as it always has)."""
    if isinstance(config, RunConfig):
        return config.override(**options)
    if config is not None:
        options = {"model": config, **options}
    return RunConfig.from_flat(**options)


class Session:
    """A fine-tuning session on one model, task and device profile."""

    def __init__(self, config: RunConfig | str | None = None, /, *,
                 objective: str | Callable | None = None, **options):
        """`Session(config)`, `Session(**options)` (every `edgezo finetune` option has
        the keyword of the same name) or both (keywords override the config). An option
        that would do nothing is an error, not ignored. `objective` also takes a function
        `(model, batch) -> per-example losses`, which a ZO optimizer can minimise."""
        custom = objective if callable(objective) else None
        if objective is not None:
            options["objective"] = "custom" if custom else objective
        parts = build(_config(config, options), custom)
        self.config = parts.config
        self.custom_objective = custom is not None
        self.profile, self.device, self.task = parts.profile, parts.device, parts.task
        self.model_source, self.encoder = parts.resolved, parts.encoder
        self.tokenizer = parts.resolved.tokenizer
        self.shapes, self.monitor, self.plan = parts.shapes, parts.monitor, parts.plan
        self.monitor.limits = dict(self.plan.phases)
        # The model object itself (`model` also applies the deferred update first) and its
        # trainable blocks, for the run's own modules (guard, folder, save).
        self.module, self.block_map = parts.model, parts.blocks
        self.engine, self.streamer = parts.engine, parts.streamer
        self.dtype_reason = parts.dtype_reason
        self.lr_reason = parts.lr_reason
        self.threads, self.graphs = parts.threads, parts.graphs
        self.optimizer = self.engine.optimizer
        o = self.config.optimizer
        self.schedule = Schedule(o.lr, o.schedule, o.total_steps, o.warmup_steps)
        self.process_rank, self.world = 0, 1  # data-parallel ranks
        if self.config.runtime.distributed or int(os.environ.get("WORLD_SIZE", "1")) > 1:
            self.process_rank, self.world = join_process_group(self.engine, self.on_cuda,
                                                       self.batch_size)
        self.run_dir: Path | None = None
        self.seed_log = None  # the run folder's SeedLog while recording (folder.record)
        self.run_lock = None  # the run folder's RunLock while recording
        self.train_batches = None  # the training data's iterator, made on first use
        self.history: list[StepResult] = []
        self.evaluations: dict[str, dict] = {}
        self.eval_seconds = 0.0  # every evaluation's time: part of time to accuracy
        # --keep-best, --average-last: which weights the session holds, when not its last
        # step's
        self.selected: dict | None = None
        # the step a KeyboardInterrupt cut short, when there was no run folder to go back
        # from: its weights are between two steps, so nothing may train on or keep them
        self.torn_step: int | None = None

    # -- what the session is --------------------------------------------------------------
    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def emulated(self) -> bool:
        """A GPU profile run on the CPU (same plan and budget)."""
        return self.profile.device == "cuda" and not self.on_cuda

    @property
    def pair(self) -> bool:
        return self.engine.pair

    @property
    def dtype_name(self) -> str:
        return self.config.model.dtype

    @property
    def batch_size(self) -> int:
        return self.config.data.batch_size

    @property
    def eval_batch_size(self) -> int:
        return self.config.data.eval_batch_size

    @eval_batch_size.setter
    def eval_batch_size(self, value: int) -> None:
        self.config = self.config.override(eval_batch_size=value)

    @property
    def lr(self) -> float:
        """The peak learning rate; the schedule gives each step's (`schedule(step)`)."""
        return self.schedule.lr

    @lr.setter
    def lr(self, value: float) -> None:
        self.schedule = dataclasses.replace(self.schedule, lr=value)
        self.config = self.config.override(lr=value)

    @property
    def model(self) -> torch.nn.Module:
        """The model, with every completed step applied (flushes the deferred update)."""
        self.engine.flush()
        return self.module

    # -- training -------------------------------------------------------------------------
    def next_batch(self) -> dict:
        """The next training batch; data-parallel, this rank's share of it (the whole
        batch is encoded first, so every row is padded exactly as on one process)."""
        self._require_task()
        if self.train_batches is None:
            self.train_batches = batches(self.task.split("train"), self.batch_size,
                                    self.config.runtime.seed, start_step=self.engine.step_index)
        batch = self.encoder.encode(next(self.train_batches))
        if self.world > 1:
            batch = shard_batch(batch, self.process_rank, self.world)
        return self._to_device(batch)

    def step(self, batch: dict | None = None) -> StepResult:
        """One ZO step on the next training batch, or on the given dict of tensors. A
        KeyboardInterrupt during it leaves the session at the last completed step (see
        recover_torn_step)."""
        self.check_not_averaged("step")
        self.check_not_torn("step")
        if batch is None:
            batch = self.next_batch()
        else:
            check_batch(batch)
            guard.admit(self, batch, "train")
            batch = self._to_device(batch)
        try:
            with self.monitor.phase("train"):
                result = self.engine.step(batch, self.schedule(self.engine.step_index))
        except KeyboardInterrupt as stop:
            stop.recovered = self.recover_torn_step()
            raise
        except torch.cuda.OutOfMemoryError:
            self.engine.flush()  # the weights of the last completed step, all applied
            raise OutOfBudgetError(
                f"step {self.engine.step_index + 1} ran out of device memory under profile "
                f"{self.profile.name} ({human_bytes(self.profile.budget_bytes)}); the model "
                "holds every completed step. Lower --batch-size or use --two-pass") from None
        self.history.append(result)
        if self.seed_log is not None:
            self.seed_log.append(result.log_entry())
        guard.after_step(self)
        return result

    def recover_torn_step(self) -> bool:
        """A KeyboardInterrupt inside a step (or a flush of its update) leaves the blocks
        it had updated a step ahead of the rest: go back to the last completed step (the
        run folder's snapshot and seed log), or mark the weights torn, so that no step,
        snapshot or save uses them. True when the session is back at a completed step."""
        step = self.engine.step_index
        try:
            back = rewind(self, step)
        except (CheckpointError, OSError):
            back = False
        self.torn_step = None if back else step
        return back

    def check_not_torn(self, what: str) -> None:
        if self.torn_step is not None:
            raise CheckpointError(
                f"step {self.torn_step + 1} was interrupted half-way, so the weights are "
                f"between two steps and a {what} of them would match no run; with no run "
                "folder to go back to, start a new Session (record() a run folder to make "
                "interrupted steps recoverable)")

    def check_not_averaged(self, what: str) -> None:
        if self.selected is not None and self.selected["by"] == "average":
            raise ConfigError(f"the weights are the mean of the last steps' (average_last), "
                              f"which the seed log does not hold, so a {what} from them "
                              "could not be replayed: evaluate or save them, and resume the "
                              "run folder (its snapshot holds the last step) to train on")

    def average_last(self, steps: int) -> int:
        """Move the weights to the mean of those after each of the last `steps` steps (all
        of them in a shorter run), rebuilt from the seed log (ZOEngine.average_tail), and
        return how many were averaged: Polyak averaging, for weights that jitter around
        where a run has got to; off by default, as a mean over a window also trails a run
        still improving (BENCHMARKS.md, "Tail averaging from the seed log"). The
        session takes no step after this; a run folder's snapshot of the last step is
        what training goes on from."""
        if steps < 1:
            raise ConfigError("average_last needs at least one step")
        last = self.engine.step_index
        count = min(steps, last)
        if count == 0:  # nothing trained: the weights are their own mean
            return 0
        wanted = range(last - count, last)
        logged = (read_seed_log(self.run_dir) if self.run_dir is not None
                  else [r.log_entry() for r in self.history])
        entries = {e["step"]: e for e in logged if e["step"] in wanted}  # the latest of each
        self.engine.average_tail([entries[t] for t in wanted if t in entries])
        self.selected = {"by": "average", "steps": count, "last_step": last}
        return count

    # -- on-device personalisation ----------------------------------------------------------
    def learn(self, examples: Example | list[Example]) -> StepResult:
        """One ZO step on the app's own examples (no task files needed): what an app calls
        each time its user corrects or confirms a prediction."""
        examples = [examples] if isinstance(examples, Example) else list(examples)
        if not examples:
            raise ConfigError("learn() needs at least one Example")
        return self.step(self.encoder.encode(examples))

    @torch.no_grad()
    def generate(self, prompts: str | list[str] | list[dict] | list[list[dict]],
                 max_new_tokens: int = 16, streamer=None) -> list[str]:
        """The model's greedy answers, with every completed step applied. A prompt is a
        string, or a conversation ({"role", "content"} messages) that the model's chat
        template renders, the answer then ending at the end of the assistant's turn.
        `streamer`: a transformers streamer that hears each token (one prompt)."""
        self.engine.flush()
        self.engine.release_scratch()
        return reply(self.module, self.tokenizer, prompts, max_new_tokens, self.device,
                     streamer)

    def rank_step(self, prompts: str | list[str], rank: RankFn, candidates: int = 2,
                  max_new_tokens: int = 16, mu: float | None = None) -> RankResult:
        """One step from an ordering, not a loss (ZO-RankSGD; see edgezo.zo.ranking): each of
        `candidates` perturbed models θ + μ·z_k answers the prompts; `rank(outputs)`
        returns the candidates' indices best first (a group of tied indices may take one
        place; unlisted ones rank last; empty or None: no preference), and θ moves
        towards the preferred ones at the run's learning rate."""
        return ranked_step(self, prompts, rank, candidates, max_new_tokens, mu)

    @torch.no_grad()
    def predict(self, examples: Example | list[Example]) -> list[int]:
        """The index of the candidate the model now scores highest, per example."""
        examples = [examples] if isinstance(examples, Example) else list(examples)
        self.engine.flush()
        self.engine.release_scratch()
        out: list[int] = []
        for i in range(0, len(examples), self.eval_batch_size):
            batch = self.encoder.encode(examples[i:i + self.eval_batch_size])
            guard.admit(self, batch, "eval")
            out += candidate_scores(self.module, self._to_device(batch)).argmax(-1).tolist()
        return out

    # -- evaluation -----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, split: str = "test", max_examples: int | None = None,
                 progress: Callable[[int, int], None] | None = None) -> dict:
        """The task's score on a split, batched: accuracy by candidate log-likelihood, or
        for a generative task F1 and exact match of the answers the model writes.
        `result["score"]` is the task's metric (`result["metric"]` names it);
        `progress(done, total)` is called after each batch (examples)."""
        self._require_task()
        self.engine.flush()
        self.engine.release_scratch()
        release_freed_memory()  # the training phase's freed heap, before evaluation peaks
        start = time.perf_counter()
        examples = self.task.split(split)[:max_examples]
        with self.monitor.phase("eval"):
            result = self._scorer().score(examples, progress)
        return self._evaluated(split, result, start)

    def _scorer(self) -> scoring.Scorer:
        return scoring.Scorer(
            self.module, self.encoder, self.task, self.device, self.eval_batch_size,
            admit=lambda batch: guard.admit(self, batch, "eval"),
            admit_prompts=lambda prompts: guard.admit_generation(
                self, prompts, self.task.max_new_tokens))

    def _evaluated(self, split: str, result: dict, start: float) -> dict:
        release_freed_memory()  # eval batches differ in shape; return their freed heap
        elapsed = time.perf_counter() - start
        self.eval_seconds += elapsed
        result.update(split=split, of=len(self.task.split(split)), time_s=elapsed)
        self.evaluations[split] = result
        return result

    # -- run folders ------------------------------------------------------------------------
    def record(self, run_dir: str | os.PathLike) -> None:
        """Log every step to `run_dir` (run.json + seedlog.jsonl), so that it can be
        snapshotted, resumed and replayed."""
        runs.record(self, run_dir)

    def stop_recording(self) -> None:
        """Stop logging to the run folder (before it is removed: a run stopped before its
        first step); the session itself goes on."""
        if self.seed_log is not None:
            self.seed_log.close()
            self.seed_log = None
        if self.run_lock is not None:  # the folder is no longer this session's to write
            self.run_lock.release()
            self.run_lock = None
        self.run_dir = None

    def checkpoint(self, keep: int | None = None) -> Path:
        """Snapshot weights, optimizer state, masks and RNG into the run folder
        (atomically), keeping the newest `keep` snapshots (default: the run's --keep)."""
        self.check_not_averaged("snapshot")
        self.check_not_torn("snapshot")
        return runs.checkpoint(self, keep or self.config.train.keep or DEFAULT_KEEP)

    @classmethod
    def resume(cls, run_dir: str | os.PathLike, warn: Callable[[str], None] = print,
               **overrides) -> Session:
        """The session of a recorded run at its last logged step (see edgezo.run.resume);
        `overrides` may change the settings that do not alter the run's updates."""
        return resume_folder(cls, run_dir, warn, **overrides)

    @classmethod
    def replay_run(cls, run_dir: str | os.PathLike, **overrides) -> Session:
        """The base model with every step of a run's seed log re-applied
        (edgezo.run.resume.replay)."""
        return replay_folder(cls, run_dir, **overrides)

    # -- results ----------------------------------------------------------------------------
    def report(self) -> dict:
        """Everything a run knows about itself; `edgezo finetune` writes it as report.json."""
        return session_report(self)

    def save(self, directory: str | os.PathLike, format: str | None = None, *,
             gguf_type: str | None = None) -> Path:
        """Write the fine-tuned model where its runtime reads it.

        No `format`: a run folder (safetensors, or a peft adapter folder for the lora,
        prefix and prompt schemes; the tokenizer; report.json), which `edgezo export`
        reads. `format` gguf, onnx, merged or peft: that
        format only (edgezo.export.run.export_model), e.g. `save("out", "gguf")` for
        llama.cpp, in the base GGUF's own types unless `gguf_type` names one. Returns the
        folder, or the file written for gguf and onnx."""
        return save_session(self, Path(directory), format, gguf_type)

    def close(self) -> None:
        """Release what the session holds; its run folder's lock last (after the log's
        last line), so that a resume may take the folder over at once."""
        try:
            self.engine.close()
            self.monitor.close()
        finally:
            if self.seed_log is not None:
                self.seed_log.close()
                self.seed_log = None
            if self.run_lock is not None:
                self.run_lock.release()
                self.run_lock = None

    # -- helpers ----------------------------------------------------------------------------
    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()}

    def _require_task(self) -> None:
        if self.task is None:
            raise ConfigError("this Session has no task (task=None): pass batches to step(), "
                              "or create it with a task to use its data")
