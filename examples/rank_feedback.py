"""Learning from which answer the user preferred (ZO-RankSGD through edgezo.Session).

A notes app files each note into "work" or "home" and shows its answer. Nothing tells the
app a loss: its user only sees answers, and when the app offers several they pick the one
they like. Here a scripted user stands in for the person: shown the answers of each
candidate model on a few notes, they prefer the candidate that filed more notes the way
they would (ties: no preference). `Session.rank_step` turns each such choice into a ZO
step on one virtual prompt token (`--scheme prompt`: 576 values, which single orderings
move far sooner than LoRA's 460k). The preference rate (held-out notes the app files as
the user would) is measured before and during training.

    python examples/rank_feedback.py [--steps 40] [--candidates 4] [--mu 0.2] [--lr 5e-2]

Runs on a CPU with the embedded SmolLM2-135M-Instruct. Measured figures: BENCHMARKS.md,
"Rank feedback".
"""

from __future__ import annotations

import argparse
import random
import time

from personalize import HOME, WORK

from edgezo import Session

SHOTS = "Note: email the client\nFolder: work\nNote: buy apples\nFolder: home\n"
FOLDERS = ("work", "home")


def prompt(text: str) -> str:
    return f"{SHOTS}Note: {text}\nFolder:"


def filed(answer: str) -> str | None:
    """The folder an answer names, if it names one."""
    word = answer.strip().split("\n")[0].strip().lower()
    return word if word in FOLDERS else None


def scripted_user(notes: list[tuple[str, str]]):
    """A ranking function: candidates ordered by how many notes they filed as the user
    would, best first; equal counts share a place; all equal is no preference."""
    def rank(outputs: list[list[str]]):
        scores = [sum(filed(a) == folder for a, (_, folder) in zip(answers, notes,
                                                                     strict=True))
                  for answers in outputs]
        if len(set(scores)) == 1:
            return None
        places = sorted(set(scores), reverse=True)
        return [[k for k, s in enumerate(scores) if s == p] for p in places]
    return rank


def preference_rate(session: Session, notes: list[tuple[str, str]]) -> float:
    answers = session.generate([prompt(t) for t, _ in notes], max_new_tokens=1)
    return sum(filed(a) == f for a, (_, f) in zip(answers, notes, strict=True)) / len(notes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--candidates", type=int, default=4)
    ap.add_argument("--notes-per-step", type=int, default=8)
    ap.add_argument("--mu", type=float, default=0.2, help="perturbation scale (the "
                    "embeddings' values have a spread of 0.14)")
    ap.add_argument("--lr", type=float, default=5e-2, help="peak rate, decayed linearly")
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scheme", default="prompt", help="what trains: a few virtual "
                    "tokens (prompt) learn from single comparisons far sooner than LoRA")
    ap.add_argument("--prompt-tokens", type=int, default=1)
    ap.add_argument("--model", default=None)
    args = ap.parse_args()

    labelled = [(t, "work") for t in WORK] + [(t, "home") for t in HOME]
    rng = random.Random(args.seed)
    rng.shuffle(labelled)
    held_out, train = labelled[:12], labelled[12:]
    extra = {"prompt_tokens": args.prompt_tokens} if args.scheme == "prompt" else {}
    # the step's size does not shrink with the signal (an ordering has no magnitude), so
    # the rate decays linearly to 0 at the last step
    session = Session(model=args.model, task=None, scheme=args.scheme, lr=args.lr,
                      schedule="linear", total_steps=args.steps, seed=args.seed,
                      profile="cpu-16gb", **extra)
    start = time.perf_counter()
    print(f"preference rate before: {preference_rate(session, held_out):.3f} on "
          f"{len(held_out)} held-out notes, {preference_rate(session, train):.3f} on the "
          f"{len(train)} notes it will see")
    preferred = 0
    for step in range(1, args.steps + 1):
        notes = rng.sample(train, args.notes_per_step)
        r = session.rank_step([prompt(t) for t, _ in notes], scripted_user(notes),
                              candidates=args.candidates, max_new_tokens=1, mu=args.mu)
        preferred += r.order is not None
        if step % args.eval_every == 0 or step == args.steps:
            print(f"step {step}: preference rate {preference_rate(session, held_out):.3f} "
                  f"held out, {preference_rate(session, train):.3f} seen; {preferred} of "
                  f"{step} comparisons had a preference "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    session.close()


if __name__ == "__main__":
    main()
