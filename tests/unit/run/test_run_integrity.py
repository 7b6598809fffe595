"""A run folder stays whole: a torn seed-log line never gives a silently shorter model
(replay refuses, resume repairs the log), and one run at a time writes a folder (its lock).

A crash while a step's line is written leaves the log's last line cut partway with no
newline ("torn"). `tear` makes one by hand, so these tests need no real crash."""

import json
import os
import signal
import subprocess
import sys

import pytest
from safetensors.torch import load_file
from test_checkpoint import KILLER, cli_run, final_weights, finetune_args, same, session, trainable

from edgezo.errors import CheckpointError
from edgezo.run.session import Session
from edgezo.run.snapshots import LOCK, SEED_LOG, read_seed_log, snapshots


def tear(run, keep: float = 0.5) -> bytes:
    """Cut the seed log's last line partway, leaving no newline (what a crash mid-write
    leaves); returns the whole line that was there."""
    log = run / SEED_LOG
    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(b"".join(lines[:-1]) + lines[-1][:int(len(lines[-1]) * keep)])
    return lines[-1]


def recorded(tiny_folder, data_dir, run, steps: int, snapshot_at: set[int]) -> dict:
    """A recorded run of `steps` steps, snapshotted after the steps in `snapshot_at`;
    returns its final trainable weights."""
    s = session(tiny_folder, data_dir)
    s.record(run)
    for _ in range(steps):
        s.step()
        if s.engine.step_index in snapshot_at:
            s.checkpoint(keep=5)
    s.engine.flush()
    weights = trainable(s)
    s.close()
    return weights


def whole_lines(run) -> list[bytes]:
    """The log's lines, after checking that it ends with a newline and each line is a
    whole JSON entry (no torn line, no line written onto another)."""
    raw = (run / SEED_LOG).read_bytes()
    assert raw.endswith(b"\n"), raw[-80:]
    lines = raw.splitlines(keepends=True)
    for line in lines:
        assert isinstance(json.loads(line)["step"], int), line
    return lines


def replayed(run) -> dict:
    s = Session.replay_run(run)
    try:
        s.engine.flush()
        return trainable(s)
    finally:
        s.close()


def test_the_log_reader_and_its_repair_on_hand_written_logs(tmp_path):
    """No model needed: a torn last line is reported and skipped, then cut before an
    append; a whole last entry that lacks only its newline is kept and given one; a
    whole entry written onto a torn line (what resume did before it cut torn lines) is
    read back."""
    from edgezo.run.snapshots import SeedLog, repair_seed_log, torn_line, torn_step

    def entry(step):
        return json.dumps({"step": step, "lr": 0.02, "seeds": [step]})

    log = tmp_path / SEED_LOG
    log.write_text(entry(0) + "\n" + entry(1)[:15])
    assert torn_line(tmp_path) == entry(1)[:15].encode() and torn_step(entry(1)[:15].encode()) == 1
    assert [e["step"] for e in read_seed_log(tmp_path)] == [0]
    SeedLog(tmp_path).append(json.loads(entry(1)))
    assert log.read_text() == entry(0) + "\n" + entry(1) + "\n" and torn_line(tmp_path) is None

    log.write_text(entry(0) + "\n" + entry(1))  # whole, only the newline lost
    assert torn_line(tmp_path) is None and len(read_seed_log(tmp_path)) == 2
    assert repair_seed_log(tmp_path) == b""
    assert log.read_text() == entry(0) + "\n" + entry(1) + "\n"

    log.write_text(entry(0) + "\n" + entry(1)[:15] + entry(1) + "\n" + entry(2) + "\n")
    assert [e["step"] for e in read_seed_log(tmp_path)] == [0, 1, 2]
    log.write_text(entry(0)[:5])  # one torn line, nothing else
    assert repair_seed_log(tmp_path) == entry(0)[:5].encode() and log.read_bytes() == b""


# -- replay: every step the run took, or a refusal that says why -----------------------------

@pytest.mark.parametrize("damage", ["torn", "lost"])
def test_replay_refuses_a_log_that_lacks_steps_the_run_took(tiny_folder, data_dir, tmp_path,
                                                           damage):
    """The run got to step 6 (its snapshot says so) but the log holds steps 0-4 whole:
    the last line torn, or lost whole (a copy cut at a line's end). Replaying 5 steps
    would be a silently shorter model; replay refuses, naming the snapshot and resume."""
    run = tmp_path / "run"
    recorded(tiny_folder, data_dir, run, 6, {4, 6})
    if damage == "torn":
        tear(run)
    else:
        log = run / SEED_LOG
        log.write_bytes(b"".join(log.read_bytes().splitlines(keepends=True)[:-1]))
    said = "last line \\(step 5\\) is torn" if damage == "torn" else "holds steps 0-4"
    with pytest.raises(CheckpointError, match=f"(?s){said}.*got to step 6.*step-00000006"
                                              ".*--resume"):
        Session.replay_run(run)
    # nor is it shipped as a seed log that would replay to a shorter model
    from edgezo.export.run import export_run

    with pytest.raises(CheckpointError, match=f"(?s){said}.*--resume"):
        export_run(run, "seedlog", tmp_path / "shipped")
    assert not (tmp_path / "shipped").exists()


