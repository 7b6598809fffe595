"""Export a run in every format and type, and measure each export in the reader that runs
it: file size, time to export, and test accuracy through torch, transformers' GGUF reader
and onnxruntime, side by side, with the base model's and how many predictions each reader
shares with the trained torch model (the table in BENCHMARKS.md).

    python benchmarks/export_formats.py RUN --data-dir DATA --max-examples 200 \\
        --output /tmp/exports

Accuracy is edgezo's own (candidate log-likelihood, `tasks.loss.candidate_scores`) on the
first `--max-examples` examples of the run's task's test split, with every reader, so the
columns differ only by what the format changed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from edgezo.export.run import export_run, load_run
from edgezo.models.loading import load_model
from edgezo.tasks.base import Encoder
from edgezo.tasks.loss import candidate_scores
from edgezo.tasks.make import make_task

# (format, --gguf-type); None: the default (the base GGUF's own types, or f16)
EXPORTS = (("gguf", None), ("gguf", "q8_0"), ("gguf", "q4_0"), ("gguf", "bf16"),
           ("gguf", "f16"), ("onnx", None))


def predictions(model, tokenizer, examples: list, batch_size: int = 16) -> list[int]:
    """edgezo's prediction for each example by `model` (anything candidate_scores can
    call: a torch model, a GGUF read back, an onnxruntime session)."""
    encoder, out = Encoder(tokenizer), []
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = encoder.encode(examples[i:i + batch_size])
            out += candidate_scores(model, batch).argmax(-1).tolist()
    return out


def _row(fmt: str, kind: str, reader: str, predicted: list[int], examples: list,
         reference: list[int] | None) -> dict:
    """A table row: accuracy, and how many predictions are the trained torch model's."""
    row = {"format": fmt, "type": kind, "reader": reader,
           "accuracy": sum(p == e.gold for p, e in zip(predicted, examples, strict=True))
           / max(1, len(examples))}
    if reference is not None:
        row["same_as_torch"] = sum(a == b for a, b in zip(predicted, reference, strict=True))
    return row


def _reader(path: Path):
    """The export as its runtime's reader loads it."""
    if path.suffix == ".onnx":
        from edgezo.export.onnx import OnnxLogits

        return OnnxLogits(path)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                dtype=torch.float32).eval()


def _size(path: Path) -> int:
    extra = path.with_name(path.name + ".data")  # an ONNX graph's external weights
    return path.stat().st_size + (extra.stat().st_size if extra.exists() else 0)


def measure(run: Path, data_dir: str | None, max_examples: int, output: Path) -> list[dict]:
    """The base and the trained model in torch, then every export in its reader."""
    model, tokenizer, report = load_run(run)
    examples = make_task(report.get("task", "sst2"), data_dir).split("test")[:max_examples]
    trained = predictions(model.float(), tokenizer, examples)
    del model
    base = load_model(report.get("model"), torch.float32).model
    rows = [_row("torch", "fp32 (base, untrained)", "torch",
                 predictions(base, tokenizer, examples), examples, trained),
            _row("torch", "fp32", "torch", trained, examples, trained)]
    del base
    for fmt, kind in EXPORTS:
        started = time.perf_counter()
        path = export_run(run, fmt, output / f"{fmt}-{kind or 'default'}", gguf_type=kind)
        seconds = time.perf_counter() - started
        reader = _reader(path)
        label = "fp32" if fmt == "onnx" else kind or path.stem.removeprefix("model-")
        rows.append(_row(fmt, label, "onnxruntime" if fmt == "onnx" else "transformers-gguf",
                         predictions(reader, tokenizer, examples), examples, trained)
                    | {"file": str(path), "bytes": _size(path), "export_s": round(seconds, 1)})
        print(json.dumps(rows[-1]), file=sys.stderr)
        del reader
    return rows


def table(rows: list[dict], examples: int) -> str:
    lines = [f"| format | type | reader | size (MB) | export (s) | test accuracy "
             f"({examples} ex.) | predictions as torch's |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        size = f"{r['bytes'] / 1e6:.1f}" if "bytes" in r else "-"
        lines.append(f"| {r['format']} | {r['type']} | {r['reader']} | {size} | "
                     f"{r.get('export_s', '-')} | {100 * r['accuracy']:.1f} | "
                     f"{r['same_as_torch']}/{examples} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finetune --output folder")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--max-examples", type=int, default=200)
    parser.add_argument("--output", type=Path, default=Path("exports"))
    args = parser.parse_args(argv)
    rows = measure(args.run, args.data_dir, args.max_examples, args.output)
    (args.output / "exports.json").write_text(json.dumps(rows, indent=1))
    print(table(rows, args.max_examples))


if __name__ == "__main__":
    main()
