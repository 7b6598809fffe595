"""Score a task's candidates with an `edgezo export --format onnx` folder: the graph runs
on onnxruntime, numpy and `tokenizers` alone (no torch at inference), while edgezo reads
the task, so the rows and their prompt are exactly those `edgezo eval` scores.

    edgezo export RUN --format onnx --output /tmp/onnx
    python examples/onnx_predict.py /tmp/onnx                 # sst2, with the run's prompt
    python examples/onnx_predict.py /tmp/onnx --task mine.jsonl --eval-examples 100

Data is found as edgezo finds it: --data-dir, else $EDGEZO_DATA_DIR, else the SST-2
sample edgezo ships, else the hub (edgezo.tasks.data). A task is a built-in name (sst2,
copa, ...) or a .jsonl / .yaml file of your own; the test split is scored, as `edgezo
eval` does by default.

The prompt is the one the model was trained with: --template if given, else the
template the run resolved (edgezo.json, which `edgezo export` writes beside model.onnx
from the run's report.json), else the task's default (sst2: "movie"). Scored with
another prompt, a fine-tuned model can read as untrained.

The rule is edgezo's own: each candidate's score is the mean log-probability of its
tokens after the prompt (what follows the longest common prefix of the tokenized prompt
and prompt + candidate), and the prediction is the best-scoring candidate. The graph
takes left-padded ids and a mask and works out the positions itself, so a row scores the
same in any batch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from edgezo.tasks.make import make_task

META_FILE = "edgezo.json"  # edgezo.export.run.ONNX_META_FILE

# (prompt, or one prompt per candidate; candidates; gold index)
Row = tuple[str | tuple[str, ...], list[str], int]


def load(folder: str | Path) -> tuple[ort.InferenceSession, Tokenizer]:
    """The graph and the tokenizer an ONNX export folder holds."""
    folder = Path(folder)
    session = ort.InferenceSession(str(folder / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.no_padding()  # a saved tokenizer may keep the padding its trainer used;
    tokenizer.no_truncation()  # rows are padded here, all on the left, to one width
    return session, tokenizer


def _same_task(a: str | None, b: str) -> bool:
    if a == b:
        return True
    return a is not None and Path(a).is_file() and Path(b).is_file() and \
        Path(a).resolve() == Path(b).resolve()


def trained_template(folder: str | Path, task: str) -> str | None:
    """The template the exported model was trained with on `task` (its edgezo.json), or
    None: no metadata, or a model trained on another task."""
    try:
        meta = json.loads((Path(folder) / META_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(meta, dict) or not _same_task(meta.get("task"), task):
        return None
    return meta.get("template")


def read_task(task: str, data_dir: str | None = None, max_examples: int | None = None,
              template: str = "auto", split: str = "test") -> list[Row]:
    """(prompt, candidates, gold index) rows of the task's split, by edgezo's task code:
    the data found as edgezo finds it (data_dir None: $EDGEZO_DATA_DIR and the rest),
    with the given prompt template ("auto": the task's default). A row whose candidates
    each have their own prompt (WinoGrande) carries a tuple of prompts."""
    examples = make_task(task, data_dir=data_dir, template=template).split(split)
    return [(ex.prompt if ex.prompts is None else tuple(ex.prompts), list(ex.candidates),
             ex.gold) for ex in examples[:max_examples]]


def _rows(tokenizer: Tokenizer, prompt: str | tuple[str, ...], candidates: list[str]
          ) -> list[tuple[list[int], int]]:
    """Each candidate's (prompt + candidate ids, number of candidate tokens at the end)."""
    prompts = [prompt] * len(candidates) if isinstance(prompt, str) else list(prompt)
    rows = []
    for p, c in zip(prompts, candidates, strict=True):
        head = tokenizer.encode(p).ids
        full = tokenizer.encode(p + c).ids
        common = 0
        while common < min(len(head), len(full)) and head[common] == full[common]:
            common += 1
        rows.append((full, min(max(1, len(full) - common), len(full) - 1)))
    return rows


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def score_rows(session: ort.InferenceSession, rows: list[tuple[list[int], int]]
               ) -> np.ndarray:
    """Mean log-probability of each row's last `n` tokens, one graph call for all rows."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = np.zeros((len(rows), width), dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, (ids, _) in enumerate(rows):  # left padding, as edgezo encodes
        input_ids[i, width - len(ids):] = ids
        mask[i, width - len(ids):] = 1
    logits = session.run(["logits"], {"input_ids": input_ids, "attention_mask": mask})[0]
    scores = np.empty(len(rows))
    for i, (ids, n) in enumerate(rows):
        logp = _log_softmax(logits[i, width - n - 1:width - 1].astype(np.float64))
        scores[i] = logp[np.arange(n), ids[-n:]].mean()
    return scores


def predict(session: ort.InferenceSession, tokenizer: Tokenizer, examples: list[Row],
            batch_size: int = 8) -> list[int]:
    """The best-scoring candidate of each example."""
    out: list[int] = []
    for start in range(0, len(examples), batch_size):
        part = examples[start:start + batch_size]
        rows = [r for prompt, cands, _ in part for r in _rows(tokenizer, prompt, cands)]
        scores, at = score_rows(session, rows), 0
        for _, cands, _ in part:
            out.append(int(np.argmax(scores[at:at + len(cands)])))
            at += len(cands)
    return out


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="an `edgezo export --format onnx` output folder")
    parser.add_argument("--task", default="sst2", help="a task name (sst2, copa, ...) or a "
                        ".jsonl / .yaml file")
    parser.add_argument("--data-dir", default=None, help="the folder of the staged task "
                        "data (default: $EDGEZO_DATA_DIR, then where edgezo looks)")
    parser.add_argument("--template", default=None, help="the prompt template (default: "
                        "the one the run trained with, from edgezo.json; else the task's)")
    parser.add_argument("--eval-examples", "--max-examples", dest="max_examples", type=int,
                        default=None, help="score at most the first N test examples")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    session, tokenizer = load(args.folder)
    template, why = args.template, "--template"
    if template is None:
        template, why = trained_template(args.folder, args.task), "as the run trained, " \
            f"{META_FILE}"
    if template is None:
        template, why = "auto", "the task's default"
    examples = read_task(args.task, args.data_dir, args.max_examples, template)
    shown = make_task(args.task, data_dir=args.data_dir, template=template).template
    print(f"template {shown} ({why})")
    started = time.perf_counter()
    hits = [p == gold for p, (_, _, gold) in
            zip(predict(session, tokenizer, examples, args.batch_size), examples, strict=True)]
    accuracy = sum(hits) / max(1, len(hits))
    print(f"accuracy {accuracy:.4f} on {len(hits)} examples of {args.task} "
          f"({time.perf_counter() - started:.1f} s, onnxruntime {ort.__version__})")
    return accuracy


if __name__ == "__main__":
    from edgezo.errors import EdgezoError

    try:
        main(sys.argv[1:])
    except EdgezoError as err:  # no data found, an unknown task or template: one line
        sys.exit(f"error: {err}")
