"""Ctrl-C in a fine-tune: it lands between steps, and a run stopped by it says where it
stopped and how to go on (train.finetune's loop uses these)."""

from __future__ import annotations

import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console

from edgezo.run.session import Session


class CtrlC:
    """Lands a Ctrl-C between steps, where the weights are those of a completed step.

    A step updates the weights block by block as its forward visits them, so a
    KeyboardInterrupt raised inside it would leave some blocks a step ahead of the others
    (and a bf16 run a rounding apart): a snapshot of that would resume into another run.
    So a first SIGINT inside `held()` (a step, a flush, a snapshot, the step's rows) is
    noted, and `stop_if_asked()` raises it once the step's work is done; outside (an
    evaluation) it is raised at once. A second SIGINT inside raises at once, and `torn`
    then says the loop must go back to the last completed step.
    """

    def __init__(self) -> None:
        self.in_step = self.requested = self.torn = False
        self._previous = None

    def __enter__(self) -> CtrlC:
        # only the main thread may set handlers; a job started with SIGINT ignored
        # (nohup, a shell's background job) keeps it ignored
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) not in (signal.SIG_IGN, None):
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _on_sigint(self, signum, frame) -> None:
        if not self.in_step or self.requested:
            raise KeyboardInterrupt
        self.requested = True

    @contextmanager
    def held(self) -> Iterator[None]:
        """Around whatever moves the weights or records a step: a first Ctrl-C waits."""
        self.in_step = True
        try:
            yield
        except KeyboardInterrupt:
            self.torn = True
            raise
        finally:
            self.in_step = False

    def stop_if_asked(self) -> None:
        if self.requested:
            raise KeyboardInterrupt


def after_ctrl_c(session: Session, stop: KeyboardInterrupt, torn: bool, console: Console
                  ) -> KeyboardInterrupt:
    """A Ctrl-C that cut a step, a flush or a snapshot short (a second one, inside
    `CtrlC.held`) may leave the weights part-way through an update: go back to the last
    completed step (snapshot + seed log), or mark the session torn and save nothing."""
    if not torn:
        return stop
    back = getattr(stop, "recovered", None)  # Session.step went back, or tried, itself
    if back is None:
        back = session.recover_torn_step()
    if back:
        return stop
    stop.unsound = True  # the snapshot and seed log on disk hold every completed step
    console.print("The second Ctrl-C caught the weights part-way through an update, and "
                  "they could not be rebuilt here: nothing was saved over the run's last "
                  "snapshot.")
    return stop


def stopped_line(session: Session, output: Path | None) -> str:
    """Where a Ctrl-C stopped the run and how to go on, in one line."""
    t = session.config.train
    done = session.engine.step_index
    if output is None:
        return f"Stopped at step {done} of {t.steps} (Ctrl-C); no --output, so nothing was kept."
    return (f"Stopped at step {done} of {t.steps} (Ctrl-C); every completed step is in "
            f"{output}. Resume with: edgezo finetune --resume {output} --steps {t.steps}")


def interrupted_before_training(session: Session, created: Path | None, first: int,
                                 console: Console) -> None:
    """Ctrl-C before a step ran (in the evaluation before training): a folder this call
    created holds nothing to resume, so it goes, and the same command starts afresh."""
    if first:
        where = f"; resume with: edgezo finetune --resume {session.run_dir}" \
            if session.run_dir is not None else ""
        console.print(f"Stopped at step {first} (Ctrl-C) before training went on{where}")
        return
    if created is not None:
        session.stop_recording()
        shutil.rmtree(created, ignore_errors=True)
    console.print("Stopped before the first step (Ctrl-C); nothing was trained"
                  + (f", and {created} was removed" if created is not None else "")
                  + ". Run the same command to start again.")
