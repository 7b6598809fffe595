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
  full disk never leaves a half-written snapshot under a real name; the last K are kept;
- ``.lock``: while a run writes the folder, the pid of its process, locked with
  ``fcntl.flock`` (RunLock), so that two runs never write one folder at once.

A crash while a step's line is written leaves the log's last line torn (cut partway, no
newline). Readers skip it; SeedLog cuts it before it appends, so that a resumed run's next
line never lands on it (`torn_line` reports it, for replay's and resume's checks).

Only JSON and safetensors are ever read back from a run folder (never pickle).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import weakref
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from edgezo.errors import CheckpointError

SNAPSHOTS = "checkpoints"
BEST = "best"  # the weights that scored best on validation (--keep-best), never pruned
SEED_LOG = "seedlog.jsonl"
RUN_FILE = "run.json"
LOCK = ".lock"


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
    """Append-only, one JSON line per step, on disk before the next step starts. Opening
    it repairs a torn last line first (`repair_seed_log`), so that no line is ever
    appended onto a torn one."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / SEED_LOG
        repair_seed_log(run_dir)
        self._file = open(self.path, "a")  # noqa: SIM115 - closed in close()

    def append(self, entry: dict) -> None:
        self._file.write(json.dumps(entry) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def _entry(text: str) -> dict | None:
    """A log line's entry, or None when the line is not a whole one."""
    try:
        entry = json.loads(text)
    except json.JSONDecodeError:
        return None
    return entry if isinstance(entry, dict) and isinstance(entry.get("step"), int) else None


def _salvaged(line: str) -> dict | None:
    """The whole entry at the end of a damaged line, if there is one: a resume before
    SeedLog cut torn lines wrote its next line onto the torn one (no newline between)."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r'\{"step": ', line):
        try:
            entry, end = decoder.raw_decode(line, match.start())
        except json.JSONDecodeError:
            continue
        if end == len(line.rstrip()) and isinstance(entry, dict) \
                and isinstance(entry.get("step"), int):
            return entry
    return None


def read_seed_log(run_dir: Path) -> list[dict]:
    """The readable logged steps in order (the last entry of each step). A damaged line
    (a last line cut short by a crash, or bytes lost in the middle) is skipped here: the
    reader that replays checks that the steps it needs are all present, so a damaged
    line that a later snapshot already covers does no harm. A whole entry that ends a
    damaged line (one written onto a torn line) is kept."""
    path = Path(run_dir) / SEED_LOG
    if not path.is_file():
        return []
    entries = []
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        entry = _entry(line) or _salvaged(line)
        if entry is not None:
            entries.append(entry)
    # a resumed run re-logs nothing it replayed, but keep the last entry of each step
    by_step = {e["step"]: e for e in entries}
    return [by_step[k] for k in sorted(by_step)]


def _last_line(path: Path) -> tuple[int, bytes]:
    """Where the file's last line starts and its bytes after that (empty when the file
    ends with a newline), read backwards: a long log is never read whole for this."""
    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        tail, pos = b"", end
        while pos > 0:
            size = min(1 << 16, pos)
            pos -= size
            f.seek(pos)
            tail = f.read(size) + tail
            if b"\n" in tail:
                break
        start = tail.rfind(b"\n") + 1  # 0 when the whole file is one unfinished line
        return end - len(tail) + start, tail[start:]


def torn_line(run_dir: Path) -> bytes | None:
    """The seed log's last line when it is torn (a crash cut it while it was written: no
    newline, and not a whole entry); None when the log ends with a whole line or is
    empty or absent."""
    path = Path(run_dir) / SEED_LOG
    if not path.is_file():
        return None
    _, tail = _last_line(path)
    if not tail.strip() or _entry(tail.decode("utf-8", errors="replace")) is not None:
        return None
    return tail


def torn_step(torn: bytes) -> int | None:
    """The step a torn line was for, when its bytes got as far as saying so."""
    found = re.match(rb'\{"step": (\d+)[,}]', torn)
    return int(found.group(1)) if found else None


def repair_seed_log(run_dir: Path) -> bytes:
    """Make the seed log end with a whole line before anything is appended: a torn last
    line is cut (its bytes are returned; the step it was for is one the run redoes, or
    one a later snapshot holds), and a whole last entry that only lacks its newline gets
    it. Without this, the next line would be written onto the torn one, and both steps
    would be lost to replay."""
    path = Path(run_dir) / SEED_LOG
    if not path.is_file():
        return b""
    start, tail = _last_line(path)
    if not tail:
        return b""
    with open(path, "r+b") as f:
        if tail.strip() and _entry(tail.decode("utf-8", errors="replace")) is not None:
            f.seek(0, os.SEEK_END)
            f.write(b"\n")
            tail = b""
        else:
            f.truncate(start)
        f.flush()
        os.fsync(f.fileno())
    return tail


class RunLock:
    """A run folder's lock, held while a run writes it: two runs writing one folder would
    interleave their seed-log lines and metrics rows, and neither could then be resumed
    or replayed. `fcntl.flock` on RUN/.lock, which holds the holder's pid for the
    message: the OS drops the lock when the process dies however it dies (SIGKILL,
    power loss), so a lock file left behind is stale by construction and simply taken
    over. The lock is per open file, so a second RunLock on the same folder in the
    same process is refused too. Released by `release()` (Session.close), when it is collected,
    or at interpreter exit."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        while True:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                why = f"cannot lock {self.run_dir} for this run ({err}): give a writable folder"
                raise CheckpointError(why) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip()
                os.close(fd)
                raise CheckpointError(_in_use(self.run_dir, holder)) from None
            except OSError:  # a file system without locks (some network ones): run unlocked
                break
            # a holder that released between our open and flock has unlinked that file:
            # lock the one now at the path, or two runs would each hold "the" lock
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        # released by release(), when the lock is collected (a Session dropped without
        # close()), or at interpreter exit, whichever comes first
        self._release = weakref.finalize(self, _release_lock, fd, self.path, os.getpid())

    def release(self) -> None:
        """Drop the lock. Idempotent."""
        self._release()


