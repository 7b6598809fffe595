"""Compute threads chosen from the machine's state, and OpenMP kept from spinning."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import lm_batch
from edgezo.cli.main import app
from typer.testing import CliRunner

from edgezo.config.options import RESUMABLE
from edgezo.device import threads
from edgezo.device.threads import busy_cpus, cgroup_quota, choose_threads, limit_openmp_spin
from edgezo.run.session import Session


@pytest.mark.parametrize("cpus, quota, busy, ceiling, expected", [
    (2, None, 0.0, 2, 2),     # an idle machine: every CPU
    (2, None, 0.3, 2, 2),     # background noise leaves the cores ours
    (2, None, 0.6, 2, 1),     # a core kept busy half the time or more is left to others
    (2, None, 1.9, 2, 1),     # another process on both cores: one thread, never zero
    (2, None, None, 2, 2),    # load unknown: what the CPUs allow
    (8, 2.5, 0.0, 8, 2),      # a cgroup quota of 2.5 CPUs: two threads
    (8, 0.5, 0.0, 8, 1),      # less than a CPU still computes
    (64, 4.0, 40.0, 32, 4),   # a container's quota on a busy host with 24 CPUs free
    (16, None, 10.0, 8, 6),   # 10 of 16 busy: the 6 others
    (16, None, 2.0, 8, 8),    # never more than torch's own count
])
def test_threads_follow_the_cpus_their_quota_and_their_load(cpus, quota, busy, ceiling,
                                                            expected):
    assert choose_threads(None, cpus, quota, busy, ceiling).threads == expected


def test_the_reason_names_what_decided():
    busy = choose_threads(None, 2, None, 1.93, 2).reason
    assert busy.startswith("1 compute thread (2 CPUs allowed, 1.9 busy with other")
    assert "cgroup quota of 2.5 CPUs" in choose_threads(None, 8, 2.5, 0.0, 8).reason
    assert "torch's own count 8" in choose_threads(None, 16, None, 2.0, 8).reason
    assert "load unknown" in choose_threads(None, 2, None, None, 2).reason
    asked = choose_threads(3, 2, None, 1.9, 2)  # --threads wins, even over the load
    assert asked.threads == 3 and asked.reason == "3 compute threads, as asked (--threads)"


def test_cgroup_quota_v2_takes_the_tightest_of_the_cgroup_and_its_parents(tmp_path):
    own = tmp_path / "cgroup"
    own.write_text("0::/app/run\n")
    (tmp_path / "app" / "run").mkdir(parents=True)
    (tmp_path / "app" / "run" / "cpu.max").write_text("max 100000\n")
    assert cgroup_quota(tmp_path, own) is None
    (tmp_path / "app" / "cpu.max").write_text("150000 100000\n")
    assert cgroup_quota(tmp_path, own) == 1.5
    (tmp_path / "app" / "run" / "cpu.max").write_text("50000 100000\n")
    assert cgroup_quota(tmp_path, own) == 0.5


def test_cgroup_quota_v1(tmp_path):
    v1 = tmp_path / "cpu,cpuacct"
    v1.mkdir()
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_quota(tmp_path, tmp_path / "none") is None
    (v1 / "cpu.cfs_quota_us").write_text("200000\n")
    assert cgroup_quota(tmp_path, tmp_path / "none") == 2.0


class Stat:
    """/proc/stat read twice: before and after the sample."""

    def __init__(self, *texts):
        self.texts = list(texts)

    def read_text(self):
        return self.texts.pop(0)


class Clock:
    """A 1 s sample, during which this process ran for `own` CPU seconds."""

    def __init__(self, own: float):
        self.wall, self.cpu = [0.0, 1.0], [0.0, own]

    def monotonic(self):
        return self.wall.pop(0)

    def process_time(self):
        return self.cpu.pop(0)

    def sleep(self, seconds):
        pass


def test_busy_cpus_counts_the_allowed_cpus_busy_time_not_their_idle_or_others(monkeypatch):
    # user nice system idle iowait irq softirq steal guest guest_nice, 100 ticks a second
    before = ("cpu  0 0 0 0 0 0 0 0 0 0\ncpu0 100 0 0 900 0 0 0 0 0 0\n"
              "cpu1 100 0 0 900 0 0 0 0 0 0\ncpu2 0 0 0 1000 0 0 0 0 0 0\n")
    # cpu0 all busy (user, system, steal), cpu1 idle or waiting on a disk, cpu2 not ours
    after = ("cpu  0 0 0 0 0 0 0 0 0 0\ncpu0 160 0 30 900 0 0 0 10 0 0\n"
             "cpu1 100 0 0 950 50 0 0 0 0 0\ncpu2 100 0 0 1000 0 0 0 0 0 0\n")
    monkeypatch.setattr(threads, "time", Clock(own=0.0))
    assert busy_cpus([0, 1], 1.0, Stat(before, after)) == pytest.approx(1.0)
    # this process's own time on them is not another process's
    monkeypatch.setattr(threads, "time", Clock(own=0.75))
    assert busy_cpus([0, 1], 1.0, Stat(before, after)) == pytest.approx(0.25)


@pytest.fixture
def torch_threads(monkeypatch):
    """Whatever a test sets, torch's thread count and edgezo's record of it come back."""
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "_TORCH", {})
    monkeypatch.setattr(threads, "_sample", None)
    yield
    torch.set_num_threads(before)


def test_a_session_on_a_busy_cpu_computes_with_fewer_threads(tiny_folder, torch_threads,
                                                             monkeypatch):
    monkeypatch.setattr(threads, "allowed_cpus", lambda: [0, 1])
    monkeypatch.setattr(threads, "cgroup_quota", lambda: None)
    monkeypatch.setattr(threads, "busy_cpus", lambda cpus: 1.9)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    s = Session(tiny_folder, task=None, profile="cpu-16gb")
    try:
        assert torch.get_num_threads() == 1 and s.threads.threads == 1
        assert s.report()["compute"]["threads"] == {"threads": 1, "why": s.threads.reason}
    finally:
        s.close()


def test_threads_1_reaches_torch_and_the_header(tiny_folder, data_dir, tmp_path,
                                                torch_threads):
    torch.set_num_threads(2)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "finetune", "--model", tiny_folder, "--data-dir", data_dir, "--steps", "1",
        "--batch-size", "2", "--no-eval-before", "--eval-examples", "4", "--threads", "1",
        "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == 1
    assert "1 compute thread, as asked (--threads)" in " ".join(result.output.split())
    report = json.loads((out / "report.json").read_text())
    assert report["compute"]["threads"]["threads"] == 1
    assert report["hyperparameters"]["threads"] == 1


def test_a_step_is_bit_identical_with_one_or_two_threads(tmp_path, torch_threads):
    """Why --resume may change --threads: a run resumed with another count stays the run
    it was. Wide enough that the matmuls and elementwise work split across threads."""
    from edgezo.models.tiny import save_tiny

    save_tiny(tmp_path, "llama", width=256)
    batch = lm_batch(256, rows=8, seq=24)
    weights = []
    for n in (1, 2):
        s = Session(str(tmp_path), task=None, profile="cpu-16gb", lr=1e-3, threads=n)
        try:
            for _ in range(2):
                s.step(dict(batch))
            weights.append({k: v.clone() for k, v in s.model.state_dict().items()})
        finally:
            s.close()
    assert "threads" in RESUMABLE
    assert weights[0].keys() == weights[1].keys()
    for name, w in weights[0].items():
        assert torch.equal(w, weights[1][name]), name


def test_openmp_spins_briefly_unless_the_user_chose():
    env = {}
    limit_openmp_spin(env)
    assert env == {"GOMP_SPINCOUNT": "10000", "KMP_BLOCKTIME": "1"}
    env = {"GOMP_SPINCOUNT": "300000", "KMP_BLOCKTIME": "200"}
    limit_openmp_spin(env)
    assert env == {"GOMP_SPINCOUNT": "300000", "KMP_BLOCKTIME": "200"}
    env = {"OMP_WAIT_POLICY": "passive"}  # a policy sets the spin of both runtimes
    limit_openmp_spin(env)
    assert env == {"OMP_WAIT_POLICY": "passive"}


@pytest.mark.parametrize("given, seen", [(None, "10000 None"), ("ACTIVE", "None ACTIVE")])
def test_the_cli_limits_the_spin_before_torch_loads(given, seen):
    """The `edgezo` command's module, imported alone: the setting is in the environment
    before torch (and its OpenMP runtime) is."""
    env = {k: v for k, v in os.environ.items() if k not in OPENMP_VARS}
    if given:
        env["OMP_WAIT_POLICY"] = given
    code = SPY + "import edgezo.cli.main\nimport torch\nprint(seen)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == seen


OPENMP_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
# records the OpenMP settings at the moment torch's import starts
SPY = """import os, sys
class Spy:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and "seen" not in globals():
            globals()["seen"] = " ".join(str(os.environ.get(k)) for k in
                                         ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY"))
sys.meta_path.insert(0, Spy())
"""


@pytest.mark.slow
def test_idle_openmp_threads_leave_their_cores():
    """What the spin limit is for: between operations, as between a step's operations
    and another process's turn, torch's idle OpenMP threads do not keep burning a core
    (without it, each spins 3 ms after every operation)."""
    env = {k: v for k, v in os.environ.items() if k not in OPENMP_VARS}
    code = """import edgezo, time, torch
torch.set_num_threads(2)
x = torch.ones(2_000_000)
wall, cpu = time.perf_counter(), time.process_time()
for _ in range(200):
    x.mul_(1.0)
    time.sleep(0.002)
print((time.process_time() - cpu) / (time.perf_counter() - wall))"""
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert float(out) < 0.5
