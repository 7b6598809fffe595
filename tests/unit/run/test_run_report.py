"""What a run says about itself after --resume: the run's step count, evaluation time
within wall time, and why it computes in its dtype."""

import json
import subprocess
import sys

import pytest

from edgezo.models.tiny import save_tiny


def cli(*args):
    code = "import sys; from edgezo.cli.main import main; sys.argv = ['edgezo'] + " \
        "sys.argv[1:]; main()"
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


@pytest.mark.slow
def test_a_resumed_run_reports_the_runs_steps_and_its_own_reasons(tmp_path, data_dir):
    model = tmp_path / "tiny"
    save_tiny(model, "llama")
    out = tmp_path / "run"
    cli("finetune", "--model", str(model), "--data-dir", data_dir, "--profile", "cpu-16gb",
        "--batch-size", "2", "--max-length", "48", "--steps", "3", "--output", str(out),
        "--no-save-model")
    first = json.loads((out / "report.json").read_text())
    assert first["eval_time_s"] <= first["wall_time_s"]  # the final evaluations in both
    said = " ".join(cli("finetune", "--resume", str(out), "--steps", "5").stdout.split())
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 5  # the run's, not this process's 2
    assert report["eval_time_s"] <= report["wall_time_s"]
    assert "as asked (--dtype)" not in said and "as the run started" in said
    assert report["compute"]["why"].startswith("as the run started")
