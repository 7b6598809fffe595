from __future__ import annotations

import os

import pytest
import torch

from edgezo.models.tiny import save_tiny

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> str:
    """A tiny Llama (tied embeddings) with a word-level tokenizer, saved as an HF folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    save_tiny(folder, "llama")
    return str(folder)


@pytest.fixture(scope="session")
def data_dir() -> str:
    """The staged benchmark data (../shared/data or $EDGEZO_DATA_DIR)."""
    from edgezo.tasks.data import candidate_dirs

    for d in candidate_dirs(None):
        if (d / "sst2" / "dev.tsv").is_file():
            return str(d)
    pytest.fail("no staged data found: set EDGEZO_DATA_DIR to the shared data folder")


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
    from edgezo.config import EstimatorOptions
    from edgezo.tasks.loss import example_losses
    from edgezo.zo.engine import ZOEngine

    return ZOEngine(model, optimizer, EstimatorOptions(**estimator),
                    loss_fn=loss_fn or example_losses, seed=seed, pair=pair, blocks=blocks)