def test_replay_refuses_a_torn_last_line_no_snapshot_holds(tiny_folder, data_dir, tmp_path):
    """A crash while step 2's line was written: no snapshot shows the run went further,
    but the torn line shows it took step 2, which the log cannot redo. Refused all the
    same (a seed log copied with its end cut off looks just like it): resume repairs a
    run folder; a shipped seed log is exported again."""
    run = tmp_path / "run"
    recorded(tiny_folder, data_dir, run, 3, {2})
    tear(run)
    with pytest.raises(CheckpointError, match="(?s)last line \\(step 2\\) is torn.*--resume"):
        Session.replay_run(run)
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    for name in ("run.json", SEED_LOG):
        (shipped / name).write_bytes((run / name).read_bytes())
    with pytest.raises(CheckpointError, match="(?s)is torn.*--format seedlog"):
        Session.replay_run(shipped)


# -- resume: the torn line is repaired before anything is appended ---------------------------

def resume_to_step_7(run, at: int) -> tuple[list[str], dict]:
    """Resume `run` (it must come back at step `at`) and step to 7; returns what resume
    warned and the weights at step 7."""
    said: list[str] = []
    resumed = Session.resume(run, warn=said.append)
    try:
        assert resumed.engine.step_index == at
        while resumed.engine.step_index < 7:
            resumed.step()
        resumed.engine.flush()
        return said, trainable(resumed)
    finally:
        resumed.close()


def check_log_rebuilt(run, whole: bytes, expected: dict) -> None:
    """The log holds steps 0-6 whole, step 5's line as it was before the tear, and
    replays to the resumed run's weights bit for bit."""
    lines = whole_lines(run)
    assert [json.loads(x)["step"] for x in lines] == list(range(7))
    assert lines[5] == whole
    assert same(replayed(run), expected)


def test_resume_cuts_a_torn_line_and_redoes_its_step(tiny_folder, data_dir, tmp_path):
    """A crash while step 5's line was written (the snapshot is at step 4): resume cuts
    the torn line before appending, redoes step 5 (the same line as before, bit for
    bit) and goes on; the log is whole and replay rebuilds the resumed run exactly."""
    run = tmp_path / "run"
    recorded(tiny_folder, data_dir, run, 6, {4})
    whole = tear(run)
    said, expected = resume_to_step_7(run, at=5)
    assert any("step 5" in w and "torn" in w for w in said), said
    check_log_rebuilt(run, whole, expected)


def test_resume_recomputes_a_torn_step_that_a_later_snapshot_holds(tiny_folder, data_dir,
                                                                   tmp_path):
    """The log's last line (step 5) torn after the run's snapshot at step 6 was written:
    the snapshot holds step 5's update, which the log alone cannot redo. Resume
    recomputes step 5 from the step-4 snapshot and the run's data, checks it against
    the torn bytes and the step-6 snapshot, and writes its line back: replay works
    again, bit for bit."""
    run = tmp_path / "run"
    recorded(tiny_folder, data_dir, run, 6, {4, 6})
    whole = tear(run)
    said, expected = resume_to_step_7(run, at=6)
    assert any("recomputed step 5" in w for w in said), said
    check_log_rebuilt(run, whole, expected)


def test_resume_leaves_out_a_torn_step_it_cannot_recompute(tiny_folder, data_dir, tmp_path):
    """Torn bytes that the recomputed line does not begin with (the step was not the one
    logged): resume goes on from the snapshot that holds it, cuts the torn line, says
    that the log can no longer rebuild the run, and replay refuses."""
    run = tmp_path / "run"
    recorded(tiny_folder, data_dir, run, 6, {4, 6})
    tear(run)
    log = run / SEED_LOG
    log.write_bytes(log.read_bytes() + b'9999')  # no step's lr
    said = []
    resumed = Session.resume(run, warn=said.append)
    try:
        assert resumed.engine.step_index == 6
        assert any("cannot rebuild" in w and "step 5" in w for w in said), said
        resumed.step()
    finally:
        resumed.close()
    lines = whole_lines(run)
    assert [json.loads(x)["step"] for x in lines] == [0, 1, 2, 3, 4, 6]
    with pytest.raises(CheckpointError, match="lacks step 5"):
        Session.replay_run(run)


