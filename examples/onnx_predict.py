"""Score a task's candidates with an `edgezo export --format onnx` folder and onnxruntime
alone: no torch and no edgezo at inference, only onnxruntime, numpy and `tokenizers`.

    edgezo export RUN --format onnx --output /tmp/onnx
    python examples/onnx_predict.py /tmp/onnx --task sst2 --data-dir ../shared/data
    python examples/onnx_predict.py /tmp/onnx --task mine.jsonl --max-examples 100

The rule is edgezo's own: each candidate's score is the mean log-probability of its
tokens after the prompt (what follows the longest common prefix of the tokenized prompt
and prompt + candidate), and the prediction is the best-scoring candidate. The graph
takes left-padded ids and a mask and works out the positions itself, so a row scores the
same in any batch.

Tasks: `sst2` (the GLUE dev set, edgezo's test split, with edgezo's default prompt for it:
"Review: <sentence>\nSentiment:" + " negative" / " positive") or a .jsonl file of rows
{"input": ..., "candidates": [...], "label": <index or candidate>}, edgezo's user-task
format.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer


def load(folder: str | Path) -> tuple[ort.InferenceSession, Tokenizer]:
    """The graph and the tokenizer an ONNX export folder holds."""
    folder = Path(folder)
    session = ort.InferenceSession(str(folder / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.no_padding()  # a saved tokenizer may keep the padding its trainer used;
    tokenizer.no_truncation()  # rows are padded here, all on the left, to one width
    return session, tokenizer


def read_task(task: str, data_dir: str | None = None, max_examples: int | None = None
              ) -> list[tuple[str, list[str], int]]:
    """(prompt, candidates, gold index) rows of the task's test set."""
    if task == "sst2":
        path = Path(data_dir or ".") / "sst2" / "dev.tsv"
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        out = [(f"Review: {r['sentence'].strip()}\nSentiment:", [" negative", " positive"],
                int(r["label"])) for r in rows]
    else:
        out = []
        for line in Path(task).read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                label = row["label"]
                gold = row["candidates"].index(label) if isinstance(label, str) else label
                out.append((row["input"], list(row["candidates"]), int(gold)))
    return out[:max_examples]


def _rows(tokenizer: Tokenizer, prompt: str, candidates: list[str]
          ) -> list[tuple[list[int], int]]:
    """Each candidate's (prompt + candidate ids, number of candidate tokens at the end)."""
    head = tokenizer.encode(prompt).ids
    rows = []
    for c in candidates:
        full = tokenizer.encode(prompt + c).ids
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


def predict(session: ort.InferenceSession, tokenizer: Tokenizer,
            examples: list[tuple[str, list[str], int]], batch_size: int = 8) -> list[int]:
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
    parser.add_argument("--task", default="sst2", help="sst2 or a .jsonl file")
    parser.add_argument("--data-dir", default=None, help="folder holding sst2/dev.tsv")
    parser.add_argument("--max-examples", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    session, tokenizer = load(args.folder)
    examples = read_task(args.task, args.data_dir, args.max_examples)
    started = time.perf_counter()
    hits = [p == gold for p, (_, _, gold) in
            zip(predict(session, tokenizer, examples, args.batch_size), examples, strict=True)]
    accuracy = sum(hits) / max(1, len(hits))
    print(f"accuracy {accuracy:.4f} on {len(hits)} examples of {args.task} "
          f"({time.perf_counter() - started:.1f} s, onnxruntime {ort.__version__})")
    return accuracy


if __name__ == "__main__":
    main(sys.argv[1:])
