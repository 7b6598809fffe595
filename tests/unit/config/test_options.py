"""No accepted-and-ignored options: every CLI option reaches the Session, and every
Session option changes what a run does."""


import pytest
import torch
from edgezo.cli import main as cli
from typer.testing import CliRunner

from edgezo.run.session import Session

# A non-default value for every estimator/optimizer option, with the optimizer it needs.
CHANGES = [
    ({"q": 2}, "zo-sgd"),
    ({"estimate": "one-sided"}, "zo-sgd"),
    ({"directions": "rademacher"}, "zo-sgd"),
    ({"directions": "lowrank"}, "zo-sgd"),
    ({"directions": "lowrank", "rank": 3}, "lowrank"),
    ({"directions": "lowrank", "basis_every": 1}, "lowrank"),
    ({"directions": "subspace"}, "zo-sgd"),
    ({"noise": "generator"}, "zo-sgd"),
    ({"optimizer": "fzoo"}, "zo-sgd"),
    ({"optimizer": "hizoo"}, "zo-sgd"),
    ({"hessian_smoothing": 0.5}, "hizoo"),
    ({"block_wise": True}, "zo-sgd"),
    ({"block_wise": True, "granularity": "half"}, "zo-sgd"),
    ({"sparsity": 0.5}, "zo-sgd"),
    ({"sparsity": 0.5, "sparsity_mask": "magnitude"}, "zo-sgd"),
    ({"sparsity": 0.5, "sparsity_every": 1}, "zo-sgd"),
    ({"fo_blocks": ["head"]}, "zo-sgd"),
    ({"momentum": 0.5}, "zo-sgd-mmt"),
    ({"betas": (0.5, 0.9)}, "zo-adam"),
    ({"adam_eps": 1e-3}, "zo-adam"),
    ({"objective": "accuracy"}, "zo-sgd"),
    ({"schedule": "linear", "total_steps": 3}, "zo-sgd"),
    ({"warmup_steps": 3}, "zo-sgd"),
    ({"weight_decay": 0.5}, "zo-sgd"),
    ({"eps": 3e-3}, "zo-sgd"),  # neither default (1e-3 in fp32, 1e-2 in half precision)
    ({"lr": 0.05}, "zo-sgd"),
    ({"seed": 1}, "zo-sgd"),
    ({"pair": False}, "zo-sgd"),
    ({"template": "empty"}, "zo-sgd"),
    ({"scheme": "lora"}, "zo-sgd"),
    ({"scheme": "prefix"}, "zo-sgd"),
    ({"scheme": "prompt"}, "zo-sgd"),
    ({"scheme": "head"}, "zo-sgd"),
    ({"lora_r": 2}, "lora"),
    ({"lora_alpha": 4.0}, "lora"),
    ({"lora_targets": ["q_proj"]}, "lora"),
    ({"prefix_tokens": 2}, "prefix"),
    ({"prompt_tokens": 3}, "prompt"),
]
# Baselines: each change differs from one of these in the option only.
BASE = {"zo-sgd-mmt": {}, "zo-adam": {}, "zo-sgd": {}, "hizoo": {},
        "lowrank": {"directions": "lowrank"},
        "lora": {"scheme": "lora"}, "prefix": {"scheme": "prefix"},
        "prompt": {"scheme": "prompt"}}


def trajectory(tiny_folder, data_dir, optimizer, **kwargs):
    if optimizer in ("lora", "prefix", "prompt"):
        optimizer, kwargs = "zo-sgd", {"scheme": optimizer} | kwargs
    if optimizer == "lowrank":
        optimizer, kwargs = "zo-sgd", {"directions": "lowrank"} | kwargs
    options = dict(lr=0.02, batch_size=4, seed=0) | kwargs
    optimizer = options.pop("optimizer", optimizer)
    sess = Session(model=tiny_folder, data_dir=data_dir, optimizer=optimizer, **options)
    try:
        results = [sess.step() for _ in range(3)]
        weights = [p.detach().clone() for p in sess.model.parameters()]
        return results, weights, sess.report()
    finally:
        sess.close()