def _release_lock(fd: int, path: Path, owner: int) -> None:
    """Unlink the lock file, then drop the lock (in that order: a run that opened the old
    file finds it gone and locks a new one). In a forked child, which shares the parent's
    lock, only the child's descriptor is closed."""
    if os.getpid() == owner:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    os.close(fd)


def _in_use(run_dir: Path, holder: str) -> str:
    """Why a run folder is refused: who holds it, and what to do."""
    if holder.isdigit() and int(holder) == os.getpid():
        return (f"{run_dir} is in use by another Session of this process (pid {holder}), "
                "which records into it: close that Session first, or record this one into "
                "another folder")
    who = f"another run (pid {holder})" if holder.isdigit() else "another run"
    if holder.isdigit():
        try:
            os.kill(int(holder), 0)
        except ProcessLookupError:
            who = (f"another run (pid {holder}, no longer running: a process it started "
                   "still holds the lock)")
        except PermissionError:
            pass
    stop = f"stop it (kill {holder})" if holder.isdigit() else "stop it"
    return (f"{run_dir} is in use by {who}, which is writing it: wait for it to end, or "
            f"{stop} and continue it with --resume {run_dir}; or give this run another "
            "--output")


def save_snapshot(run_dir: Path, step: int, weights: dict[str, torch.Tensor],
                  state: dict[str, torch.Tensor], meta: dict, keep: int) -> Path:
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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # the previous snapshots stay untouched
        raise
    old = root / f".old-{final.name}-{os.getpid()}"
    if final.exists():  # the same step snapshotted again (e.g. at the end), or a new best
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except BaseException:  # put the previous one back: `final` is never missing
        if old.exists() and not final.exists():
            os.rename(old, final)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
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
