"""Runs that survive: seed-log replay, snapshots, exact resume, faults."""

import pytest
import torch
from conftest import lm_batch, zo_engine

from edgezo.errors import ConfigError
from edgezo.models.tiny import VOCAB, tiny_model
from edgezo.zo.optimizers import make_optimizer


def perturbs(optimizer: str) -> dict:
    """ε for an optimizer that perturbs (the forward gradient has none)."""
    return {"eps": 1e-2} if not optimizer.startswith("forward-grad") else {}


def trained(optimizer, steps=4, dtype=torch.float32, **kw):
    model = tiny_model("llama", dtype=dtype)
    engine = zo_engine(model, make_optimizer(optimizer), seed=5, **perturbs(optimizer), **kw)
    log = [engine.step(lm_batch(VOCAB, seed=s), lr=1e-2 * (1 + s % 2)).log_entry()
           for s in range(steps)]
    engine.close()
    return model, log


@pytest.mark.parametrize("optimizer, kw", [
    ("zo-sgd", {}), ("zo-adam", {}), ("zo-sgd-mmt", {}), ("zo-sgd-cons", {}),
    ("zo-sgd-sign", {}), ("forward-grad", {}), ("zo-sgd", {"q": 3}),
    ("zo-sgd", {"block_wise": True}), ("zo-sgd", {"pair": False}),
    ("zo-sgd", {"sparsity": 0.5, "sparsity_every": 2}),
    ("zo-sgd", {"sparsity": 0.5, "sparsity_mask": "magnitude", "sparsity_every": 2}),
    ("zo-sgd", {"estimate": "one-sided", "directions": "rademacher"}),
    ("fzoo", {"q": 3}), ("hizoo", {}), ("hizoo-l", {}),
    ("zo-sgd", {"directions": "lowrank", "rank": 2, "basis_every": 2}),
    ("zo-adam", {"directions": "subspace", "rank": 2, "basis_every": 3}),
    ("zo-sgd", {"directions": "lowrank", "rank": 2, "basis_every": 2,
                "structured_z": "chunked"}),
    ("zo-adam", {"directions": "subspace", "rank": 3, "structured_z": "chunked"}),
    ("zo-sgd-mmt", {"noise": "table"}),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_replaying_the_seed_log_rebuilds_the_weights_bit_exactly(optimizer, kw, dtype):
    model, log = trained(optimizer, dtype=dtype, **kw)
    fresh = tiny_model("llama", dtype=dtype)
    engine = zo_engine(fresh, make_optimizer(optimizer), seed=5, **perturbs(optimizer), **kw)
    for entry in log:
        engine.replay(entry)
    engine.close()
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, b) for a, b in zip(
        model.state_dict().values(), tiny_model("llama", dtype=dtype).state_dict().values(),
        strict=True))  # and the run did move the weights


def test_replay_refuses_backprop_updates_and_gaps():
    _, log = trained("zo-sgd", steps=2)
    engine = zo_engine(tiny_model("llama"), make_optimizer("fo-sgd"))
    with pytest.raises(ConfigError, match="seed log does not hold"):
        engine.replay(log[0])
    engine = zo_engine(tiny_model("llama"), make_optimizer("zo-sgd"), seed=5, eps=1e-2)
    with pytest.raises(ConfigError, match="jumps from step 0 to 1"):
        engine.replay(log[1])
    engine = zo_engine(tiny_model("llama"), make_optimizer("zo-sgd"), seed=6, eps=1e-2)
    with pytest.raises(ConfigError, match="other seeds than this run's"):
        engine.replay(log[0])


# -- run folders, snapshots and resume through Session ---------------------------------

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from safetensors.torch import load_file  # noqa: E402

from edgezo.run.session import Session  # noqa: E402
from edgezo.run.snapshots import read_seed_log, snapshots  # noqa: E402


def session(tiny_folder, data_dir, **kw):
    base = dict(profile="cpu-16gb", batch_size=2, lr=0.02, eps=1e-2, max_length=48,
                data_dir=data_dir, check_budget=False)
    return Session(tiny_folder, **{**base, **kw})


def trainable(s):
    return {n: p.detach().clone() for n, p in zip(s.engine.blocks.names,
                                                   s.engine.blocks.params, strict=True)}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kw", [{"optimizer": "zo-adam"},
                                {"sparsity": 0.5, "sparsity_mask": "magnitude",
                                 "sparsity_every": 2},
                                {"optimizer": "zo-sgd-cons", "q": 2}])
