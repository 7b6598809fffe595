"""`--format onnx`: the trained model as an fp32 ONNX graph, for onnxruntime and the
runtimes that read ONNX.

Exported with `torch.onnx.export` (the dynamo exporter, which needs `onnxscript`).
The graph takes `input_ids` and `attention_mask` (int64, batch x sequence, both dynamic,
left padding allowed) and returns `logits` (batch x sequence x vocabulary). It computes
the position ids from the mask itself (real tokens count from 0, whatever the padding),
as edgezo's own scoring does, so a caller passes ids and mask only and needs no torch.

Attention is exported in its eager form whatever the model was loaded with: a kernel
such as flash-attention or flex attention has no ONNX translation, while eager attention
is plain MatMul and Softmax, which every runtime runs. Logits at pad positions are
undefined (a pad attends to nothing); edgezo reads none of them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from edgezo.errors import ConfigError
from edgezo.export.weights import plain_model

ONNX_FILE = "model.onnx"
SINGLE_FILE_BYTES = 1 << 30  # larger graphs keep their weights in model.onnx.data


class LogitsGraph(nn.Module):
    """What the ONNX graph computes: logits from ids and a (left-padded) mask."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=positions, use_cache=False).logits


def require_exporter() -> None:
    """ConfigError naming the extra to install unless onnx and onnxscript import."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise ConfigError("ONNX export needs onnx and onnxscript: pip install "
                          "'edgezo[export]' (or pip install onnx onnxscript onnxruntime)"
                          ) from None


def _example_inputs(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a left-padded row, so the trace keeps the padding path
    return ids, mask


@contextlib.contextmanager
def _quiet():
    """Silence the exporter's progress lines and notes (unused axis names, torchvision
    ops it skips); its errors still raise."""
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


def write_onnx(model: nn.Module, path: str | Path) -> Path:
    """Write the trained model (LoRA merged, fp32) as an ONNX graph at `path`."""
    require_exporter()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plain = plain_model(model, torch.float32, "cpu")  # traced on the CPU, whatever trained
    plain.set_attn_implementation("eager")
    graph = LogitsGraph(plain).eval()
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    dims = {0: batch, 1: seq}
    size = sum(p.numel() * 4 for p in plain.parameters())
    with _quiet():
        torch.onnx.export(graph, _example_inputs(plain.config.vocab_size), str(path),
                          input_names=["input_ids", "attention_mask"],
                          output_names=["logits"],
                          dynamic_shapes={"input_ids": dims, "attention_mask": dims},
                          dynamo=True, verbose=False, optimize=True,
                          external_data=size > SINGLE_FILE_BYTES)
    return path


class OnnxLogits:
    """An onnxruntime session that edgezo's scoring (`tasks.loss.candidate_scores`) can
    call like a model, so the accuracy of an ONNX export is measured by the very code that
    measures the torch model's."""

    def __init__(self, path: str | Path):
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 logits_to_keep: int = 0, **_ignored):
        feed = {"input_ids": input_ids.cpu().numpy().astype("int64"),
                "attention_mask": attention_mask.cpu().numpy().astype("int64")}
        logits = torch.from_numpy(self.session.run(["logits"], feed)[0])
        return _Output(logits[:, -logits_to_keep:] if logits_to_keep else logits)


class _Output:
    def __init__(self, logits: torch.Tensor):
        self.logits = logits
