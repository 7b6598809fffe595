"""Device profiles: the memory budget and preferences of a target machine, as data.

A profile is a small YAML file (``profiles/*.yaml`` in the repository, installed as
``edgezo.profile_files``). Every field is checked on load and all problems are reported
at once, each naming the field and the file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from edgezo.errors import ProfileError, read_yaml

GiB = 1024**3
DTYPES = ("fp32", "bf16", "fp16")
DEVICES = ("cuda", "cpu")

# field -> (type(s), required, check, description of valid values)
_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "name": ((str,), True),
    "description": ((str,), False),
    "device": ((str,), True),
    "device_memory_gb": ((int, float), True),
    "host_memory_gb": ((int, float), True),
    "host_device_bandwidth_gbps": ((int, float), True),
    "dtype": ((str,), True),
    "headroom": ((int, float), True),
    "unified_memory": ((bool,), False),
    "device_tflops": ((int, float), False),
    "disk_bandwidth_gbps": ((int, float), False),
}


@dataclass(frozen=True)
class Profile:
    """The budget a run must fit in. Memory figures are GiB in the file, bytes here."""

    name: str
    device: str
    device_memory_bytes: int
    host_memory_bytes: int
    host_device_bandwidth_gbps: float
    dtype: str
    headroom: float
    description: str = ""
    unified_memory: bool = False
    source: str = ""
    device_tflops: float = 0.0  # dense throughput in the profile's dtype; 0: not known
    disk_bandwidth_gbps: float = 2.0  # read bandwidth of the disk tier (NVMe class)

    @property
    def budget_bytes(self) -> int:
        """Device memory a run may use: the card's memory less the headroom kept free."""
        return int(self.device_memory_bytes * (1.0 - self.headroom))


def _profile_dir() -> Path:
    return Path(str(resources.files("edgezo.profile_files")))


def list_profiles() -> list[str]:
    """Names of the profiles shipped with edgezo."""
    return sorted(p.stem for p in _profile_dir().glob("*.yaml"))


def profile_path(name_or_path: str) -> Path:
    """A shipped profile's file, or a user's own YAML file given by path."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml"):
        if not candidate.is_file():
            raise ProfileError(f"profile file {name_or_path} does not exist")
        return candidate
    shipped = _profile_dir() / f"{name_or_path}.yaml"
    if not shipped.is_file():
        raise ProfileError(
            f"unknown profile {name_or_path!r}; valid profiles: {', '.join(list_profiles())} "
            "(or pass the path of your own .yaml file)"
        )
    return shipped


def _validate(data: Any, where: str) -> list[str]:
    if not isinstance(data, dict):
        return [f"{where}: expected a mapping of fields, got {type(data).__name__}"]
    problems = []
    for field, (types, required) in _FIELDS.items():
        if field not in data:
            if required:
                problems.append(f"{where}: missing field '{field}'")
            continue
        value = data[field]
        # bool is an int in Python; a number field must not accept `true`.
        if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
            names = " or ".join(t.__name__ for t in types)
            problems.append(f"{where}: field '{field}' must be {names}, got {value!r}")
        elif isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{where}: field '{field}' must be a finite number, got {value}")
    for field in data:
        if field not in _FIELDS:
            problems.append(f"{where}: unknown field '{field}' (valid: {', '.join(_FIELDS)})")
    if problems:
        return problems
    if data["device"] not in DEVICES:
        problems.append(f"{where}: field 'device' must be one of {DEVICES}, got {data['device']!r}")
    if data["dtype"] not in DTYPES:
        problems.append(f"{where}: field 'dtype' must be one of {DTYPES}, got {data['dtype']!r}")
    for field in ("device_memory_gb", "host_memory_gb"):
        if data[field] <= 0:
            problems.append(f"{where}: field '{field}' must be > 0, got {data[field]}")
    if data["host_device_bandwidth_gbps"] < 0:
        problems.append(f"{where}: field 'host_device_bandwidth_gbps' must be >= 0")
    for field in ("device_tflops", "disk_bandwidth_gbps"):
        if field in data and data[field] < 0:
            problems.append(f"{where}: field '{field}' must be >= 0, got {data[field]}")
    if not 0 <= data["headroom"] < 1:
        problems.append(f"{where}: field 'headroom' must be in [0, 1), got {data['headroom']}")
    return problems


def load_profile(name_or_path: str) -> Profile:
    """Load and validate a profile by shipped name or by path to a YAML file."""
    path = profile_path(name_or_path)
    data = read_yaml(path, ProfileError)
    problems = _validate(data, str(path))
    if problems:
        raise ProfileError("invalid profile:\n  " + "\n  ".join(problems))
    return Profile(
        name=data["name"],
        description=data.get("description", ""),
        device=data["device"],
        device_memory_bytes=int(data["device_memory_gb"] * GiB),
        host_memory_bytes=int(data["host_memory_gb"] * GiB),
        host_device_bandwidth_gbps=float(data["host_device_bandwidth_gbps"]),
        dtype=data["dtype"],
        headroom=float(data["headroom"]),
        unified_memory=bool(data.get("unified_memory", False)),
        source=str(path),
        device_tflops=float(data.get("device_tflops", 0.0)),
        disk_bandwidth_gbps=float(data.get("disk_bandwidth_gbps", 2.0)),
    )


def human_bytes(n: float) -> str:
    """1.23 GiB / 45.6 MiB / 789 KiB: a size readable at any scale."""
    for unit, size in (("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"