def test_resume_from_snapshot_and_seed_log_is_bit_identical(tiny_folder, data_dir, tmp_path,
                                                            kw):
    ref = session(tiny_folder, data_dir, **kw)
    ref_losses = [ref.step().loss for _ in range(6)]
    ref.engine.flush()
    expected = trainable(ref)
    ref.close()

    run = tmp_path / "run"
    s = session(tiny_folder, data_dir, **kw)
    s.record(run)
    for _ in range(2):
        s.step()
    s.checkpoint()
    s.step()  # logged, after the snapshot: a crash here loses nothing
    s.close()
    assert len(read_seed_log(run)) == 3 and len(snapshots(run)) == 1

    resumed = Session.resume(run)
    assert resumed.engine.step_index == 3
    losses = [resumed.step().loss for _ in range(3)]
    resumed.engine.flush()
    assert losses == ref_losses[3:]
    assert same(trainable(resumed), expected)
    resumed.close()


def test_a_damaged_snapshot_is_detected_and_the_previous_one_used(tiny_folder, data_dir,
                                                                  tmp_path):
    run = tmp_path / "run"
    s = session(tiny_folder, data_dir)
    s.record(run)
    for _ in range(4):
        s.step()
        s.checkpoint(keep=5)
    s.engine.flush()
    expected = trainable(s)
    s.close()
    newest = snapshots(run)[-1] / "weights.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated
    warnings = []
    resumed = Session.resume(run, warn=warnings.append)
    assert any("checksum" in w and "step-00000004" in w for w in warnings)
    assert resumed.engine.step_index == 4  # step 3's snapshot + step 4 replayed
    resumed.engine.flush()
    assert same(trainable(resumed), expected)
    resumed.close()


def test_a_full_disk_fails_the_snapshot_and_keeps_the_previous(tiny_folder, data_dir,
                                                               tmp_path, monkeypatch):
    from rich.console import Console

    import edgezo.run.snapshots as ck
    from edgezo.run.selection import snapshot_or_warn as _snapshot

    run = tmp_path / "run"
    s = session(tiny_folder, data_dir)
    s.record(run)
    s.step()
    s.checkpoint()
    before = {p.name: p.read_bytes() for p in snapshots(run)[0].iterdir()}

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck, "save_file", full)
    s.step()
    console = Console(record=True)
    assert _snapshot(s, console) is False
    assert "No space left on device" in console.export_text()
    assert [p.name for p in snapshots(run)] == ["step-00000001"]
    assert {p.name: p.read_bytes() for p in snapshots(run)[0].iterdir()} == before
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    s.close()


KILLER = """
import os, signal, sys
from edgezo.run.session import Session
from edgezo.cli.main import main
at, sig = int(os.environ["KILL_AT"]), getattr(signal, os.environ["KILL_SIG"])
# a shell's background job starts with SIGINT ignored, and Python then keeps it ignored:
# give the run the handler a terminal's Ctrl-C meets
signal.signal(signal.SIGINT, signal.default_int_handler)
original = Session.step
def step(self, *a, **k):
    if self.engine.step_index == at:
        # to this thread: os.kill may hand the signal to a noise worker thread, and the
        # main thread then sees it only at its next check, possibly a step later
        signal.raise_signal(sig)
    return original(self, *a, **k)
Session.step = step
sys.argv = ["edgezo"] + sys.argv[1:]
main()
"""


def cli_run(args, env_extra=None, check=True):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env_extra or {})}
    code = KILLER if env_extra else "import sys; from edgezo.cli.main import main; " \
        "sys.argv = ['edgezo'] + sys.argv[1:]; main()"
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                          text=True, env=env, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def finetune_args(tiny_folder, data_dir, out, steps=6):
    return ["finetune", "--model", tiny_folder, "--data-dir", data_dir, "--profile",
            "cpu-16gb", "--batch-size", "2", "--lr", "0.02", "--eps", "0.01",
            "--max-length", "48", "--steps", str(steps), "--checkpoint-every", "2",
            "--output", str(out), "--no-save-model", "--eval-batch-size", "64"]


