"""Going on from a run folder: `resume` loads the newest intact snapshot and replays the
seed log after it, repairing a torn log end; `replay` rebuilds the weights from the base
model and the log alone; `rewind` goes back to an earlier step. Each is bit-identical to
the uninterrupted run on the same kind of device.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from edgezo.config.rules import resume_problem
from edgezo.errors import CheckpointError, ConfigError, EdgezoError
from edgezo.run.folder import best_of, config_of, restore, snapshot_of
from edgezo.run.snapshots import (
    RUN_FILE,
    SEED_LOG,
    SNAPSHOTS,
    RunLock,
    latest_valid,
    load_snapshot,
    read_seed_log,
    snapshot_step,
    snapshots,
    torn_line,
    torn_step,
    verify,
)

if TYPE_CHECKING:
    from edgezo.run.session import Session


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
    log line that the snapshot already covers is skipped.

    The folder is locked first, and the log's end is put right before anything is
    appended to it (a line written onto a torn one would lose both steps to replay):

    - a torn last line for a step no snapshot holds (a crash while it was written) is
      cut, and the run redoes that step as its next, logging it whole;
    - steps that the newest snapshot holds but the log lacks (its end torn or lost after
      the snapshot was written) are recomputed from the newest intact snapshot before
      them and the run's data, and written back only when the result is bit-identical
      to that snapshot (and the first recomputed line begins with the torn bytes). When
      that cannot be done, the run goes on from the snapshot all the same, with a
      warning that replay can no longer rebuild it (replay then refuses).

    Data-parallel: every rank resumes, rank 0 alone records (as in finetune), and a
    log's missing steps are not recomputed."""
    run_dir = Path(run_dir)
    config = config_of(run_dir)
    problem = resume_problem(overrides)
    if problem:
        raise ConfigError(problem)
    session = cls(config.override(**overrides))
    # run.json holds the dtype the run resolved, which the build reads as asked for
    session.dtype_reason = f"as the run started ({RUN_FILE})"
    try:
        if session.process_rank == 0:  # before anything is read: another run may be writing it
            session.run_lock = RunLock(run_dir)
        found = latest_valid(run_dir, warn)
        log = read_seed_log(run_dir)
        if found is not None:
            session_weights, state = load_snapshot(found[0])
            restore(session, session_weights, state, found[1])
        elif log and not session.engine.replayable:
            raise CheckpointError(f"{run_dir} has no intact snapshot, and "
                                  f"{session.optimizer.name} cannot be replayed from its seed "
                                  "log; start the run again")
        recovered: list[dict] = []
        if session.engine.replayable:
            _replay_log(session, log)
            if session.process_rank == 0:
                recovered = _mend_log(session, run_dir, log, found, warn)
        elif any(e["step"] >= session.engine.step_index for e in log):
            warn("the steps after the last snapshot use backpropagated gradients and cannot "
                 "be replayed; continuing from the snapshot")
        session.run_dir = run_dir  # its own folder: record() goes on with it
        if session.process_rank == 0:
            session.record(run_dir)  # cuts a torn last line (SeedLog)
            for entry in recovered:
                session.seed_log.append(entry)
    except BaseException:
        session.close()
        raise
    return session


def _steps(steps: range) -> str:
    return f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}-{steps[-1]}"


def _mend_log(session: Session, run_dir: Path, log: list[dict],
              found: tuple[Path, dict] | None, warn: Callable[[str], None]) -> list[dict]:
    """The entries to write back for the steps that the restored snapshot holds but the
    log lacks at its end (empty when none, or when they cannot be rebuilt: warned). The
    session ends as it was (the snapshot, its step)."""
    torn = torn_line(run_dir)
    end = log[-1]["step"] + 1 if log else 0
    at = session.engine.step_index
    if at <= end or found is None:  # the log reaches the snapshot's step
        if torn is not None:
            step = torn_step(torn)
            warn(f"the seed log's last line (step {end if step is None else step}) is torn: "
                 f"the run was cut off while it wrote it. Cut it; the run goes on from step "
                 f"{at}, redoing that step")
        return []
    missing = range(end, at)
    one = len(missing) == 1
    what, them = _steps(missing), "it" if one else "them"
    cause = "its last line is torn" if torn is not None else "its last lines are lost"
    entries, how = _recompute(session, run_dir, log, found, missing, torn)
    if entries is not None:
        warn(f"recomputed {what} from {how} and the run's data: the seed log lacked "
             f"{them} ({cause}), and the snapshot at step {at} holds {them}. The "
             "recomputed weights match that snapshot bit for bit, so "
             f"{'its line is' if one else 'their lines are'} written back, and the log "
             "can rebuild the run again")
        return entries
    warn(f"the seed log lacks {what} ({cause}), which the snapshot at step {at} holds; "
         f"{how}. The run goes on from that snapshot, but replay cannot rebuild it from "
         "its log any more")
    return []