@pytest.fixture(scope="module")
def baselines(tiny_folder, data_dir):
    return {name: trajectory(tiny_folder, data_dir, name) for name in BASE}


@pytest.mark.parametrize("change, optimizer", CHANGES, ids=lambda v: str(v))
def test_every_option_changes_the_run(tiny_folder, data_dir, baselines, change, optimizer):
    base_results, base_weights, _ = baselines[optimizer]
    options = dict(change)
    results, weights, report = trajectory(tiny_folder, data_dir,
                                          options.pop("optimizer", optimizer), **options)
    if change == {"pair": False}:  # same numbers, twice the forward passes
        assert [r.forward_passes for r in results] == [2, 2, 2]
        assert report["hyperparameters"]["pair"] is False
        return
    same_weights = all(torch.equal(a, b) for a, b in zip(weights, base_weights, strict=True))
    same_losses = [r.loss for r in results] == [r.loss for r in base_results]
    assert not (same_weights and same_losses)
    for key, value in change.items():
        recorded = report["hyperparameters"].get(key, report.get(key))
        if key == "betas":
            recorded = tuple(recorded)
        assert recorded == value, key


def test_accuracy_objective_is_minus_the_batch_accuracy(tiny_folder, data_dir):
    results, _, _ = trajectory(tiny_folder, data_dir, "zo-sgd", objective="accuracy")
    for r in results:
        assert -1.0 <= r.loss_plus <= 0.0 and -1.0 <= r.loss_minus <= 0.0
        assert r.loss_plus * 4 == round(r.loss_plus * 4)  # a count of hits over 4 examples


def test_the_schedule_sets_each_steps_lr(tiny_folder, data_dir):
    results, _, _ = trajectory(tiny_folder, data_dir, "zo-sgd", schedule="linear",
                               total_steps=4, warmup_steps=1)
    assert [r.lr for r in results] == pytest.approx([0.02, 0.02, 0.02 * 2 / 3])


def _other_value(name: str):
    """A value of option `name`'s type that differs from its default, as typed on the
    command line."""
    from edgezo.config.options import FIELDS
    from edgezo.config.runconfig import RunConfig

    meta, default = FIELDS[name].metadata, RunConfig().get(name)
    if meta["choices"]:
        return next(c for c in meta["choices"] if c != default)
    if name == "betas":
        return "0.5,0.6"
    if isinstance(default, list):
        return "a,b"
    hint = str(FIELDS[name].type)
    if "bool" in hint:
        return not bool(default)
    if "int" in hint:
        return (default or 0) + 3
    if "float" in hint:
        return 0.125
    return f"/tmp/{name}"


def test_the_cli_and_the_run_config_cannot_drift_apart(monkeypatch):
    """Every RunConfig option is a finetune flag, every flag is a RunConfig option (or one
    of the command's own few), and each value typed reaches the Session's config."""
    import typer.main
    from edgezo.cli.options import flag_of

    from edgezo.config.options import FIELDS
    from edgezo.config.runconfig import RunConfig, coerce

    command = typer.main.get_command(cli.app).commands["finetune"]
    names = {p.name for p in command.params}
    api_only = {n for n, f in FIELDS.items() if not f.metadata["cli"]}
    assert names - {"config", "print_config", "resume", "help"} == set(FIELDS) - api_only
    seen = {}

    class Recorder:
        def __init__(self, config):
            seen["config"] = config
            raise SystemExit(0)

    monkeypatch.setattr("edgezo.run.session.Session", Recorder)
    for name in sorted(set(FIELDS) - api_only):
        value = _other_value(name)
        flags = flag_of(name).split("/")
        args = [flags[0] if value is True else flags[1]] if isinstance(value, bool) \
            else [flags[0], str(value)]
        result = CliRunner().invoke(cli.app, ["finetune", *args])
        assert result.exit_code == 0, (name, result.output)
        assert seen["config"].get(name) == coerce(name, value), name
        assert seen["config"].get(name) != RunConfig().get(name), name