def final_weights(run):
    return load_file(str(snapshots(run)[-1] / "weights.safetensors"))


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_equals_the_uninterrupted_run(tiny_folder, data_dir,
                                                                  tmp_path):
    ref = tmp_path / "ref"
    cli_run(finetune_args(tiny_folder, data_dir, ref))
    killed = tmp_path / "killed"
    proc = cli_run(finetune_args(tiny_folder, data_dir, killed),
                   {"KILL_AT": "5", "KILL_SIG": "SIGKILL"}, check=False)
    assert proc.returncode == -9
    assert [p.name for p in snapshots(killed)][-1] == "step-00000004"
    assert len(read_seed_log(killed)) == 5  # steps 0-4 logged; step 5 lost in flight
    assert (killed / ".lock").read_text().strip().isdigit()  # the dead run's: stale
    out = cli_run(["finetune", "--resume", str(killed), "--steps", "6", "--data-dir",
                   data_dir, "--no-save-model"])
    assert "Resumed at step 5" in out.stdout
    assert not (killed / ".lock").exists()  # taken over, and released at the end
    assert same(final_weights(killed), final_weights(ref))
    rows = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_ctrl_c_saves_a_snapshot_and_says_how_to_resume(tiny_folder, data_dir, tmp_path):
    out = tmp_path / "run"
    proc = cli_run(finetune_args(tiny_folder, data_dir, out, steps=8),
                   {"KILL_AT": "3", "KILL_SIG": "SIGINT"}, check=False)
    assert proc.returncode == 130, proc.stderr[-2000:]
    said = " ".join(proc.stdout.split())
    # the Ctrl-C came during step 3 (0-based), which finished first
    assert "Stopped at step 4 of 8 (Ctrl-C)" in said, proc.stdout[-3000:]
    assert f"edgezo finetune --resume {out}" in said
    assert snapshots(out)[-1].name == "step-00000004"
    assert json.loads((out / "report.json").read_text())["interrupted"] is True


@pytest.mark.slow
def test_resume_refuses_changed_settings(tiny_folder, data_dir, tmp_path):
    out = tmp_path / "run"
    cli_run(finetune_args(tiny_folder, data_dir, out, steps=2))
    proc = cli_run(["finetune", "--resume", str(out), "--lr", "0.5"], check=False)
    assert proc.returncode == 2 and "drop --lr" in proc.stderr
    proc = cli_run(["finetune", "--resume", str(tmp_path / "nothing")], check=False)
    assert proc.returncode == 2 and "not a run folder" in proc.stderr


@pytest.mark.slow
def test_a_new_run_into_another_runs_folder_is_refused(tiny_folder, data_dir, tmp_path):
    """A new run recording into a used folder would keep the other's run.json and go on
    with its seed log, so neither could be resumed or replayed: refused, naming --resume,
    and the folder is left as it was. A run stopped before its first step may start
    again with the same settings; a resumed run goes on in its own folder."""
    from rich.console import Console

    from edgezo.run import train

    def quiet_run(s, steps, out):
        try:
            return train.finetune(s, steps, output=str(out), save_model=False,
                                  console=Console(quiet=True))
        finally:
            s.close()

    run = tmp_path / "run"
    quiet_run(session(tiny_folder, data_dir, eval_before=False), 2, run)
    files = {f: (run / f).read_bytes() for f in ("run.json", "seedlog.jsonl")}
    for kw, what in (({}, r"2 logged steps\)"), ({"lr": 0.05}, "2 logged steps, other")):
        with pytest.raises(ConfigError, match=f"already holds a run \\({what}.*--resume"):
            quiet_run(session(tiny_folder, data_dir, eval_before=False, **kw), 2, run)
    assert {f: (run / f).read_bytes() for f in files} == files
    proc = cli_run(finetune_args(tiny_folder, data_dir, run, steps=3), check=False)
    assert proc.returncode == 2 and "--resume" in proc.stderr
    assert len(read_seed_log(run)) == 2
    quiet_run(Session.resume(run), 3, run)
    assert [e["step"] for e in read_seed_log(run)] == [0, 1, 2]

    started = tmp_path / "started"
    s = session(tiny_folder, data_dir, eval_before=False)
    s.record(started)  # run.json written, then stopped before a step
    s.close()
    quiet_run(session(tiny_folder, data_dir, eval_before=False, steps=9), 1, started)
    assert [e["step"] for e in read_seed_log(started)] == [0]


