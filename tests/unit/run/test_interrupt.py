"""Ctrl-C lands between steps: a run stopped anywhere inside a step, then resumed, ends
with the weights of the run that was never stopped, bit for bit, in fp32 and bf16; the
CLI exits 130 with one line saying where it stopped."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from edgezo.run import train
from edgezo.run.session import Session
from edgezo.run.snapshots import read_seed_log, snapshots

STEPS = 6
STOP_AT = 3  # the step (0-based) a Ctrl-C arrives in; snapshots after steps 2 and 4


@pytest.fixture(autouse=True)
def sigint_raises():
    """A shell's background job starts with SIGINT ignored: give the test the handler a
    terminal's Ctrl-C meets."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def session(tiny_folder, data_dir, dtype):
    return Session(tiny_folder, profile="cpu-16gb", batch_size=2, lr=0.02, eps=1e-2,
                   max_length=48, data_dir=data_dir, check_budget=False, dtype=dtype,
                   seed=3, eval_before=False)


def finetune(s, out, steps=STEPS):
    try:
        return train.finetune(s, steps, output=str(out), console=Console(quiet=True),
                              save_model=False, checkpoint_every=2)
    finally:
        s.close()


def last_weights(run):
    return load_file(str(snapshots(run)[-1] / "weights.safetensors"))


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def ctrl_c_in_a_forward(s, act):
    """`act()` inside the forward of the second decoder layer, in step STOP_AT's first
    forward: some blocks have had their deferred update, the rest not yet."""
    layer = s.engine.model.model.layers[1]

    def hook(*_):
        if s.engine.step_index == STOP_AT and not fired:
            fired.append(1)
            act()

    fired: list[int] = []
    layer.register_forward_hook(hook)


def ctrl_c_between_block_updates(s, act):
    """`act()` after the first block's deferred update of step STOP_AT, before the next."""
    perturbation = s.engine.perturbation
    previous = perturbation.after_update
    fired: list[int] = []

    def after(indices):
        if previous is not None:
            previous(indices)
        if s.engine.step_index == STOP_AT and not fired:
            fired.append(1)
            act()

    perturbation.after_update = after


def ctrl_c_inside_a_block_update(s, act, monkeypatch):
    """`act()` halfway through the first deferred update of step STOP_AT: half of a
    block's tensors updated, half not (where a KeyboardInterrupt tore bf16 runs)."""
    from edgezo.zo import workers

    original = workers.parallel_map
    fired: list[int] = []

    def parallel_map(fn, items, device, draws=True):
        items = list(items)
        if fn.__name__ != "update" or s.engine.step_index != STOP_AT or fired \
                or len(items) < 2:
            return original(fn, items, device, draws)
        fired.append(1)
        half = len(items) // 2
        original(fn, items[:half], device, draws)
        act()
        original(fn, items[half:], device, draws)

    monkeypatch.setattr(workers, "parallel_map", parallel_map)


def sigint():
    signal.raise_signal(signal.SIGINT)


def hard_stop():
    """What a second Ctrl-C does: a KeyboardInterrupt at once, inside the step."""
    raise KeyboardInterrupt


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("where", [ctrl_c_in_a_forward, ctrl_c_between_block_updates,
                                   ctrl_c_inside_a_block_update])
@pytest.mark.parametrize("how", [sigint, hard_stop])
def test_ctrl_c_inside_a_step_then_resume_equals_the_straight_run(tiny_folder, data_dir,
                                                                  tmp_path, dtype, where, how,
                                                                  monkeypatch):
    ref = tmp_path / "ref"
    finetune(session(tiny_folder, data_dir, dtype), ref)
    out = tmp_path / "stopped"
    s = session(tiny_folder, data_dir, dtype)
    if where is ctrl_c_inside_a_block_update:
        where(s, how, monkeypatch)
    else:
        where(s, how)
    report = finetune(s, out)
    assert report["interrupted"] is True
    # a held Ctrl-C lets the step finish; a hard one goes back to the step before it
    stopped_at = STOP_AT + 1 if how is sigint else STOP_AT
    assert report["steps"] == stopped_at and "test_accuracy" not in report
    assert snapshots(out)[-1].name == f"step-{stopped_at:08d}"
    assert len(read_seed_log(out)) == stopped_at
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, stopped_at + 1))  # the last one too
    finetune(Session.resume(out), out)
    assert same(last_weights(out), last_weights(ref))
    replayed = Session.replay_run(out)
    try:
        replayed.engine.flush()
        rebuilt = {n: p.detach() for n, p in zip(replayed.engine.blocks.names,
                                                 replayed.engine.blocks.params, strict=True)}
        assert same(rebuilt, last_weights(ref))
    finally:
        replayed.close()


