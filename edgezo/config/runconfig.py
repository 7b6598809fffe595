"""One run's configuration: a tree of the option sections declared in
`edgezo.config.options`, read from keywords, recipe files or run.json and written back,
with the run's defaults filled in (`resolved`) and every rule checked (`validate`).

    cfg = RunConfig.from_flat(scheme="lora", lr=1e-3)     # keywords, as Session takes them
    cfg = RunConfig.from_file("recipes/sst2-lora.yaml")   # a recipe (YAML or JSON)
    cfg.validate()                                        # every problem at once

`None` in a field means "decided by the run": the profile's dtype, the method's ε, a
snapshot every 100 steps when there is a run folder. `resolved()` fills those in; what a
run records (run.json) is resolved, so that a resumed run is the same run.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from edgezo.config import rules
from edgezo.config.defaults import (
    DEFAULT_CHECKPOINT_EVERY,
    DEFAULT_KEEP,
    DEFAULT_SCALES_G_CLIP,
    default_lr,
    default_max_length,
    resolve_estimator,
)
from edgezo.config.options import (
    FIELDS,
    SECTION_OF,
    SECTIONS,
    DataOptions,
    EstimatorOptions,
    ModelOptions,
    OptimizerOptions,
    RuntimeOptions,
    SchemeOptions,
    StreamingOptions,
    TrainOptions,
)
from edgezo.config.values import coerce_value, field_problems, read_config_file, yaml_value
from edgezo.errors import ConfigError
from edgezo.models.catalog import DEFAULT_MODEL, SCHEMES
from edgezo.zo.methods import OPTIMIZERS, Method


@dataclass(frozen=True)
class RunConfig:
    """One run's options. Frozen, like its sections: a change is a new RunConfig
    (`override`), so the resolved config a run builds once and records in run.json is
    the one its engine, planner and training loop read."""

    model: ModelOptions = field(default_factory=ModelOptions)
    data: DataOptions = field(default_factory=DataOptions)
    scheme: SchemeOptions = field(default_factory=SchemeOptions)
    optimizer: OptimizerOptions = field(default_factory=OptimizerOptions)
    estimator: EstimatorOptions = field(default_factory=EstimatorOptions)
    streaming: StreamingOptions = field(default_factory=StreamingOptions)
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    train: TrainOptions = field(default_factory=TrainOptions)

    # -- building -----------------------------------------------------------------------
    @classmethod
    def from_flat(cls, **options: Any) -> RunConfig:
        """A config from flat option names (Session's keywords); unknown names are errors."""
        return cls().override(**options)

    @classmethod
    def from_dict(cls, data: dict, where: str = "the configuration") -> RunConfig:
        """From nested sections (`{"data": {"batch_size": 8}}`), flat names, or both."""
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping of options, got "
                              f"{type(data).__name__}")
        flat: dict[str, Any] = {}
        for key, value in data.items():
            # "model", "scheme" and "optimizer" name a section and an option: a mapping
            # is the section
            if key in SECTIONS and (isinstance(value, dict) or key not in SECTION_OF):
                if not isinstance(value, dict):
                    raise ConfigError(f"{where}: section '{key}' must be a mapping of "
                                      f"options, got {type(value).__name__}")
                unknown = [k for k in value if SECTION_OF.get(k) != key]
                if unknown:
                    raise ConfigError(f"{where}: section '{key}' has no option "
                                      f"{unknown[0]!r}; its options: "
                                      f"{', '.join(f.name for f in fields(SECTIONS[key]))}")
                flat.update(value)
            else:
                flat[key] = value
        try:
            return cls().override(**flat)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> RunConfig:
        """A recipe: YAML (.yaml/.yml) or JSON (run.json), nested or flat."""
        return cls.from_dict(read_config_file(Path(path)), str(path))

    def override(self, **options: Any) -> RunConfig:
        """A copy with the given flat options set (values coerced to the fields' types)."""
        changes: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
        for name, value in options.items():
            if name not in SECTION_OF:
                raise ConfigError(f"unknown option {name!r}; see `edgezo finetune "
                                  "--print-config` for every option")
            changes[SECTION_OF[name]][name] = coerce(name, value)
        return RunConfig(**{s: dataclasses.replace(getattr(self, s), **changes[s])
                            for s in SECTIONS})

    # -- reading --------------------------------------------------------------------------
    def get(self, name: str) -> Any:
        return getattr(getattr(self, SECTION_OF[name]), name)

    def flat(self) -> dict[str, Any]:
        """Every option by name (what report.json's hyperparameters hold)."""
        return {f: self.get(f) for f in SECTION_OF}

    def to_dict(self, used_only: bool = False) -> dict[str, dict[str, Any]]:
        """Nested sections of JSON values (tuples as lists). `used_only` (run.json, of a
        resolved config): without the options left at a default of None, which after
        resolved() are the ones the run did not use (momentum in zo-sgd), turned off
        (quantize, qat) or left to the machine (threads, streamed layers); reading the
        file back restores them."""
        out = json.loads(json.dumps({s: dataclasses.asdict(getattr(self, s))
                                     for s in SECTIONS}))
        if used_only:  # None stays where it is not the default (task None: no task)
            out = {s: {f.name: out[s][f.name] for f in fields(SECTIONS[s])
                       if out[s][f.name] is not None or f.default is not None}
                   for s in SECTIONS}
        return out

    def to_yaml(self, comments: bool = True) -> str:
        """The whole configuration as a recipe file, each option with its help."""
        lines = ["# edgezo run configuration (edgezo finetune --config FILE). Options left",
                 "# null are decided by the run (see each comment); any option given on",
                 "# the command line overrides this file.", ""] if comments else []
        for section in SECTIONS:
            lines.append(f"{section}:")
            for f in fields(SECTIONS[section]):
                if comments:
                    lines.append(f"  # {f.metadata['help']}")
                lines.append(f"  {f.name}: {yaml_value(self.get(f.name))}")
            lines.append("")
        return "\n".join(lines)

    # -- derived facts --------------------------------------------------------------------
    @property
    def method(self) -> Method:
        """The optimizer's Method: where its gradient comes from, and its traits."""
        return OPTIMIZERS[self.optimizer.optimizer]

    @property
    def zo_only(self) -> bool:
        """Every update is a ZO estimate: the run streams, replays from its seed log and
        runs data-parallel."""
        return self.method.perturbs and not self.estimator.fo_blocks

    @property
    def streams(self) -> bool | None:
        """True: layers must stream; False: they must not; None: as the plan needs."""
        s = self.streaming
        if s.offload == "off" or s.stream_layers == 0:
            return False
        if s.offload in ("host", "disk") or s.stream_layers:
            return True
        return None

    def resolved(self, dtype: str) -> RunConfig:
        """The run's defaults filled in (`dtype`: the one the run computes in, when the
        config leaves it open): what it records, so a resume is the same run."""
        dtype = self.model.dtype or dtype
        decided: dict[str, Any] = {
            "model": self.model.model or DEFAULT_MODEL,
            "dtype": dtype,
            "max_length": self.data.max_length or default_max_length(self.data.task),
            "lr": (default_lr(self.optimizer.optimizer, self.scheme.scheme)
                   if self.optimizer.lr is None else self.optimizer.lr)}
        estimator = resolve_estimator(self.estimator, self.optimizer.optimizer, dtype,
                                      self.scheme.scheme)
        decided |= {f.name: getattr(estimator, f.name) for f in fields(estimator)}
        if SCHEMES[self.scheme.scheme].quantized_scales and estimator.g_clip is None:
            decided["g_clip"] = DEFAULT_SCALES_G_CLIP
        decided |= {name: value for name, value in self.method.option_defaults().items()
                    if self.get(name) is None}  # the update rule's own options
        if self.optimizer.schedule != "constant" and self.optimizer.total_steps is None:
            decided["total_steps"] = self.train.steps
        t = self.train
        if t.output is not None:  # what goes into the run folder
            decided |= {
                "checkpoint_every": (DEFAULT_CHECKPOINT_EVERY if t.checkpoint_every is None
                                     else t.checkpoint_every),
                "keep": t.keep or DEFAULT_KEEP,
                "save_model": True if t.save_model is None else t.save_model}
        else:  # no run folder (validate() refused these given without one before)
            decided |= {"checkpoint_every": None, "keep": None, "save_model": None}
        return self.override(**decided)

    def validate(self) -> RunConfig:
        """Raise ConfigError naming every problem (each with its fix); returns self."""
        problems = [p for name in SECTION_OF
                    for p in field_problems(name, self.get(name), FIELDS[name].metadata)]
        if not problems:  # cross-option rules read valid single values
            problems = rules.rules(self)
        if len(problems) == 1:
            raise ConfigError(problems[0])
        if problems:
            raise ConfigError(f"{len(problems)} problems with the options:\n  - "
                              + "\n  - ".join(problems))
        return self


_HINTS: dict[str, Any] = {}


def coerce(name: str, value: Any) -> Any:
    """`value` as option `name`'s type (see config.values.coerce_value)."""
    if not _HINTS:
        for cls in SECTIONS.values():
            _HINTS.update(typing.get_type_hints(cls))
    return coerce_value(name, value, _HINTS[name])


