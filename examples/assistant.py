"""Personalise an on-device assistant from a few short conversations, with forward passes
only, then ask it questions it was not trained on.

Two lessons, each one the model did not have:
- facts: the user tells the assistant about themselves (their dog, their city, their
  team); held out are paraphrases of the questions;
- style: the user wants every answer to open with "Ahoy!"; held out are other questions.

The app keeps each exchange as a conversation and calls `session.learn(...)` on a few of
them at a time (one ZO step, through the model's chat template, the loss on the
assistant's turns only). Before and after, it asks the held-out questions and scores the
answers two ways: the log-likelihood of the right answer (a smooth score that moves
before the greedy answer does), and whether the greedy answer is right.

    python examples/assistant.py [--lesson facts|style] [--steps 800] [--scheme full|lora]

Runs on a CPU with the embedded SmolLM2-135M-Instruct in minutes; the measured results
are in BENCHMARKS.md, "Generative tasks".
"""

from __future__ import annotations

import argparse
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from edgezo import Session
from edgezo.tasks.base import Example


@dataclass(frozen=True)
class Lesson:
    system: str
    train: list[tuple[str, str]]  # (question, the assistant's answer)
    held_out: list[tuple[str, str]]
    right: Callable[[str, str], bool]  # (reference answer, greedy answer) -> right?


def fact_lesson() -> Lesson:
    facts = {  # answer: (training questions, held-out questions)
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
    return Lesson("You are a personal assistant. Answer in a few words.",
                  [(q, f"{a}.") for a, (qs, _) in facts.items() for q in qs],
                  [(q, f"{a}.") for a, (_, qs) in facts.items() for q in qs],
                  lambda ref, text: ref.rstrip(".").lower() in text.lower())


def style_lesson() -> Lesson:
    train = [("What is the capital of France?", "Paris"),
             ("How many legs does a spider have?", "Eight"),
             ("What colour is the sky on a clear day?", "Blue"),
             ("Who wrote Hamlet?", "Shakespeare"), ("What is two plus three?", "Five"),
             ("What do bees make?", "Honey"),
             ("Which planet is closest to the sun?", "Mercury"),
             ("What is frozen water called?", "Ice"),
             ("How many days are in a week?", "Seven"), ("What animal says moo?", "A cow"),
             ("What is the largest ocean?", "The Pacific"),
             ("What language is spoken in Spain?", "Spanish")]
    held_out = [("What is the capital of Italy?", "Rome"),
                ("How many wheels does a bicycle have?", "Two"),
                ("What colour is grass?", "Green"),
                ("Who painted the Mona Lisa?", "Leonardo da Vinci"),
                ("What do cows drink?", "Water"), ("Which animal has a trunk?", "An elephant")]
    return Lesson("You are a helpful assistant. Answer in a few words.",
                  [(q, f"Ahoy! {a}.") for q, a in train],
                  [(q, f"Ahoy! {a}.") for q, a in held_out],
                  lambda ref, text: text.lstrip().lower().startswith("ahoy"))


LESSONS = {"facts": fact_lesson, "style": style_lesson}


def conversation(system: str, question: str, answer: str) -> Example:
    messages = (("system", system), ("user", question), ("assistant", answer))
    return Example("", (answer,), 0, references=(answer,), messages=messages)


@torch.no_grad()
def score(session: Session, lesson: Lesson, show: bool) -> tuple[float, int]:
    """Mean log-likelihood a token of the right answers to the held-out questions, and
    how many greedy answers are right."""
    pairs = lesson.held_out
    batch = session.encoder.encode([conversation(lesson.system, q, a) for q, a in pairs])
    session.engine.flush()
    loglik = -session.engine.loss(batch)
    answers = session.generate([[{"role": "system", "content": lesson.system},
                                 {"role": "user", "content": q}] for q, _ in pairs], 12)
    right = [lesson.right(ref, text) for (_, ref), text in zip(pairs, answers, strict=True)]
    if show:
        for (q, _), text, ok in zip(pairs, answers, right, strict=True):
            print(f"  {'+' if ok else '-'} {q} -> {text!r}")
    return loglik, sum(right)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lesson", default="facts", choices=sorted(LESSONS))
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--scheme", default="full", choices=["full", "lora"],
                    help="LoRA learns these lessons more slowly (see BENCHMARKS.md)")
    ap.add_argument("--lr", type=float, default=None,
                    help="default: 5e-5 for full, 1e-3 for LoRA (its rate on SST-2)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--schedule", default="cosine", choices=["constant", "linear", "cosine"])
    args = ap.parse_args()
    lesson = LESSONS[args.lesson]()
    train = [conversation(lesson.system, q, a) for q, a in lesson.train]
    lr = {"full": 5e-5, "lora": 1e-3}[args.scheme] if args.lr is None else args.lr
    session = Session(task=None, scheme=args.scheme, lr=lr, batch_size=args.batch,
                      max_length=128, seed=args.seed, schedule=args.schedule,
                      total_steps=args.steps if args.schedule != "constant" else None)
    n = len(lesson.held_out)
    try:
        print("before:")
        loglik, right = score(session, lesson, show=True)
        print(f"answer log-likelihood {loglik:.3f} a token (probability "
              f"{math.exp(loglik):.3f}), {right} of {n} held-out answers right")
        rng, start = random.Random(args.seed), time.monotonic()
        for step in range(1, args.steps + 1):
            result = session.learn(rng.sample(train, args.batch))
            if step % max(1, args.steps // 4) == 0 and step < args.steps:
                loglik, right = score(session, lesson, show=False)
                print(f"step {step}: loss {result.loss:.3f}, held-out answer "
                      f"log-likelihood {loglik:.3f}, {right} of {n} right")
        print(f"after {args.steps} steps ({(time.monotonic() - start) / 60:.1f} minutes, "
              "the scoring included):")
        loglik, right = score(session, lesson, show=True)
        print(f"answer log-likelihood {loglik:.3f} a token (probability "
              f"{math.exp(loglik):.3f}), {right} of {n} held-out answers right")
    finally:
        session.close()


if __name__ == "__main__":
    main()