@pytest.mark.slow
def test_replay_and_seedlog_export_rebuild_the_final_weights(tiny_folder, data_dir, tmp_path):
    run = tmp_path / "run"
    cli_run(finetune_args(tiny_folder, data_dir, run, steps=5))
    expected = final_weights(run)
    shipped = tmp_path / "shipped"
    cli_run(["export", str(run), "--format", "seedlog", "--output", str(shipped)])
    assert sorted(p.name for p in shipped.iterdir()) == ["run.json", "seedlog.jsonl"]
    assert (shipped / "seedlog.jsonl").stat().st_size < 5 * 2000  # bytes, not megabytes
    for source in (run, shipped):
        out = tmp_path / f"rebuilt-{source.name}"
        proc = cli_run(["replay", str(source), "--output", str(out)])
        assert "replayed 5 steps" in proc.stdout
        rebuilt = load_file(str(out / "model.safetensors"))
        for name, value in expected.items():
            assert torch.equal(rebuilt[name], value), name


@pytest.mark.slow
def test_fo_runs_cannot_be_replayed_or_shipped_as_seed_logs(tiny_folder, data_dir, tmp_path):
    run = tmp_path / "run"
    args = finetune_args(tiny_folder, data_dir, run, steps=2)
    at = args.index("--eps")
    del args[at:at + 2]  # backprop perturbs nothing: an ε would be refused
    cli_run([*args, "--optimizer", "fo-sgd", "--lr", "0.001"])
    proc = cli_run(["replay", str(run), "--output", str(tmp_path / "x")], check=False)
    assert proc.returncode == 2 and "backpropagated" in proc.stderr
    proc = cli_run(["export", str(run), "--format", "seedlog", "--output",
                    str(tmp_path / "y")], check=False)
    assert proc.returncode == 2 and "seed log cannot hold" in proc.stderr


def nan_at(session_, steps):
    """Make the loss NaN at the given step indices (a divergence the user could cause)."""
    original = session_.engine.loss_fn

    def loss(model, batch):
        out = original(model, batch)
        return out * float("nan") if session_.engine.step_index in steps else out

    session_.engine.loss_fn = loss


