"""On-device personalisation with edgezo.Session: an app feeds its user's examples one at a
time and a LoRA adapter learns them with forward passes only.

The user sorts their notes into two folders, "work" and "home". Each time they file a
note, the app calls `session.learn(example)` (one ZO step, no backward pass, memory of
inference); every few notes it checks `session.predict` on notes it has not learned from.
The adapter's run folder can be snapshotted and resumed after the app restarts.

    python examples/personalize.py [--epochs 5] [--lr 1e-3] [--run-dir /tmp/personal]

Runs on a CPU in about half a minute with the embedded SmolLM2-135M. Measured on the
project's 2-core CPU machine (2026-11-23), defaults: held-out accuracy 0.500 before,
0.688 after 120 notes; the training loss fell from 0.690 to 0.624 per epoch. The learning
rate was chosen by the training loss: 2e-3 diverged (0.69 to 3.2), 5e-4 and 2e-4 moved
too slowly to change a prediction in 5 epochs.
"""

from __future__ import annotations

import argparse
import random

from edgezo import Session
from edgezo.tasks.base import Example

WORK = ["send the quarterly report to Anna", "prepare slides for the client meeting",
        "review the pull request before the release", "book a room for the team retro",
        "answer the auditor's questions", "update the project budget spreadsheet",
        "schedule interviews for the new engineer", "fix the failing build on main",
        "draft the proposal for the partner", "renew the software licences",
        "submit expenses from the conference", "plan next sprint with the product lead",
        "call the supplier about the late shipment", "write minutes of the board meeting",
        "migrate the database to the new server", "check the contract clauses with legal",
        "onboard the intern on the codebase", "send the invoice to the customer",
        "prepare the demo for the investors", "reply to the recruiter from the agency"]
HOME = ["buy milk, eggs and bread", "call mum on Sunday", "water the tomatoes",
        "book the dentist for the kids", "fix the leaking kitchen tap",
        "pick up the dry cleaning", "plan the birthday party for Sam",
        "pay the electricity bill", "walk the dog before dinner", "bake a cake for grandma",
        "clean the garage this weekend", "renew the car insurance",
        "buy a present for the neighbours", "cook lasagne for the family",
        "take the bins out on Tuesday", "paint the bedroom wall",
        "order new curtains for the living room", "feed the cat while we are away",
        "read a bedtime story to the twins", "book a holiday cottage by the sea"]


def note(text: str, folder: int) -> Example:
    return Example(prompt=f"Note: {text}.\nFolder (work or home):",
                   candidates=(" work", " home"), gold=folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--run-dir", default=None, help="record the run here (resumable)")
    args = ap.parse_args()

    notes = [note(t, 0) for t in WORK] + [note(t, 1) for t in HOME]
    random.Random(0).shuffle(notes)
    learn, held_out = notes[:24], notes[24:]  # the app never learns from the held-out notes

    session = Session(task=None, scheme="lora", optimizer="zo-sgd", lr=args.lr, eps=1e-2,
                      batch_size=1, profile="cpu-16gb", seed=0)
    if args.run_dir:
        session.record(args.run_dir)

    def accuracy() -> float:
        predictions = session.predict(held_out)
        return sum(p == ex.gold for p, ex in zip(predictions, held_out, strict=True)) / len(
            held_out)

    print(f"held-out accuracy before: {accuracy():.3f} ({len(held_out)} notes)")
    for epoch in range(args.epochs):
        losses = [session.learn(ex).loss for ex in learn]  # one note at a time
        print(f"after {len(learn) * (epoch + 1)} notes: held-out accuracy {accuracy():.3f}, "
              f"mean loss {sum(losses) / len(losses):.3f}")
    if args.run_dir:
        print(f"snapshot: {session.checkpoint()} (Session.resume({args.run_dir!r}) continues)")
    session.close()


if __name__ == "__main__":
    main()
