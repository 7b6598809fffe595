"""A Session's run folder: record and snapshot (the files are snapshots.py's; going on
from one is resume.py's).

A recorded run is its configuration (run.json, resolved: the defaults it ran with), one
seed-log line per step, and periodic snapshots. Resume loads the newest intact snapshot
and replays the log after it; replay rebuilds the weights from the base model and the log
alone. Both are bit-identical to the uninterrupted run on the same kind of device.

One run at a time writes a folder: record() locks it (snapshots.RunLock) until the
Session closes. A log whose end was torn or lost never gives a silently shorter model:
replay refuses it, saying why, and resume repairs it (see `resume`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from edgezo.config.options import RESUMABLE
from edgezo.config.runconfig import RunConfig
from edgezo.errors import CheckpointError, ConfigError
from edgezo.models.catalog import DEFAULT_MODEL
from edgezo.run.snapshots import (
    RUN_FILE,
    RunLock,
    SeedLog,
    best_snapshot,
    load_snapshot,
    read_run_file,
    read_seed_log,
    save_best,
    save_snapshot,
    snapshots,
    verify,
    write_run_file,
)
from edgezo.version import __version__
from edgezo.zo.methods import STRUCTURED

if TYPE_CHECKING:
    from edgezo.run.session import Session


def config_of(run_dir: Path) -> RunConfig:
    config = RunConfig.from_dict(read_run_file(run_dir), str(Path(run_dir) / RUN_FILE))
    # run.json from before the default model was recorded by name holds null for it
    if not config.model.model:
        config = config.override(model=DEFAULT_MODEL)
    # and one from before structured products were exact has no structured_z: its z was
    # chunked, and a resume or replay must compute the same
    if config.get("directions") in STRUCTURED and config.get("structured_z") is None:
        config = config.override(structured_z="chunked")
    return config


def record(session: Session, run_dir: str | os.PathLike) -> None:
    """Log the session's steps into `run_dir` from now on (run.json once, then one
    seed-log line per step). The folder is locked first (RunLock: refused while another
    run, in this process or another, writes it), so that two runs never interleave their
    lines; the lock is the session's until Session.close. A session recording into
    another folder than before moves its log and its lock there."""
    if session.custom_objective:
        raise ConfigError("a run with a custom objective function cannot be recorded for "
                          "resume (run.json cannot hold a function)")
    run_dir = Path(run_dir)
    same = session.run_dir is not None and session.run_dir.resolve() == run_dir.resolve()
    lock = session.run_lock if same and session.run_lock is not None else RunLock(run_dir)
    try:
        if not same:
            _refuse_another_run(session, run_dir)
        if not (run_dir / RUN_FILE).is_file():
            write_run_file(run_dir, session.config.to_dict(used_only=True))
        log = session.seed_log if same and session.seed_log is not None else SeedLog(run_dir)
    except BaseException:
        if lock is not session.run_lock:
            lock.release()
        raise
    if session.seed_log is not None and log is not session.seed_log:
        session.seed_log.close()
    if session.run_lock is not None and lock is not session.run_lock:
        session.run_lock.release()
    session.run_dir, session.run_lock, session.seed_log = run_dir, lock, log


def _updates_of(config: RunConfig) -> dict:
    """The settings that decide a run's updates: all but the resumable ones and the
    folder's own path."""
    return {k: v for k, v in config.flat().items() if k not in RESUMABLE | {"output"}}


def _refuse_another_run(session: Session, run_dir: Path) -> None:
    """A session that starts recording into a folder holding another run would mix the
    two: run.json would keep the other's settings, the seed log would go on from the
    other's steps, and the test score before training would be the other's; resume and
    replay would then rebuild neither. Only the same settings with no step logged (a run
    stopped before its first step, started again) may record there."""
    if not (run_dir / RUN_FILE).is_file():
        return
    logged = len(read_seed_log(run_dir))
    try:
        same = _updates_of(config_of(run_dir)) == _updates_of(session.config)
    except (CheckpointError, ConfigError):  # a damaged run.json: another run's all the same
        same = False
    if same and logged == 0 and session.engine.step_index == 0:
        return
    what = f"{logged} logged step{'s' if logged != 1 else ''}"
    if not same:
        what += ", other settings"
    raise ConfigError(f"{run_dir} already holds a run ({what}): continue it with "
                      f"--resume {run_dir} (Session.resume), or give another --output "
                      "(or delete the folder)")


