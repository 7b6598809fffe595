from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from edgezo.config.options import EstimatorOptions
from edgezo.config.rules import estimate_of
from edgezo.models.loading import compute_dtype
from edgezo.models.tiny import save_tiny
from edgezo.tasks.data import ENV_VAR
from edgezo.tasks.loss import example_losses
from edgezo.zo.engine import ZOEngine
from edgezo.zo.methods import Estimate

torch.set_num_threads(min(2, torch.get_num_threads()))
# Sessions keep that count (edgezo.device.threads takes OMP_NUM_THREADS as the user's choice), so
# the suite computes alike whatever else loads the machine; tests of the choice unset it.
os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    skips = {"cuda": None if torch.cuda.is_available() else "needs a CUDA GPU",
             "full_data": None if FULL_DATA else NO_FULL_DATA}
    for item in items:
        for marker, reason in skips.items():
            if reason and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> str:
    """A tiny Llama (tied embeddings) with a word-level tokenizer, saved as an HF folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    save_tiny(folder, "llama")
    return str(folder)


REPO = Path(__file__).resolve().parents[1]  # the repository
FIXTURE_DATA = REPO / "tests" / "fixtures" / "data"
# The full staged data, where the environment points at it (CI does). Taken out of the
# environment, so every other test reads the same files on every machine: the fixtures,
# or the SST-2 sample shipped with edgezo.
FULL_DATA = os.environ.pop(ENV_VAR, None)
NO_FULL_DATA = (f"needs the tasks' whole files: set {ENV_VAR} to the staged data folder "
                "(CI does)")


@pytest.fixture(scope="session")
def data_dir() -> str:
    """A few dozen real rows of each task, in each task's format (tests/fixtures/data)."""
    return str(FIXTURE_DATA)


@pytest.fixture(scope="session")
def full_data_dir() -> str:
    """The tasks' whole files; tests that use it are marked full_data."""
    if FULL_DATA is None:
        pytest.skip(NO_FULL_DATA)
    return FULL_DATA


def lm_batch(vocab: int, rows: int = 4, seq: int = 7, seed: int = 0) -> dict:
    """A left-padded classification batch of random tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    ids[0, :2] = 0
    return {"input_ids": ids, "attention_mask": mask,
            "candidate_ids": torch.randint(3, vocab, (rows, 2), generator=g),
            "gold": torch.arange(rows) % 2}


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def on_device_of(model, batch: dict) -> dict:
    """`batch` on the device the model computes on: a GPU profile's session runs on the GPU
    where one exists, and the test suite also runs there (scripts/gpu_checks.sh)."""
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}


def zo_engine(model, optimizer, *, seed: int = 0, pair: bool = True, loss_fn=None,
              blocks=None, **estimator):
    """A ZOEngine with the estimator options as keywords (eps, q, block_wise, ...) and the
    tasks' per-example loss unless another is given."""
    return ZOEngine(model, optimizer, estimate(model, optimizer.name, **estimator),
                    loss_fn=loss_fn or example_losses, seed=seed, pair=pair, blocks=blocks)


def estimate(model, optimizer: str, **options) -> Estimate:
    """The engine's settings from estimator options given as keywords, resolved and checked
    as a run's are."""
    return estimate_of(EstimatorOptions(**options), optimizer, compute_dtype(model))
