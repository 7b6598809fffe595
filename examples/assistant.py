"""Teach an on-device assistant about its user from a few short conversations, with
forward passes only, then ask it questions it was not trained on.

The user tells the assistant a few facts about themselves (their dog, their city, their
team). The app keeps each exchange as a conversation and calls `session.learn(...)` on
them (one ZO step each, through the model's chat template, the loss on the assistant's
turns only). Before and after, it asks held-out paraphrases of the questions and scores
the answers: the log-likelihood of the right answer (a smooth score that moves before the
greedy answer does) and whether the greedy answer contains it.

    python examples/assistant.py [--steps 800] [--lr 1e-3] [--scheme lora]

Runs on a CPU with the embedded SmolLM2-135M-Instruct in under 5 minutes. Measured on
the project's 2-core machine (2026-12-07, defaults: ZO-SGD LoRA, rate 1e-3 with a cosine
decay, 800 steps of 4 conversations): the held-out answers' log-likelihood rose from
-2.63 to -1.20 a token (probability 0.07 to 0.30), but no greedy answer named the fact
yet. A constant 1e-3 diverged after about 500 steps, 3e-3 within 120. BENCHMARKS.md,
"Generative tasks".
"""

from __future__ import annotations

import argparse
import math
import random

import torch

from edgezo import Session
from edgezo.tasks.base import Example

FACTS = {  # answer: (training questions, held-out questions)
    "Biscuit": (["What is my dog called?", "What's the name of my dog?",
                 "Do you remember my dog's name?", "My dog's name is what?"],
                ["What did I name my dog?", "Tell me my dog's name."]),
    "Lisbon": (["Which city do I live in?", "Where do I live?",
                "What city is my home?", "Do you know where I live?"],
               ["In which city is my home?", "Remind me where I live."]),
    "the Falcons": (["Which team do I support?", "What's my favourite team?",
                     "Who do I cheer for?", "What team am I a fan of?"],
                    ["Which team am I a supporter of?", "Tell me my favourite team."]),
}
SYSTEM = "You are a personal assistant. Answer in a few words."


def conversation(question: str, answer: str) -> Example:
    messages = (("system", SYSTEM), ("user", question), ("assistant", f"{answer}."))
    return Example("", (answer,), 0, references=(answer,), messages=messages)


def held_out() -> list[tuple[str, str]]:
    return [(q, answer) for answer, (_, tests) in FACTS.items() for q in tests]


@torch.no_grad()
def score(session: Session) -> tuple[float, float]:
    """Mean log-likelihood of the right answer's tokens after each held-out question, and
    the share of greedy answers that contain it."""
    pairs = held_out()
    batch = session.encoder.encode([conversation(q, a) for q, a in pairs])
    session.engine.flush()
    loss = session.engine.loss(batch)
    answers = session.generate([[{"role": "system", "content": SYSTEM},
                                 {"role": "user", "content": q}] for q, _ in pairs], 12)
    hits = sum(a.lower() in text.lower() for (_, a), text in zip(pairs, answers, strict=True))
    return -loss, hits / len(pairs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--scheme", default="lora", choices=["lora", "full"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--schedule", default="cosine", choices=["constant", "linear", "cosine"],
                    help="the rate's decay over the steps (a constant 1e-3 diverged after "
                         "about 500 steps)")
    args = ap.parse_args()
    train = [conversation(q, a) for a, (qs, _) in FACTS.items() for q in qs]
    session = Session(task=None, scheme=args.scheme, lr=args.lr, batch_size=args.batch,
                      max_length=128, seed=args.seed, schedule=args.schedule,
                      total_steps=args.steps if args.schedule != "constant" else None)
    try:
        before = score(session)
        print(f"before: answer log-likelihood {before[0]:.3f} (a token's probability "
              f"{math.exp(before[0]):.3f}), held-out answers right {before[1]:.2f}")
        rng = random.Random(args.seed)
        for step in range(1, args.steps + 1):
            r = session.learn(rng.sample(train, args.batch))
            if step % max(1, args.steps // 5) == 0:
                now = score(session)
                print(f"step {step}: loss {r.loss:.3f}, held-out answer log-likelihood "
                      f"{now[0]:.3f}, right {now[1]:.2f}")
        after = score(session)
        print(f"after {args.steps} steps: answer log-likelihood {after[0]:.3f} (a token's "
              f"probability {math.exp(after[0]):.3f}), held-out answers right {after[1]:.2f}")
    finally:
        session.close()


if __name__ == "__main__":
    main()
