"""A Session's run folder: record, snapshot, resume, replay (the files are checkpoint.py's).

A recorded run is its configuration (run.json, resolved: the defaults it ran with), one
seed-log line per step, and periodic snapshots. Resume loads the newest intact snapshot
and replays the log after it; replay rebuilds the weights from the base model and the log
alone. Both are bit-identical to the uninterrupted run on the same kind of device.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from edgezo import __version__
from edgezo.checkpoint import (
    RUN_FILE,
    SeedLog,
    best_snapshot,
    latest_valid,
    load_snapshot,
    read_run_file,
    read_seed_log,
    save_best,
    save_snapshot,
    snapshot_step,
    snapshots,
    verify,
    write_run_file,
)
from edgezo.config import RESUMABLE, RunConfig
from edgezo.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from edgezo.session import Session


def record(session: Session, run_dir: str | os.PathLike) -> None:
    if session.custom_objective:
        raise ConfigError("a run with a custom objective function cannot be recorded for "
                          "resume (run.json cannot hold a function)")
    run_dir = Path(run_dir)
    if session.run_dir is None or session.run_dir.resolve() != run_dir.resolve():
        _refuse_another_run(session, run_dir)
    session.run_dir = run_dir
    if not (session.run_dir / RUN_FILE).is_file():
        write_run_file(session.run_dir, session.config.to_dict())
    if session._log is None:
        session._log = SeedLog(session.run_dir)


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
        same = _updates_of(_config_of(run_dir)) == _updates_of(session.config)
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


def checkpoint(session: Session, keep: int = 3) -> Path:
    if session.run_dir is None:
        raise ConfigError("call record(run_dir) before checkpoint()")
    step = session.engine.step_index
    done = snapshots(session.run_dir)
    if done and done[-1].name == f"step-{step:08d}":
        return done[-1]  # this step is already saved
    weights, state, meta = _snapshot_of(session)
    return save_snapshot(session.run_dir, step, weights, state, meta, keep)


def checkpoint_best(session: Session, validation_accuracy: float) -> Path:
    """Keep the weights now as the run's best on validation (OUTPUT/best, replaced by
    the next better score; the periodic snapshots may prune their step, this stays)."""
    if session.run_dir is None:
        raise ConfigError("call record(run_dir) before checkpoint_best()")
    weights, state, meta = _snapshot_of(session)
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


def _snapshot_of(session: Session) -> tuple[dict, dict, dict]:
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
    session.selected = None  # the snapshot's own step, neither a best nor an average


def _config_of(run_dir: Path) -> RunConfig:
    return RunConfig.from_dict(read_run_file(run_dir), str(Path(run_dir) / RUN_FILE))


def _replay_log(session: Session, entries: list[dict], upto: int | None = None) -> None:
    """Redo the logged steps from the session's step on (to `upto`, exclusive)."""
    start = session.engine.step_index
    todo = [e for e in entries if e["step"] >= start and (upto is None or e["step"] < upto)]
    steps = [e["step"] for e in todo]
    if steps != list(range(start, start + len(steps))):
        missing = sorted(set(range(start, max(steps, default=start) + 1)) - set(steps))
        raise CheckpointError(f"the seed log lacks step {missing[0]} (a damaged line?); "
                              "the run can continue only from a snapshot after it")
    for entry in todo:
        session.engine.replay(entry)
    if todo:
        session.engine.flush()


def resume(cls: type[Session], run_dir: str | os.PathLike,
           warn: Callable[[str], None] = print, **overrides) -> Session:
    """The newest intact snapshot, then the seed log's steps after it, replayed. A damaged
    log line that the snapshot already covers is skipped."""
    run_dir = Path(run_dir)
    config = _config_of(run_dir)
    refused = sorted(set(overrides) - RESUMABLE)
    if refused:
        raise ConfigError(f"resume keeps the run's settings; only {sorted(RESUMABLE)} may "
                          f"change, not {refused}")
    session = cls(config.override(**overrides))
    try:
        found = latest_valid(run_dir, warn)
        log = read_seed_log(run_dir)
        if found is not None:
            session_weights, state = load_snapshot(found[0])
            restore(session, session_weights, state, found[1])
        elif log and not session.engine.replayable:
            raise CheckpointError(f"{run_dir} has no intact snapshot, and "
                                  f"{session.optimizer.name} cannot be replayed from its seed "
                                  "log; start the run again")
        if session.engine.replayable:
            _replay_log(session, log)
        elif any(e["step"] >= session.engine.step_index for e in log):
            warn("the steps after the last snapshot use backpropagated gradients and cannot "
                 "be replayed; continuing from the snapshot")
        session.run_dir = run_dir  # its own folder: record() goes on with it
        session.record(run_dir)
    except BaseException:
        session.close()
        raise
    return session


def replay(cls: type[Session], run_dir: str | os.PathLike, **overrides) -> Session:
    """The run's weights rebuilt from run.json, the seed log and the base model alone (no
    data, no snapshot), bit-identical on the same kind of device."""
    # no data and no ranks: replay applies logged scalars on one process
    config = _config_of(Path(run_dir)).override(task=None, distributed=False, **overrides)
    session = cls(config)
    if not session.engine.replayable:
        session.close()
        raise CheckpointError(f"{config.optimizer.optimizer} steps use backpropagated "
                              "gradients, which a seed log does not hold")
    try:
        _replay_log(session, read_seed_log(Path(run_dir)))
    except BaseException:
        session.close()
        raise
    return session


def rewind(session: Session, step: int) -> bool:
    """Bring a recorded session back to the weights it had before `step` ran (the newest
    intact snapshot at or before it, then the log up to it); False when it cannot (no
    run folder, no such snapshot, or steps a seed log cannot redo). For a diverged run."""
    if session.run_dir is None:
        return False
    for snap in reversed(snapshots(session.run_dir)):
        if snapshot_step(snap) > step:
            continue
        try:
            meta = verify(snap)
        except CheckpointError:
            continue
        weights, state = load_snapshot(snap)
        restore(session, weights, state, meta)
        if session.engine.step_index < step:
            if not session.engine.replayable:
                return False
            _replay_log(session, read_seed_log(session.run_dir), upto=step)
        return session.engine.step_index == step
    return False