def _recompute(session: Session, run_dir: Path, log: list[dict], found: tuple[Path, dict],
               missing: range, torn: bytes | None) -> tuple[list[dict] | None, str]:
    """The log entries of the `missing` steps, taken again from the newest intact snapshot
    at or before the first of them and the run's data, checked against the snapshot
    `found` (which the last of them reaches) and the torn line's bytes, and which
    snapshot they came from; or None and why not. Either way the session is left at
    `found` again."""
    if session.world > 1:
        return None, "a data-parallel run does not recompute steps"
    if session.task is None:
        return None, "the run has no task data to recompute from"
    base = _intact_at_or_before(run_dir, missing[0])
    if base is None:
        return None, f"no intact snapshot at or before step {missing[0]} to recompute from"
    entries: list[dict] = []
    try:
        restore(session, *load_snapshot(base[0]), base[1])
        _replay_log(session, log, upto=missing[0])
        session.train_batches = None  # the data from this step on
        for t in missing:
            entries.append(session.engine.step(session.next_batch(),
                                               session.schedule(t)).log_entry())
        weights, state, _ = snapshot_of(session)
    except EdgezoError as err:
        return None, f"recomputing failed ({err})"
    finally:
        restore(session, *load_snapshot(found[0]), found[1])
        session.train_batches = None
    want_weights, want_state = load_snapshot(found[0])
    state.pop("torch_rng", None)
    want_state.pop("torch_rng", None)
    if not (_equal(weights, want_weights) and _equal(state, want_state)):
        return None, "the recomputed weights differ from the snapshot's"
    if torn is not None:
        step = torn_step(torn)
        at = missing[0] if step is None else step
        line = json.dumps(entries[at - missing[0]]).encode() if at in missing else b""
        if not line.startswith(torn):
            return None, "the recomputed line differs from the torn line's bytes"
    return entries, f"the snapshot at step {base[1]['step']}"


def _intact_at_or_before(run_dir: Path, step: int) -> tuple[Path, dict] | None:
    """The newest snapshot at or before `step` whose files check out, and its meta."""
    for snap in reversed(snapshots(run_dir)):
        if snapshot_step(snap) > step:
            continue
        try:
            return snap, verify(snap)
        except CheckpointError:
            continue
    return None


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def furthest_step(run_dir: Path) -> tuple[int, str]:
    """How many steps the run's own files show it took, and which file shows it: its
    snapshots (a name is given only to a whole one, so a later damaged one still counts),
    its best snapshot, its report and its metrics rows. (0, "") when none; a seed-log
    export has none of them."""
    run_dir = Path(run_dir)
    shown: list[tuple[int, str]] = []
    for snap in snapshots(run_dir):
        with contextlib.suppress(ValueError):
            shown.append((snapshot_step(snap), f"its snapshot {SNAPSHOTS}/{snap.name}"))
    best = best_of(run_dir)
    if best is not None and isinstance(best.get("step"), int):
        shown.append((best["step"], "its best snapshot"))
    with contextlib.suppress(OSError, ValueError, AttributeError):
        steps = json.loads((run_dir / "report.json").read_text()).get("steps")
        if isinstance(steps, int):  # a lower bound: older reports counted a resume's own
            shown.append((steps, "its report.json"))
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text(errors="replace").splitlines():
            try:
                step = json.loads(line).get("step")
            except (json.JSONDecodeError, AttributeError):
                continue
            if isinstance(step, int):
                shown.append((step, "its metrics.jsonl"))
    furthest = (0, "")
    for step, where in shown:  # the first to show the furthest step: a snapshot's name
        if step > furthest[0]:
            furthest = (step, where)
    return furthest


