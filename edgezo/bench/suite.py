"""Suites are data: a YAML file names the runs, this module expands them.

A suite has `defaults` (Session settings shared by every run, plus `steps` and
`eval_examples`), a `search` grid (learning rate per optimizer, ε) tried in every cell and
selected on validation accuracy, `cells` (tasks x optimizers x schemes, the paper's
tables) and `studies` (a base cell with one setting varied: template, q, block-wise,
sparsity, hybrid ZO/FO); a cell or study may carry its own `search` (adapters want
larger learning rates than full fine-tuning). Each run is keyed by a hash of its complete
settings, so a suite that is re-run, resumed or sharded never runs the same thing twice.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from edgezo.errors import ConfigError, read_yaml

BENCH_KEYS = ("steps", "eval_examples")  # settings of the benchmark, not of the Session
SUITE_KEYS = ("name", "description", "defaults", "search", "cells", "studies")


@dataclass(frozen=True)
class Run:
    key: str
    group: str  # "cell" or the study's name
    cell: str  # what the grid search selects within: task/model/optimizer/scheme[/variant]
    settings: dict

    @property
    def session_kwargs(self) -> dict:
        return {k: v for k, v in self.settings.items() if k not in BENCH_KEYS}


@dataclass
class Suite:
    name: str
    description: str
    defaults: dict
    search: dict
    cells: list[dict]
    studies: list[dict]
    source: str = ""

    def runs(self) -> list[Run]:
        out: list[Run] = []
        for cell in self.cells:
            for task, optimizer, scheme in itertools.product(
                    cell["tasks"], cell["optimizers"], cell["schemes"]):
                base = {**self.defaults, **cell.get("settings", {}), "task": task,
                        "optimizer": optimizer, "scheme": scheme}
                out += self._grid("cell", base, "", cell.get("search"))
        for study in self.studies:
            (field, values), = study["vary"].items()
            for value in values:
                base = {**self.defaults, **study["base"], field: value}
                out += self._grid(study["name"], base, f"{field}={value}", study.get("search"))
        seen, unique = set(), []
        for r in out:  # a study's baseline can coincide with a cell's run
            if (r.key, r.group) not in seen:
                seen.add((r.key, r.group))
                unique.append(r)
        return unique

    def _grid(self, group: str, base: dict, variant: str, search: dict | None) -> list[Run]:
        """The runs of one cell: its own `search` (if any) overrides the suite's, key by
        key, and the learning rates are looked up per optimizer, then `default`."""
        search = {**self.search, **(search or {})}
        lrs = search.get("lr", {})
        lr_list = lrs.get(base["optimizer"], lrs.get("default", [base.get("lr", 1e-5)]))
        eps_list = search.get("eps", [base.get("eps", 1e-3)])
        if base["optimizer"].startswith("fo-"):
            eps_list = eps_list[:1]  # ε does not enter a first-order run
        cell = "/".join([base["task"], str(base.get("model") or "smollm2"),
                         base["optimizer"], base["scheme"], *([variant] if variant else [])])
        runs = []
        for lr, eps in itertools.product(lr_list, eps_list):
            settings = {**base, "lr": float(lr)}
            if not base["optimizer"].startswith("fo-"):
                settings["eps"] = float(eps)
            runs.append(Run(run_key(settings), group, cell, settings))
        return runs


def run_key(settings: dict) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _suite_dir() -> Path:
    return Path(str(resources.files("edgezo.bench") / "suites"))


def list_suites() -> list[str]:
    return sorted(p.stem for p in _suite_dir().glob("*.yaml"))


def load_suite(name_or_path: str) -> Suite:
    """A shipped suite by name, or a user's YAML file by path."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = _suite_dir() / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown suite {name_or_path!r}; shipped suites: "
                              f"{', '.join(list_suites())} (or pass your own .yaml file)")
    elif not path.is_file():
        raise ConfigError(f"suite file {path} does not exist")
    data = read_yaml(path, ConfigError)
    problems = []
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a suite is a mapping with keys {', '.join(SUITE_KEYS)}")
    for key in data:
        if key not in SUITE_KEYS:
            problems.append(f"unknown key '{key}' (valid: {', '.join(SUITE_KEYS)})")
    if "name" not in data:
        problems.append("missing 'name'")
    for i, cell in enumerate(data.get("cells") or []):
        for k in ("tasks", "optimizers", "schemes"):
            if not isinstance(cell.get(k), list) or not cell[k]:
                problems.append(f"cells[{i}]: '{k}' must be a non-empty list")
    for i, study in enumerate(data.get("studies") or []):
        if "name" not in study or "base" not in study:
            problems.append(f"studies[{i}]: needs 'name' and 'base'")
        vary = study.get("vary")
        if not isinstance(vary, dict) or len(vary) != 1 or not isinstance(
                next(iter(vary.values())), list):
            problems.append(f"studies[{i}]: 'vary' must map one setting to a list of values")
        elif not all(k in study.get("base", {}) for k in ("task", "optimizer", "scheme")):
            problems.append(f"studies[{i}]: 'base' must name task, optimizer and scheme")
    if problems:
        raise ConfigError(f"invalid suite {path}:\n  " + "\n  ".join(problems))
    return Suite(name=data["name"], description=data.get("description", ""),
                 defaults=data.get("defaults") or {}, search=data.get("search") or {},
                 cells=data.get("cells") or [], studies=data.get("studies") or [],
                 source=str(path))