def test_nonfinite_losses_are_skipped_counted_and_stop_the_run(tiny_folder, data_dir,
                                                              tmp_path):
    from rich.console import Console

    from edgezo.errors import TrainingError
    from edgezo.run.train import finetune
    from edgezo.run.watch import MAX_NONFINITE_IN_A_ROW

    s = session(tiny_folder, data_dir)
    nan_at(s, {1, 2})
    report = finetune(s, 5, output=tmp_path / "a", save_model=False,
                      console=Console(quiet=True))
    assert report["skipped_steps"] == 2
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [False, True, True, False, False]
    s.close()

    s = session(tiny_folder, data_dir)
    start = trainable(s)
    nan_at(s, set(range(100)))
    with pytest.raises(TrainingError, match="not finite for 5 steps in a row"):
        finetune(s, 20, output=tmp_path / "b", save_model=False, console=Console(quiet=True))
    snap = snapshots(tmp_path / "b")[-1]
    assert snap.name == f"step-{MAX_NONFINITE_IN_A_ROW:08d}"
    saved = load_file(str(snap / "weights.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in start.items())  # nothing was applied
    s.close()


def test_run_folders_are_read_without_pickle(tiny_folder, data_dir, tmp_path, monkeypatch):
    """Resume and replay read JSON and safetensors only: torch.load (pickle) never runs."""
    run = tmp_path / "run"
    s = session(tiny_folder, data_dir)
    s.record(run)
    s.step()
    s.checkpoint()
    s.step()
    s.close()

    def forbidden(*a, **k):
        raise AssertionError("torch.load called on a run folder")

    monkeypatch.setattr(torch, "load", forbidden)
    Session.resume(run).close()
    Session.replay_run(run).close()


def test_snapshot_options_without_a_run_folder_are_refused(tiny_folder):
    proc = cli_run(["finetune", "--model", tiny_folder, "--keep", "2"], check=False)
    assert proc.returncode == 2 and "add --output DIR" in proc.stderr


def test_keep_best_ends_with_the_best_validated_weights_and_keeps_the_last(
        tiny_folder, data_dir, tmp_path, monkeypatch):
    """--keep-best: the final evaluations and the saved model are those of the step that
    scored best on validation; the last step's weights stay snapshotted for --resume, and
    the session itself goes on from them. Validation is scripted (a tiny model's accuracy
    barely moves): best at step 4 of 6."""
    from edgezo.run import train

    scores = {2: 0.5, 4: 0.9, 6: 0.6}
    seen = []

    def scripted(sess, split, console):
        seen.append((split, sess.engine.step_index))
        return {"score": scores[sess.engine.step_index] if split == "validation" else 0.7}

    monkeypatch.setattr(train, "evaluate", scripted)
    ref = session(tiny_folder, data_dir)
    for _ in range(4):
        ref.step()
    ref.engine.flush()
    at_4 = trainable(ref)
    for _ in range(2):
        ref.step()
    ref.engine.flush()
    at_6 = trainable(ref)
    ref.close()

    run = tmp_path / "run"
    (run / "best").mkdir(parents=True)  # another run's best, left in the folder
    (run / "best" / "meta.json").write_text(json.dumps({"step": 5, "validation_accuracy": 1}))
    s = session(tiny_folder, data_dir, eval_every=2, keep_best=True, eval_before=False)
    try:
        report = train.finetune(s, 6, output=str(run))
        assert same(trainable(s), at_6) and not same(at_4, at_6)  # the session: step 6
        assert s.engine.step_index == 6 and s.report()["selected"] is None
    finally:
        s.close()
    assert report["selected"] == {"by": "validation", "step": 4, "validation_accuracy": 0.9,
                                  "last_step": 6}
    assert report["steps"] == 6 and report["validation_accuracy"] == 0.9
    assert seen[-2:] == [("validation", 4), ("test", 4)]  # the final evaluations: step 4's
    saved = load_file(str(run / "model" / "model.safetensors"))
    shared = [n for n in at_4 if n in saved]
    assert shared and all(torch.equal(saved[n], at_4[n]) for n in shared)  # step 4's
    assert json.loads((run / "model" / "report.json").read_text())["selected"]["step"] == 4
    assert snapshots(run)[-1].name == "step-00000006"  # the last weights, resumable
    assert same(load_file(str(snapshots(run)[-1] / "weights.safetensors")), at_6)
    assert json.loads((run / "best" / "meta.json").read_text())["step"] == 4


@pytest.mark.slow
def test_keep_best_needs_periodic_validation_and_a_run_folder(tiny_folder):
    proc = cli_run(["finetune", "--model", tiny_folder, "--keep-best"], check=False)
    assert proc.returncode == 2 and "add --eval-every N" in proc.stderr
    proc = cli_run(["finetune", "--model", tiny_folder, "--keep-best", "--eval-every", "2",
                    "--task", "sst2", "--steps", "2"], check=False)
    assert proc.returncode == 2 and "add --output DIR" in proc.stderr


def test_a_resumed_run_drops_a_best_from_beyond_where_it_resumes(tiny_folder, data_dir,
                                                                 tmp_path, monkeypatch):
    """A best from a later step than the resume point belongs to a path this run left (a
    rewind after divergence, an older snapshot): it must not be restored at the end."""
    from edgezo.run import train

    monkeypatch.setattr(train, "evaluate", lambda sess, split, console: {
        "score": {2: 0.5, 4: 0.6}.get(sess.engine.step_index, 0.5)})
    run = tmp_path / "run"
    s = session(tiny_folder, data_dir, eval_every=2, keep_best=True, eval_before=False)
    try:
        train.finetune(s, 2, output=str(run))
    finally:
        s.close()
    meta = json.loads((run / "best" / "meta.json").read_text())
    assert meta["step"] == 2
    (run / "best" / "meta.json").write_text(json.dumps({**meta, "step": 9,
                                                        "validation_accuracy": 1.0}))
    resumed = Session.resume(run)
    try:
        report = train.finetune(resumed, 4, output=str(run))
    finally:
        resumed.close()
    assert report["selected"]["step"] == 4 and report["selected"]["last_step"] == 4


def test_average_last_ends_with_the_mean_of_the_last_weights_and_keeps_the_last(
        tiny_folder, data_dir, tmp_path, monkeypatch):
    """--average-last 3: the final evaluations and the saved model are the mean of the
    weights after steps 4, 5 and 6; the last step's weights stay snapshotted for --resume,
    and the session itself goes on from them. In fp32: in bf16 the weights after each
    step carry that step's rounding, which the mean of the logged updates does not (the
    engine's tests check the bf16 mean is rounded once)."""
    from edgezo.run import train

    seen = []

    def scripted(sess, split, console):
        seen.append((split, sess.report()["selected"]))
        return {"score": 0.5}

    monkeypatch.setattr(train, "evaluate", scripted)
    ref = session(tiny_folder, data_dir, dtype="fp32")
    kept = []
    for _ in range(6):
        ref.step()
        ref.engine.flush()
        kept.append(trainable(ref))
    ref.close()
    mean = {n: torch.stack([k[n].double() for k in kept[3:]]).mean(0) for n in kept[0]}

    run = tmp_path / "run"
    s = session(tiny_folder, data_dir, dtype="fp32", average_last=3, eval_before=False)
    try:
        report = train.finetune(s, 6, output=str(run))
        assert same(trainable(s), kept[5])  # the session: step 6, resumable
        assert s.report()["selected"] is None
        s.step()  # and it trains on
    finally:
        s.close()
    assert report["selected"] == {"by": "average", "steps": 3, "last_step": 6}
    assert seen[-1] == ("test", report["selected"])  # evaluated: the average
    saved = load_file(str(run / "model" / "model.safetensors"))
    shared = [n for n in mean if n in saved]
    assert shared
    for n in shared:
        torch.testing.assert_close(saved[n].double(), mean[n], rtol=1e-6, atol=1e-6)
    assert not all(torch.equal(saved[n], kept[5][n]) for n in shared)
    assert snapshots(run)[-1].name == "step-00000006"  # the last weights, resumable
    assert same(load_file(str(snapshots(run)[-1] / "weights.safetensors")), kept[5])


def test_an_averaged_session_takes_no_step_and_average_last_refuses_what_it_cannot_do(
        tiny_folder, data_dir):
    from edgezo.run import train

    s = session(tiny_folder, data_dir, eval_before=False)
    try:
        for _ in range(3):
            s.step()
        assert s.average_last(10) == 3  # a shorter run: all of its steps
        assert s.report()["selected"] == {"by": "average", "steps": 3, "last_step": 3}
        with pytest.raises(ConfigError, match="resume the run folder"):
            s.step()
        with pytest.raises(ConfigError, match="a step from them"):
            s.rank_step(["Review: fine"], lambda outputs: [0])
        with pytest.raises(ConfigError, match="a snapshot from them"):
            s.checkpoint()
    finally:
        s.close()
    s = session(tiny_folder, data_dir, optimizer="zo-adam", lr=1e-3, eval_before=False)
    try:
        with pytest.raises(ConfigError, match="--average-last cannot average"):
            train.finetune(s, 2, average_last=2)
        assert s.engine.step_index == 0  # refused before any step
    finally:
        s.close()
    proc = cli_run(["finetune", "--model", tiny_folder, "--keep-best", "--eval-every", "2",
                    "--average-last", "2", "--output", "x"], check=False)
    assert proc.returncode == 2 and "keep one" in proc.stderr


@pytest.mark.parametrize("kind", ["lowrank", "subspace"])
def test_a_structured_run_recorded_before_exact_products_still_replays(tiny_folder, data_dir,
                                                                       tmp_path, kind):
    """A lowrank or subspace run.json written before structured_z existed holds none: its
    z was chunked, and replay must compute the same one to rebuild its weights (a new
    run records "exact", so it replays with that)."""
    from rich.console import Console

    from edgezo.run import train

    runs = {}
    for structured_z in ("chunked", "exact"):
        run = runs[structured_z] = tmp_path / structured_z
        s = session(tiny_folder, data_dir, eval_before=False, directions=kind, rank=2,
                    structured_z=structured_z)
        try:
            train.finetune(s, 2, output=str(run), save_model=False, checkpoint_every=2,
                           console=Console(quiet=True))
            runs[structured_z] = (run, trainable(s))
        finally:
            s.close()
    run, want = runs["chunked"]
    settings = json.loads((run / "run.json").read_text())
    assert settings["estimator"].pop("structured_z") == "chunked"
    (run / "run.json").write_text(json.dumps(settings))  # as an older edgezo wrote it
    run, exact = runs["exact"]
    assert json.loads((run / "run.json").read_text())["estimator"]["structured_z"] == "exact"
    assert not same(want, exact)  # the two definitions of z differ
    for run, weights in runs.values():
        replayed = Session.replay_run(run)
        try:
            assert same(trainable(replayed), weights)
        finally:
            replayed.close()