@pytest.mark.slow
def test_a_torn_log_from_the_cli_is_refused_by_replay_and_repaired_by_resume(
        tiny_folder, data_dir, tmp_path):
    """The issue's case: a 6-step run, its log's last line torn. `edgezo replay` said
    "replayed 5 steps" with exit 0; now it refuses, and `finetune --resume` repairs the
    log so that replay rebuilds the resumed run's weights."""
    run = tmp_path / "run"
    cli_run(finetune_args(tiny_folder, data_dir, run, steps=6))
    tear(run)
    proc = cli_run(["replay", str(run), "--output", str(tmp_path / "x")], check=False)
    assert proc.returncode == 2 and "replayed" not in proc.stdout
    said = " ".join(proc.stderr.split())
    assert "is torn" in said and f"--resume {run}" in said, said
    proc = cli_run(["finetune", "--resume", str(run), "--steps", "7", "--data-dir", data_dir,
                    "--no-save-model"])
    assert "recomputed step 5" in " ".join(proc.stdout.split())
    assert [json.loads(x)["step"] for x in whole_lines(run)] == list(range(7))
    out = tmp_path / "rebuilt"
    proc = cli_run(["replay", str(run), "--output", str(out)])
    assert "replayed 7 steps" in proc.stdout
    rebuilt = load_file(str(out / "model.safetensors"))
    assert all(rebuilt[n].equal(v) for n, v in final_weights(run).items())


# -- one run at a time writes a run folder -----------------------------------------------------

def test_a_run_folder_is_locked_while_a_session_records_it(tiny_folder, data_dir, tmp_path):
    """A second session recording into a folder that a session is recording into, even in
    the same process, is refused naming the pid; close() releases the folder, and the run
    can be resumed in the same process at once."""
    run = tmp_path / "run"
    first = session(tiny_folder, data_dir)
    first.record(run)
    assert (run / LOCK).read_text().split() == [str(os.getpid())]
    second = session(tiny_folder, data_dir)
    try:
        with pytest.raises(CheckpointError,
                           match=f"another Session of this process \\(pid {os.getpid()}\\)"):
            second.record(run)
    finally:
        second.close()
    with pytest.raises(CheckpointError, match=f"pid {os.getpid()}"):
        Session.resume(run)
    first.step()
    first.close()
    assert not (run / LOCK).exists()
    resumed = Session.resume(run)
    try:
        resumed.step()
        with pytest.raises(CheckpointError, match="close that Session first"):
            Session.resume(run)
    finally:
        resumed.close()
    assert [e["step"] for e in read_seed_log(run)] == [0, 1]
    assert not (run / LOCK).exists()


HOLDER = """
import sys
from edgezo.run.snapshots import RunLock
lock = RunLock(sys.argv[1])
print("held", flush=True)
if sys.argv[2] == "wait":
    sys.stdin.read()
"""


def test_a_live_lock_is_refused_a_dead_one_taken_over_and_exit_releases(
        tiny_folder, data_dir, tmp_path):
    """Another live process's lock: refused, naming its pid and what to do. The same lock
    after that process is killed (SIGKILL: nothing released): taken over. A process that
    exits without releasing: the folder is free afterwards."""
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run), "wait"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        s = session(tiny_folder, data_dir)
        try:
            with pytest.raises(CheckpointError, match=f"(?s)pid {holder.pid}\\b.*--output"):
                s.record(run)
            assert not (run / "run.json").exists()
        finally:
            s.close()
    finally:
        holder.kill()
        holder.wait()
    assert (run / LOCK).read_text().split() == [str(holder.pid)]  # stale: the pid is gone
    s = session(tiny_folder, data_dir)
    try:
        s.record(run)
        assert (run / LOCK).read_text().split() == [str(os.getpid())]
    finally:
        s.close()
    done = subprocess.run([sys.executable, "-c", HOLDER, str(run), "exit"],
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "held" and not (run / LOCK).exists()


@pytest.mark.slow
def test_two_runs_started_on_one_output_folder_cannot_both_write_it(tiny_folder, data_dir,
                                                                     tmp_path):
    """The issue's case: two identical runs on the same --output. The first is stopped
    (SIGSTOP) at its first step, after it has written run.json, so the second, with the
    same settings and no step logged, passed the other-run check and wrote the same log
    and metrics. Now the second is refused, naming the first's pid; the first then ends
    with a whole log and whole metrics."""
    run = tmp_path / "run"
    args = finetune_args(tiny_folder, data_dir, run, steps=4)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "KILL_AT": "0", "KILL_SIG": "SIGSTOP"}
    first = subprocess.Popen([sys.executable, "-c", KILLER, *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    try:
        _, status = os.waitpid(first.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), status
        second = cli_run(args, check=False)
        assert second.returncode == 2, second.stdout[-2000:]
        said = " ".join(second.stderr.split())
        assert f"pid {first.pid}" in said, said
        os.kill(first.pid, signal.SIGCONT)
        out, err = first.communicate(timeout=300)
        assert first.returncode == 0, out[-2000:] + err[-2000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert [json.loads(x)["step"] for x in whole_lines(run)] == [0, 1, 2, 3]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert len(snapshots(run)) >= 1 and not (run / LOCK).exists()
