"""Errors a user can cause. Each message names what went wrong and how to fix it.

The CLI prints these as one clean message (no traceback); anything else is a bug.
"""

from __future__ import annotations


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


def unknown_choice(kind: str, value: str, valid: list[str] | tuple[str, ...]) -> ConfigError:
    """The standard message for an option value outside its valid set."""
    plural = kind if kind.endswith("s") else kind[:-1] + "ies" if kind.endswith("y") \
        else kind + "s"
    return ConfigError(f"unknown {kind} {value!r}; valid {plural}: {', '.join(sorted(valid))}")