def check_log_is_whole(run_dir: Path, log: list[dict]) -> None:
    """Refuse (CheckpointError, saying why and what to do) a seed log that cannot rebuild
    every step the run took, so that replay never gives a silently shorter model:

    - its last line torn (cut short while written): the run took that step, which the
      log cannot redo. Even when no snapshot shows the run went further (a crash while
      it wrote the line), since a seed log copied with its end cut off looks the same;
      a run folder is repaired by resume, a shipped log is exported again;
    - its whole lines end before the step that the run's snapshots, report or metrics
      show it got to (a torn or lost end): resume recomputes those steps from the
      snapshot before them.

    Steps missing in the middle of the log are _replay_log's to refuse."""
    run_dir = Path(run_dir)
    path = run_dir / SEED_LOG
    end = log[-1]["step"] + 1 if log else 0
    torn = torn_line(run_dir)
    reached, where = furthest_step(run_dir)
    if torn is None and reached <= end:
        return

    def resume(does: str) -> str:
        return (f"Resume the run first (edgezo finetune --resume {run_dir}, or "
                f"Session.resume): it {does}, and writes the log whole; then replay it")

    if torn is not None:
        step = torn_step(torn)
        said = (f"{path}'s last line (step {end if step is None else step}) is torn (cut "
                "short while it was written)")
    else:
        said = (f"{path} holds {f'steps 0-{end - 1}' if end else 'no whole step'} (its "
                "last lines are lost)")
    if reached > end:
        raise CheckpointError(
            f"{said}, but the run got to step {reached} ({where}): replay would rebuild a "
            "shorter model than the run's. " + resume(
                "recomputes the steps the log lacks from the snapshot before them and the "
                "run's data"))
    if snapshots(run_dir) or (run_dir / "metrics.jsonl").is_file():
        raise CheckpointError(
            f"{said}: the run was cut off while it wrote it (a crash), and the log cannot "
            "redo that step, so replay would rebuild a shorter model than the run took. "
            + resume("cuts the torn line and redoes the step"))
    raise CheckpointError(
        f"{said}: the log cannot redo that step (was it copied or sent only partway?), so "
        "replay would rebuild a shorter model than the run's. Export the seed log again "
        "from the run folder (edgezo export RUN --format seedlog --output DIR) and replay "
        "that")


def replay(cls: type[Session], run_dir: str | os.PathLike, **overrides) -> Session:
    """The run's weights rebuilt from run.json, the seed log and the base model alone (no
    data, no snapshot), bit-identical on the same kind of device. Every step the run
    took, or a CheckpointError saying why not (check_log_is_whole): a log whose end is
    torn or lost is refused, not replayed short, and resume is what repairs it. Refused
    rather than finished from a snapshot: what replay shows is that the log (what
    `export --format seedlog` ships) rebuilds the run, and a snapshot's weights would
    hide that it no longer does; the snapshot's weights stay where they are, for
    resume."""
    run_dir = Path(run_dir)
    # no data and no ranks: replay applies logged scalars on one process
    config = config_of(run_dir).override(task=None, distributed=False, **overrides)
    session = cls(config)
    if not session.engine.replayable:
        session.close()
        raise CheckpointError(f"{config.optimizer.optimizer} steps use backpropagated "
                              "gradients, which a seed log does not hold")
    try:
        log = read_seed_log(run_dir)
        check_log_is_whole(run_dir, log)
        _replay_log(session, log)
    except BaseException:
        session.close()
        raise
    return session


def rewind(session: Session, step: int) -> bool:
    """Bring a recorded session back to the weights it had before `step` ran (the newest
    intact snapshot at or before it, then the log up to it); False when it cannot (no
    run folder, no such snapshot, or steps a seed log cannot redo). For a diverged run,
    and a step a Ctrl-C cut short."""
    found = None if session.run_dir is None else _intact_at_or_before(session.run_dir, step)
    if found is None:
        return False
    restore(session, *load_snapshot(found[0]), found[1])
    if session.engine.step_index < step:
        if not session.engine.replayable:
            return False
        _replay_log(session, read_seed_log(session.run_dir), upto=step)
    return session.engine.step_index == step
