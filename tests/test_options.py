"""No accepted-and-ignored options: every CLI option reaches the Session, and every
Session option changes what a run does."""

import inspect

import pytest
import torch
from edgezo.cli import main as cli
from typer.testing import CliRunner

from edgezo.session import Session

# A non-default value for every estimator/optimizer option, with the optimizer it needs.
CHANGES = [
    ({"q": 2}, "zo-sgd"),
    ({"estimate": "one-sided"}, "zo-sgd"),
    ({"directions": "rademacher"}, "zo-sgd"),
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
    ({"eps": 1e-2}, "zo-sgd"),
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
BASE = {"zo-sgd-mmt": {}, "zo-adam": {}, "zo-sgd": {},
        "lora": {"scheme": "lora"}, "prefix": {"scheme": "prefix"},
        "prompt": {"scheme": "prompt"}}


def trajectory(tiny_folder, data_dir, optimizer, **kwargs):
    if optimizer in ("lora", "prefix", "prompt"):
        optimizer, kwargs = "zo-sgd", {"scheme": optimizer} | kwargs
    options = dict(lr=0.02, batch_size=4, seed=0) | kwargs
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
    results, weights, report = trajectory(tiny_folder, data_dir, optimizer, **change)
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


def test_every_finetune_option_reaches_the_session(monkeypatch, tiny_folder):
    """The CLI passes each option's value through (no accepted-and-ignored flags)."""
    seen = {}

    class Recorder:
        def __init__(self, **kwargs):
            seen.update(kwargs)
            raise SystemExit(0)

    monkeypatch.setattr("edgezo.session.Session", Recorder)
    args = ["finetune", "--model", tiny_folder, "--optimizer", "zo-adam", "--q", "3",
            "--estimate", "one-sided", "--directions", "rademacher", "--block-wise",
            "--granularity", "half", "--sparsity", "0.25", "--sparsity-mask", "magnitude",
            "--sparsity-every", "7", "--fo-blocks", "head,-1", "--betas", "0.8,0.99",
            "--adam-eps", "1e-6", "--objective", "accuracy", "--schedule", "cosine",
            "--warmup-steps", "5", "--steps", "11", "--weight-decay", "0.1", "--two-pass",
            "--eps", "0.01", "--lr", "0.002", "--batch-size", "3", "--seed", "9",
            "--dtype", "fp32", "--task", "sst2", "--max-length", "64",
            "--eval-batch-size", "8", "--data-seed", "4", "--template", "empty",
            "--scheme", "lora", "--lora-r", "4", "--lora-alpha", "8",
            "--lora-targets", "q_proj,k_proj", "--quantize", "int8", "--offload", "disk",
            "--distributed", "--trust-remote-code",
            "--stream-layers", "1", "--offload-dir", "/tmp/x"]
    CliRunner().invoke(cli.app, args)
    expected = dict(optimizer="zo-adam", q=3, estimate="one-sided", directions="rademacher",
                    block_wise=True, granularity="half", sparsity=0.25,
                    sparsity_mask="magnitude", sparsity_every=7, fo_blocks=["head", "-1"],
                    betas=(0.8, 0.99), adam_eps=1e-6, objective="accuracy",
                    schedule="cosine", warmup_steps=5, total_steps=11, weight_decay=0.1,
                    pair=False, eps=0.01, lr=0.002, batch_size=3, seed=9, dtype="fp32",
                    max_length=64, eval_batch_size=8, data_seed=4, template="empty",
                    scheme="lora", lora_r=4, lora_alpha=8.0, lora_targets=["q_proj", "k_proj"],
                    quantize="int8", offload="disk", stream_layers=1, offload_dir="/tmp/x",
                    distributed=True, trust_remote_code=True)
    for key, value in expected.items():
        assert seen.get(key) == value, key
    CliRunner().invoke(cli.app, ["finetune", "--optimizer", "zo-sgd-mmt", "--momentum", "0.7",
                                 "--scheme", "prefix", "--prefix-tokens", "3"])
    assert seen["momentum"] == 0.7 and seen["prefix_tokens"] == 3
    CliRunner().invoke(cli.app, ["finetune", "--scheme", "prompt", "--prompt-tokens", "4"])
    assert seen["prompt_tokens"] == 4
    # and every Session keyword the CLI does not expose is an embedding-API-only one
    session_kwargs = set(inspect.signature(Session.__init__).parameters) - {"self"}
    api_only = {"check_budget"}
    assert session_kwargs - set(seen) <= api_only