STOPPER = """
import os, signal, sys
from edgezo.run.session import Session
from edgezo.cli.main import main
signal.signal(signal.SIGINT, signal.default_int_handler)
where, at = os.environ["STOP_IN"], int(os.environ.get("STOP_AT", "0"))
original = getattr(Session, where)
def patched(self, *a, **k):
    if self.engine.step_index == at:
        signal.raise_signal(signal.SIGINT)
    return original(self, *a, **k)
setattr(Session, where, patched)
sys.argv = ["edgezo"] + sys.argv[1:]
main()
"""


def cli(args, stop_in, at=0):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "STOP_IN": stop_in, "STOP_AT": str(at)}
    return subprocess.run([sys.executable, "-c", STOPPER, *args], capture_output=True,
                          text=True, env=env, timeout=300)


def args(tiny_folder, data_dir, out, *extra):
    return ["finetune", "--model", tiny_folder, "--data-dir", data_dir, "--profile",
            "cpu-16gb", "--batch-size", "2", "--max-length", "48", "--steps", "5",
            "--checkpoint-every", "2", "--output", str(out), "--no-save-model", *extra]


@pytest.mark.slow
def test_cli_ctrl_c_mid_run_exits_130_with_one_line(tiny_folder, data_dir, tmp_path):
    out = tmp_path / "run"
    proc = cli(args(tiny_folder, data_dir, out, "--no-eval-before"), "step", at=3)
    assert proc.returncode == 130, proc.stderr[-2000:]
    said = " ".join(proc.stdout.split())
    assert f"Stopped at step 4 of 5 (Ctrl-C); every completed step is in {out}. Resume " \
           f"with: edgezo finetune --resume {out} --steps 5" in said, said[-1500:]
    assert "Traceback" not in proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["interrupted"] is True and report["steps"] == 4


@pytest.mark.slow
def test_cli_ctrl_c_in_the_first_evaluation_leaves_no_folder(tiny_folder, data_dir,
                                                             tmp_path):
    out = tmp_path / "run"
    proc = cli(args(tiny_folder, data_dir, out), "evaluate")
    assert proc.returncode == 130, proc.stderr[-2000:]
    said = " ".join(proc.stdout.split())
    assert "Stopped before the first step (Ctrl-C); nothing was trained" in said, said[-1500:]
    assert "Traceback" not in proc.stderr
    assert not out.exists()  # the same command starts afresh


def test_a_session_step_cut_short_goes_back_to_the_last_completed_step(tiny_folder,
                                                                       data_dir, tmp_path,
                                                                       monkeypatch):
    """The API, not only finetune: a KeyboardInterrupt inside Session.step leaves a
    recorded session at the last completed step; an unrecorded one refuses to go on."""
    from edgezo.errors import CheckpointError

    ref = session(tiny_folder, data_dir, "bf16")
    for _ in range(STOP_AT + 1):
        ref.step()
    ref.engine.flush()
    want = {n: p.detach().clone() for n, p in zip(ref.engine.blocks.names,
                                                  ref.engine.blocks.params, strict=True)}
    ref.close()
    for recorded in (True, False):
        s = session(tiny_folder, data_dir, "bf16")
        if recorded:
            s.record(tmp_path / "run")
            s.checkpoint()
        with monkeypatch.context() as patch:
            ctrl_c_inside_a_block_update(s, hard_stop, patch)
            for _ in range(STOP_AT):
                s.step()
            with pytest.raises(KeyboardInterrupt):
                s.step()
        if not recorded:
            for act in (s.step, s.checkpoint, lambda s=s: s.save(tmp_path / "m")):
                with pytest.raises(CheckpointError, match=f"step {STOP_AT + 1} was "
                                                          "interrupted half-way"):
                    act()
            s.close()
            continue
        assert s.engine.step_index == STOP_AT
        s.step()  # the interrupted step again, on the same batch
        s.engine.flush()
        got = {n: p.detach() for n, p in zip(s.engine.blocks.names, s.engine.blocks.params,
                                             strict=True)}
        assert same(got, want)
        s.close()


def test_finetune_without_a_folder_marks_a_torn_step(tiny_folder, data_dir, monkeypatch):
    """No run folder to go back to: the session is marked torn, so nothing saves or
    trains on weights part-way through an update."""
    from edgezo.errors import CheckpointError

    s = session(tiny_folder, data_dir, "bf16")
    ctrl_c_inside_a_block_update(s, hard_stop, monkeypatch)
    try:
        report = train.finetune(s, STEPS, console=Console(quiet=True))
        assert report["interrupted"] is True and s.torn_step == STOP_AT
        with pytest.raises(CheckpointError, match="interrupted half-way"):
            s.step()
    finally:
        s.close()
