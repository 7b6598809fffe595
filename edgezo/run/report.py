"""A session's report: everything a run knows about itself, which `edgezo finetune`
writes as report.json and `edgezo report` reads."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgezo.device.hardware import cpu_capability
from edgezo.models.catalog import DEFAULT_MODEL
from edgezo.version import __version__

if TYPE_CHECKING:
    from edgezo.run.session import Session


def session_report(session: Session) -> dict:
    """The report of `session` now: its settings as run, what it measured (step time,
    memory by phase, estimates) and its evaluations."""
    times = [r.time_s for r in session.history[1:]] or [r.time_s for r in session.history]
    cfg = session.config
    flat = cfg.flat()
    named = ("model", "task", "optimizer", "scheme", "profile", "seed")
    return {
        "edgezo_version": __version__,
        "model": cfg.model.model or DEFAULT_MODEL,
        "model_source": session.model_source.source,
        **{k: flat[k] for k in named[1:]},
        # the run's steps, a resumed run's earlier ones included, whichever step's
        # weights were kept (--keep-best, --average-last)
        "steps": session.selected["last_step"] if session.selected else session.engine.step_index,
        "selected": session.selected,
        "hyperparameters": {k: v for k, v in flat.items() if k not in named}
        | {"pair": session.pair, "objective": "custom" if session.custom_objective
           else cfg.estimator.objective},
        "device": str(session.device),
        "emulated_profile": session.emulated,
        "compute": {"dtype": cfg.model.dtype, "why": session.dtype_reason,
                    "cpu": cpu_capability(), "threads": session.threads.to_dict(),
                    "cuda_graphs": session.graphs,
                    "graph_replays": (session.engine.graphs.replays
                                      if session.engine.graphs is not None else 0)},
        "learning_rate": {"lr": cfg.optimizer.lr,
                          "why": session.lr_reason or "given (--lr, or the resumed run's)"},
        "forward_passes_per_step": session.engine.forward_passes_per_step,
        "backward_passes_per_step": 1 if session.engine.fo_indices else 0,
        "optimizer_state_bytes_per_param": session.optimizer.state_bytes_per_param,
        "step_time_s": sum(times) / len(times) if times else None,
        "skipped_steps": sum(r.skipped for r in session.history),
        "zero_estimate_steps": sum(r.all_zero for r in session.history),
        "zero_estimates": sum(r.zero_estimates for r in session.history),
        "clipped_estimates": sum(r.clipped for r in session.history),
        "queries": sum(len(r.projected_grads) for r in session.history),
        "eval_time_s": session.eval_seconds,
        "peak_memory_bytes": session.monitor.run_peak_bytes,
        "peak_memory_by_phase": dict(session.monitor.peaks),
        "reserved_peak_memory_by_phase": dict(session.monitor.reserved_peaks) or None,
        "predicted_peak_memory_bytes": session.plan.peak_bytes,
        "heap_trims": session.monitor.trims,  # CPU: the heap handed back above the plan
        "streaming": session.streamer.stats() if session.streamer else None,
        "plan": session.plan.to_dict(),
        "trainable_parameters": session.engine.blocks.numel(),
        "data_parallel": {"ranks": session.world,
                          "bytes_communicated": session.engine.bytes_communicated}
        if session.world > 1 else None,
        "evaluations": session.evaluations,
        # what the evaluations' scores (and a finetune's *_accuracy keys) measure
        "metric": session.task.metric if session.task is not None else None,
        "memory_samples": list(session.monitor.samples),
        "splits": session.task.split_info if session.task is not None else None,
    }
