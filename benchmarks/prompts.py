"""Zero-shot accuracy of candidate SST-2 prompts on the validation rows: how the default
template was chosen (BENCHMARKS.md, "SST-2's prompt, chosen on validation").

A ZO run climbs from where its prompt starts it, so the prompt is the cheapest lever on
time to accuracy: scoring one on 500 rows takes under a minute, a 1000-step run half an
hour. Selection reads validation only; `--split test` is for reporting the chosen one.

    python benchmarks/prompts.py [--prompts movie,natural] [--split validation] [--examples 500]
"""

from __future__ import annotations

import argparse
import time
import types

SENTIMENT = (" negative", " positive")
CHAT = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n")
QUESTION = "Is the sentiment of this movie review positive or negative?\n\n{s}"


def chat(user: str, system: bool = True) -> str:
    """SmolLM2-Instruct's chat format, up to the assistant's answer."""
    return (CHAT if system else "") + f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


# name -> (prompt with {s} for the sentence, the answers for labels 0 and 1)
PROMPTS: dict[str, tuple[str, tuple[str, str]]] = {
    "natural": ("Review: {s}\nSentiment:", SENTIMENT),
    "movie": ("Movie review: {s}\nThe sentiment of this review is", SENTIMENT),
    "movie-sentiment": ("Movie review: {s}\nSentiment:", SENTIMENT),
    "movie-quoted": ('Movie review: "{s}"\nSentiment:', SENTIMENT),
    "film": ("Film review: {s}\nSentiment:", SENTIMENT),
    "here-is": ("Here is a movie review: {s}\nThe sentiment of this review is", SENTIMENT),
    "here-is-sentiment": ("Here is a movie review: {s}\nSentiment:", SENTIMENT),
    "question": ("Review: {s}\nIs this review positive or negative?\nAnswer:", SENTIMENT),
    "good-bad": ("Review: {s}\nSentiment:", (" bad", " good")),
    "the-review-is": ("Review: {s}\nThe review is", SENTIMENT),
    "chat": (chat(QUESTION), ("negative", "positive")),
    "chat-capitalised": (chat(QUESTION), ("Negative", "Positive")),
    "chat-no-system": (chat(QUESTION, system=False), ("negative", "positive")),
    "chat-one-word": (chat("Review: {s}\nIs this review positive or negative? Answer with "
                           "one word."), ("Negative", "Positive")),
}


def main() -> None:
    from edgezo.device.hardware import cpu_capability
    from edgezo.run.session import Session
    from edgezo.tasks.base import Example

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", default=",".join(PROMPTS), help="comma-separated names")
    ap.add_argument("--split", default="validation", choices=["validation", "test"])
    ap.add_argument("--examples", type=int, default=None, help="cap (default: the split)")
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()
    names = args.prompts.split(",")
    unknown = [n for n in names if n not in PROMPTS]
    if unknown:
        ap.error(f"unknown prompts {unknown}; known: {', '.join(PROMPTS)}")
    print(f"CPU: {cpu_capability()}")
    sess = Session(task="sst2", data_dir=args.data_dir, eval_batch_size=32)
    try:
        for name in names:
            prompt, answers = PROMPTS[name]

            def example(task, row, prompt=prompt, answers=answers):
                return Example(prompt.format(s=row["sentence"].strip()), answers,
                               int(row["label"]))

            # the task's own prompt swapped for this one; its splits rebuilt from the rows
            sess.task.example = types.MethodType(example, sess.task)
            sess.task._splits = None
            start = time.perf_counter()
            result = sess.evaluate(args.split, args.examples)
            print(f"{name:18s} {args.split} {result['accuracy']:.3f} ({result['examples']} "
                  f"rows, {time.perf_counter() - start:.0f} s)", flush=True)
    finally:
        sess.close()


if __name__ == "__main__":
    main()
