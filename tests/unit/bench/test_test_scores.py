"""benchmarks/test_scores.py: a run is charged for the steps up to the weights it kept
(a step logged twice, once), and its gain is read against the bar (the last run listed)."""

import json
import subprocess
import sys

from conftest import REPO


def write_run(folder, optimizer, lr, kept, step_times, memory):
    folder.mkdir()
    (folder / "run.json").write_text(json.dumps(
        {"optimizer": {"optimizer": optimizer, "lr": lr}, "scheme": {"scheme": "lora"}}))
    (folder / "report.json").write_text(json.dumps(
        {"selected": {"step": kept}, "peak_memory_bytes": 2e9}))
    rows = [{"step": i + 1, "time_s": t, "memory_bytes": m}
            for i, (t, m) in enumerate(zip(step_times, memory, strict=True))]
    # step 2 was logged, rewound and redone: its later record is the one that counts
    rows.insert(1, {"step": 2, "time_s": 999, "memory_bytes": 0})
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_the_table_charges_the_kept_steps_and_measures_gains_against_the_bar(tmp_path):
    write_run(tmp_path / "zo", "zo-sgd", 3e-4, kept=2, step_times=[60, 120, 600],
              memory=[0.5e9, 0.7e9, 0.6e9])
    write_run(tmp_path / "fo", "fo-adam", 1e-3, kept=3, step_times=[60, 60, 60],
              memory=[4e9, 5e9, 4.5e9])
    for name, f1 in (("zero", 0.1), ("zo_score", 0.3), ("fo_score", 0.35)):
        (tmp_path / f"{name}.json").write_text(json.dumps(
            {"f1": f1, "exact_match": f1 / 2, "examples": 10, "split": "test"}))
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "test_scores.py"), "--zero-shot",
         str(tmp_path / "zero.json"), f"{tmp_path / 'zo'}={tmp_path / 'zo_score.json'}",
         f"{tmp_path / 'fo'}={tmp_path / 'fo_score.json'}"],
        capture_output=True, text=True, check=True).stdout
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in out.splitlines() if line.startswith("| ") and "---" not in line}
    assert rows["zo-sgd lora 0.0003"] == ["0.300", "0.150", "80%", "2 / 3", "3 (13)",
                                          "0.70"]
    assert rows["fo-adam lora 0.001"][2:4] == ["100%", "3 / 3"]
