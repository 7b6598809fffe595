"""Errors a user can cause. Each message names what went wrong and how to fix it.

The CLI prints these as one clean message (no traceback); anything else is a bug.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class EdgezoError(Exception):
    """Base class: a problem with the user's input or environment, not with edgezo."""


class ProfileError(EdgezoError):
    """A device profile is missing, or its YAML is malformed."""


class ModelLoadError(EdgezoError):
    """A model path, hub id or GGUF file cannot be loaded."""


class TaskError(EdgezoError):
    """A task name is unknown or its data cannot be found or parsed."""


class ConfigError(EdgezoError):
    """An option has a value edgezo does not accept."""


class OutOfBudgetError(EdgezoError):
    """The planned peak memory exceeds the profile's budget."""


class TrainingError(EdgezoError):
    """A run cannot continue (e.g. the loss became NaN)."""


class CheckpointError(EdgezoError):
    """A run folder, snapshot or seed log is missing, damaged or does not match the run."""


class PathError(EdgezoError):
    """A folder edgezo must write into is a file, lies under a file, or is read-only."""


def check_writable_folder(path: str | os.PathLike, name: str, fix: str | None = None
                          ) -> None:
    """Raise PathError unless `path` is a folder edgezo can write into, or one it can
    create (nothing is created here). `name` says where the path came from (--output,
    EDGEZO_CACHE) and `fix` what to do instead, for the message.

    Why: the write itself comes late (a run's folder after its data and model load, a
    GGUF's conversion after seconds of parsing), and fails there as a bare
    FileExistsError, NotADirectoryError or OSError 30 deep in a traceback. Checked
    first, the same mistake costs a second and names the fix.
    """
    path = Path(path).expanduser()
    existing = _nearest_existing(path)
    fix = fix or f"give {name} a folder you can write to"
    if not os.path.isdir(existing):
        where = (f"{name} {path} is a file, not a folder" if existing == path else
                 f"{name} {path} lies under {existing}, which is a file, not a folder")
        raise PathError(f"{where}: {fix} (or move the file away)")
    if not os.access(existing, os.W_OK | os.X_OK):
        why = ("on a read-only filesystem" if _read_only_filesystem(existing)
               else "read-only for this user (its permissions)")
        where = (f"{name} {path} is {why}" if existing == path else
                 f"{name} {path} cannot be created: {existing} is {why}")
        raise PathError(f"{where}; nothing can be written there: {fix}")


def _nearest_existing(path: Path) -> Path:
    """`path` or the nearest of its parents that exists: the one a write would meet."""
    for p in (path, *path.parents):
        try:
            p.stat()
            return p
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError:  # there, in a parent this user may not look into
            return p.parent
    return Path(".")


def _read_only_filesystem(path: Path) -> bool:
    """Whether writes fail for the filesystem, not for this user: it is mounted read-only,
    or the user is root, whom permissions do not stop."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return True
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # no statvfs (Windows): say permissions
        return False


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C, after the run has said where it stopped and what was kept: the CLI exits
    130 without another word. A KeyboardInterrupt, so code that stops on Ctrl-C still
    does."""


def unknown_choice(kind: str, value: str, valid: list[str] | tuple[str, ...]) -> ConfigError:
    """The standard message for an option value outside its valid set."""
    plural = kind if kind.endswith("s") else kind[:-1] + "ies" if kind.endswith("y") \
        else kind + "s"
    return ConfigError(f"unknown {kind} {value!r}; valid {plural}: {', '.join(sorted(valid))}")


def read_user_text(path: Path, error: type[EdgezoError]) -> str:
    """The text of a file the user named, or `error` naming the file and the fix: a file
    that is missing or not UTF-8 is the user's to correct, not a traceback."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path} does not exist") from None
    except UnicodeDecodeError:
        raise error(f"{path}: not UTF-8 text; save it as UTF-8") from None


def read_yaml(path: Path, error: type[EdgezoError]) -> Any:
    """What a user's YAML file holds (None when it is empty), or `error` with the file
    and the parser's own words on where it broke."""
    import yaml

    text = read_user_text(path, error)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise error(f"{path}: not valid YAML ({err})") from None
