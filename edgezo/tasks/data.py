"""Where task data comes from: a local folder first, the Hugging Face hub as a fallback.

Order: the explicit --data-dir / data_dir argument, then $EDGEZO_DATA_DIR, then a
`shared/data` folder beside or above the working directory (how the project's machines
stage it). Only if none holds the task's files is the hub tried (needs `datasets` and a
network); the error then says how to point edgezo at local files.
"""

from __future__ import annotations

import os
from pathlib import Path

from edgezo.errors import TaskError

ENV_VAR = "EDGEZO_DATA_DIR"


def candidate_dirs(data_dir: str | os.PathLike | None) -> list[Path]:
    if data_dir is not None:
        return [Path(data_dir)]
    dirs = []
    if os.environ.get(ENV_VAR):
        dirs.append(Path(os.environ[ENV_VAR]))
    here = Path.cwd().resolve()
    for parent in (here, *here.parents):
        dirs.append(parent / "shared" / "data")
    return dirs


def find_task_dir(task: str, files: list[str], data_dir: str | os.PathLike | None) -> Path | None:
    """The first candidate folder holding <task>/<file> for every file, or None."""
    for base in candidate_dirs(data_dir):
        if all((base / task / f).is_file() for f in files):
            return base / task
    if data_dir is not None:
        missing = [f for f in files if not (Path(data_dir) / task / f).is_file()]
        raise TaskError(
            f"--data-dir {data_dir} has no {task}/{missing[0]}; expected the files "
            f"{', '.join(f'{task}/{f}' for f in files)} under it"
        )
    return None


def load_from_hub(path: str, name: str | None, split: str) -> list[dict]:
    """Rows of a hub dataset split, for users who are online and have no local copy."""
    try:
        import datasets  # optional: pip install 'edgezo[hub]'
    except ImportError:
        raise TaskError(
            "no local copy of the task data was found and the `datasets` package is not "
            f"installed; pass --data-dir DIR (or set {ENV_VAR}) pointing at the staged data, "
            "or `pip install datasets` to download it from the Hugging Face hub"
        ) from None
    try:
        return list(datasets.load_dataset(path, name, split=split))
    except Exception as err:  # network, missing dataset, ...
        raise TaskError(
            f"could not load {path}/{name} ({split}) from the hub: {err}. Pass --data-dir DIR "
            f"(or set {ENV_VAR}) pointing at a local copy"
        ) from None