def _trainable_tensors(session: Session, fn: Callable) -> None:
    """fn(name, tensor it reads or writes) for every trainable parameter: a streamed
    layer's tensors while the streamer holds it, as their masters (fp32 where the tier
    keeps fp32), one layer at a time, then every resident one."""
    blocks = session.engine.blocks
    name_of = {id(p): n for n, p in zip(blocks.names, blocks.params, strict=True)}
    done: set[int] = set()
    streamer = session.streamer
    for layer in streamer.layers if streamer else []:
        with streamer.hold(layer.unit.module):
            for t in layer.tensors:
                if id(t.param) in name_of:
                    fn(name_of[id(t.param)], streamer.master_view(t.param), t.param)
                    done.add(id(t.param))
    for n, p in zip(blocks.names, blocks.params, strict=True):
        if id(p) not in done:
            fn(n, p.detach(), None)


def weights_finite(session: Session) -> bool:
    """Whether every trainable weight is finite (one pass over them)."""
    session.engine.flush()
    bad: list[str] = []

    def check(name: str, tensor: torch.Tensor, _param) -> None:
        if not bad and not bool(torch.isfinite(tensor).all()):
            bad.append(name)

    _trainable_tensors(session, check)
    return not bad


def checkpoint(session: Session, keep: int) -> Path:
    if session.run_dir is None:
        raise ConfigError("call record(run_dir) before checkpoint()")
    step = session.engine.step_index
    done = snapshots(session.run_dir)
    if done and done[-1].name == f"step-{step:08d}":
        return done[-1]  # this step is already saved
    weights, state, meta = snapshot_of(session)
    return save_snapshot(session.run_dir, step, weights, state, meta, keep)


def checkpoint_best(session: Session, validation_accuracy: float) -> Path:
    """Keep the weights now as the run's best on validation (OUTPUT/best, replaced by
    the next better score; the periodic snapshots may prune their step, this stays)."""
    if session.run_dir is None:
        raise ConfigError("call record(run_dir) before checkpoint_best()")
    weights, state, meta = snapshot_of(session)
    meta["validation_accuracy"] = validation_accuracy
    return save_best(session.run_dir, session.engine.step_index, weights, state, meta)


def best_of(run_dir: Path | None) -> dict | None:
    """The best snapshot's meta (step, validation_accuracy); None if none. Not hashed:
    restore_best verifies the files, once, when they are read."""
    snap = best_snapshot(run_dir) if run_dir is not None else None
    try:
        return json.loads((snap / "meta.json").read_text()) if snap is not None else None
    except (OSError, json.JSONDecodeError):
        return None


def restore_best(session: Session) -> dict:
    """Put the best snapshot's weights and optimizer state into the session."""
    snap = best_snapshot(session.run_dir)
    meta = verify(snap)
    weights, state = load_snapshot(snap)
    restore(session, weights, state, meta)
    return meta


def snapshot_of(session: Session) -> tuple[dict, dict, dict]:
    state = session.engine.state_tensors()  # flushes the pending update first
    state["torch_rng"] = torch.get_rng_state()
    weights: dict[str, torch.Tensor] = {}
    _trainable_tensors(session, lambda n, t, _: weights.__setitem__(n, t.cpu().clone()))
    masks = session.engine.masks
    meta = {"edgezo_version": __version__, "mask_epoch": masks.epoch if masks else None,
            "config": session.config.to_dict()}
    return weights, state, meta


def restore(session: Session, weights: dict, state: dict, meta: dict) -> None:
    """Put a snapshot's weights and optimizer state into the session."""
    blocks = session.engine.blocks
    missing = [n for n in blocks.names if n not in weights]
    wrong = [n for n, p in zip(blocks.names, blocks.params, strict=True)
             if n in weights and tuple(weights[n].shape) != tuple(p.shape)]
    if missing or wrong:
        name = (missing or wrong)[0]
        raise CheckpointError(f"the snapshot does not fit this model ({name} is "
                              f"{'missing' if missing else 'another shape'}): it belongs to "
                              "another model or scheme")
    session.engine.flush()

    def put(name: str, target: torch.Tensor, param) -> None:
        target.copy_(weights[name])
        if param is not None:
            session.streamer.mark_updated(param)  # re-rounds the compute copy

    with torch.no_grad():
        _trainable_tensors(session, put)
    session.engine.load_state_tensors(state, meta["step"], meta.get("mask_epoch"))
    torch.set_rng_state(state["torch_rng"])
    session.train_batches = None  # the next batch is the restored step's (a function of it)
    session.selected = None  # the snapshot's own step, neither a best nor an average


