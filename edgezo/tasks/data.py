"""Where task data comes from, in this order: the explicit --data-dir (data_dir argument),
then $EDGEZO_DATA_DIR, then the sample shipped inside the package (the default task's,
see `embedded/`), then the Hugging Face hub (`pip install 'edgezo[hub]'` and a network).

The order is explicit on purpose: nothing is looked up by walking the folders around the
working directory, so a run reads the same data wherever it is started.
"""

from __future__ import annotations

import os
from pathlib import Path

from edgezo.errors import TaskError

ENV_VAR = "EDGEZO_DATA_DIR"
EMBEDDED_DIR = Path(__file__).parent / "embedded"


def candidate_dirs(data_dir: str | os.PathLike | None) -> list[Path]:
    """The folders to read task files from: the explicit one alone, else $EDGEZO_DATA_DIR."""
    if data_dir is not None:
        return [Path(data_dir)]
    env = os.environ.get(ENV_VAR)
    return [Path(env)] if env else []


def find_task_dir(task: str, files: list[str], data_dir: str | os.PathLike | None) -> Path | None:
    """The folder <base>/<task> holding every file, or None to look further (embedded
    sample, hub).

    --data-dir must hold the task: falling through to other data would train on
    something the user did not point at. $EDGEZO_DATA_DIR is a general setting, so a
    folder without the task is passed over, but one with a partial task folder is an
    error naming the missing file.
    """
    for base in candidate_dirs(data_dir):
        if data_dir is None and not (base / task).is_dir():
            return None
        missing = [f for f in files if not (base / task / f).is_file()]
        if not missing:
            return base / task
        where = f"--data-dir {base}" if data_dir is not None else f"${ENV_VAR}={base}"
        raise TaskError(f"{where} has no {task}/{missing[0]}; expected the files "
                        f"{', '.join(f'{task}/{f}' for f in files)} under it")
    return None


def embedded_dir(task: str) -> Path | None:
    """The task's sample shipped inside the package, or None when it has none."""
    folder = EMBEDDED_DIR / task
    return folder if folder.is_dir() else None


def load_from_hub(path: str, name: str | None, split: str, why: str = "") -> list[dict]:
    """Rows of a hub dataset split, for users who are online and have no local copy.
    `why`: why the local sources could not serve the request, for the error."""
    try:
        import datasets  # optional: pip install 'edgezo[hub]'
    except ImportError:
        raise TaskError(
            f"{why or 'no local copy of the task data was found'}, and the `datasets` "
            f"package is not installed; pass --data-dir DIR (or set {ENV_VAR}) pointing at "
            "the task's files, or `pip install 'edgezo[hub]'` to download them from the "
            "Hugging Face hub"
        ) from None
    try:
        return list(datasets.load_dataset(path, name, split=split))
    except Exception as err:  # network, missing dataset, ...
        raise TaskError(
            f"could not load {path}/{name} ({split}) from the hub: {err}. Pass --data-dir DIR "
            f"(or set {ENV_VAR}) pointing at a local copy"
        ) from None
