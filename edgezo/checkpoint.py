"""Run folders that survive interruption: the seed log, snapshots, resume and replay.

A run folder holds:

- ``run.json``: the Session's settings, written once when the run starts;
- ``seedlog.jsonl``: one line per step (step, lr, seeds, each group's projected
  gradients, cons's move), appended and fsynced every step. It is a few hundred bytes per
  step, and with the base model it is enough to redo every ZO update (`replay`);
- ``checkpoints/step-NNNNNNNN/``: snapshots of the trainable weights
  (``weights.safetensors``), the optimizer state, sparsity masks and torch's RNG state
  (``state.safetensors``), and ``meta.json`` with the step and each file's SHA-256. A
  snapshot is written into a temporary folder and renamed into place, so a crash or a
  full disk never leaves a half-written snapshot under a real name; the last K are kept.

Only JSON and safetensors are ever read back from a run folder (never pickle).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from edgezo.errors import CheckpointError

SNAPSHOTS = "checkpoints"
BEST = "best"  # the weights that scored best on validation (--keep-best), never pruned
SEED_LOG = "seedlog.jsonl"
RUN_FILE = "run.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SeedLog:
    """Append-only, one JSON line per step, on disk before the next step starts."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / SEED_LOG
        self._file = open(self.path, "a")  # noqa: SIM115 - closed in close()

    def append(self, entry: dict) -> None:
        self._file.write(json.dumps(entry) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def read_seed_log(run_dir: Path) -> list[dict]:
    """The readable logged steps in order (the last entry of each step). A damaged line
    (a last line cut short by a crash, or bytes lost in the middle) is skipped here: the
    reader that replays checks that the steps it needs are all present, so a damaged
    line that a later snapshot already covers does no harm."""
    path = Path(run_dir) / SEED_LOG
    if not path.is_file():
        return []
    entries = []
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("step"), int):
            entries.append(entry)
    # a resumed run re-logs nothing it replayed, but keep the last entry of each step
    by_step = {e["step"]: e for e in entries}
    return [by_step[k] for k in sorted(by_step)]


def save_snapshot(run_dir: Path, step: int, weights: dict[str, torch.Tensor],
                  state: dict[str, torch.Tensor], meta: dict, keep: int = 3) -> Path:
    """Write one snapshot atomically and drop all but the newest `keep`."""
    root = Path(run_dir) / SNAPSHOTS
    root.mkdir(parents=True, exist_ok=True)
    final = _write_atomically(root / f"step-{step:08d}", step, weights, state, meta)
    for old in snapshots(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_best(run_dir: Path, step: int, weights: dict[str, torch.Tensor],
              state: dict[str, torch.Tensor], meta: dict) -> Path:
    """Replace the run's best snapshot (a crash while writing keeps the previous one)."""
    return _write_atomically(Path(run_dir) / BEST, step, weights, state, meta)


def best_snapshot(run_dir: Path) -> Path | None:
    path = Path(run_dir) / BEST
    return path if (path / "meta.json").is_file() else None


def drop_best(run_dir: Path) -> None:
    """A run starting from step 0 has no best yet: one left in its folder is another's."""
    shutil.rmtree(Path(run_dir) / BEST, ignore_errors=True)


def _write_atomically(final: Path, step: int, weights: dict[str, torch.Tensor],
                      state: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write a snapshot folder beside `final`, then rename it into place: the folder at
    `final` is always a whole snapshot, the old one until the new one is complete."""
    root = final.parent
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        files = {"weights.safetensors": weights, "state.safetensors": state}
        sums = {}
        for name, tensors in files.items():
            path = tmp / name
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                      str(path))
            _fsync(path)
            sums[name] = _sha256(path)
        (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "sha256": sums},
                                                  indent=1))
        _fsync(tmp / "meta.json")
        old = root / f".old-{final.name}-{os.getpid()}"
        if final.exists():  # the same step snapshotted again (e.g. at the end), or a new best
            os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # the previous snapshots stay untouched
        raise
    return final


def snapshot_step(snapshot: Path) -> int:
    """The step a snapshot folder holds (step-00000100 -> 100)."""
    return int(snapshot.name.removeprefix("step-"))


def snapshots(run_dir: Path) -> list[Path]:
    """Complete snapshots (renamed into place), oldest first."""
    root = Path(run_dir) / SNAPSHOTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def verify(snapshot: Path) -> dict:
    """The snapshot's meta after checking every file's SHA-256; CheckpointError if not."""
    try:
        meta = json.loads((snapshot / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{snapshot}: meta.json unreadable ({err})") from None
    for name, digest in meta.get("sha256", {}).items():
        path = snapshot / name
        if not path.is_file() or _sha256(path) != digest:
            raise CheckpointError(f"{snapshot}: {name} is missing or does not match its "
                                  "checksum (truncated or corrupted)")
    return meta


def latest_valid(run_dir: Path, warn=print) -> tuple[Path, dict] | None:
    """The newest snapshot whose files check out, warning about each one skipped."""
    for snap in reversed(snapshots(run_dir)):
        try:
            return snap, verify(snap)
        except CheckpointError as err:
            warn(f"skipping a damaged snapshot: {err}; trying the previous one")
    return None


def load_snapshot(snapshot: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return (load_file(str(snapshot / "weights.safetensors")),
            load_file(str(snapshot / "state.safetensors")))


def write_run_file(run_dir: Path, settings: dict) -> None:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / RUN_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(settings, indent=1))
    os.replace(tmp, path)


def read_run_file(run_dir: Path) -> dict:
    path = Path(run_dir) / RUN_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{run_dir} is not a run folder ({RUN_FILE} is missing); pass "
                              "the --output folder of an edgezo finetune run") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is damaged ({err})") from None
