"""`edgezo bench`: suites expand as written, select on validation, resume, shard, merge."""

import json
import sqlite3

import pytest
from typer.testing import CliRunner

from edgezo.bench.runner import run_suite, shard_runs
from edgezo.bench.store import Store
from edgezo.bench.suite import list_suites, load_suite
from edgezo.bench.tables import markdown, select
from edgezo.errors import ConfigError

MINI = """
name: mini
defaults: {model: "tiny:llama", profile: cpu-16gb, steps: 1, batch_size: 2,
           max_length: 48, eval_examples: 6}
search:
  lr: {default: [0.01, 0.001], fo-adam: [0.001]}
  eps: [0.01]
cells:
  - {tasks: [sst2], optimizers: [zo-sgd, fo-adam], schemes: [full]}
studies:
  - {name: queries, base: {task: sst2, optimizer: zo-sgd, scheme: full}, vary: {q: [2]}}
"""


@pytest.fixture
def mini(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEZO_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "mini.yaml"
    path.write_text(MINI)
    return load_suite(str(path))


def test_shipped_suites_load_and_expand():
    assert {"smoke", "cpu-standard", "paper"} <= set(list_suites())
    for name in list_suites():
        runs = load_suite(name).runs()
        assert len({(r.key, r.group) for r in runs}) == len(runs)
    std = load_suite("cpu-standard").runs()
    cells = {r.cell for r in std if r.group == "cell"}
    # every optimizer x every scheme on SST-2, and three more tasks with LoRA
    assert len([c for c in cells if c.startswith("sst2/")]) == 8 * 4
    assert {c.split("/")[0] for c in cells} == {"sst2", "copa", "winogrande", "multirc"}
    assert {r.group for r in std} >= {"task alignment", "queries", "block-wise", "sparsity",
                                       "hybrid ZO/FO"}


def test_grid_is_per_optimizer_and_fo_runs_have_no_eps(mini):
    runs = mini.runs()
    lrs = {(r.settings["optimizer"], r.settings["lr"]) for r in runs if r.group == "cell"}
    assert lrs == {("zo-sgd", 0.01), ("zo-sgd", 0.001), ("fo-adam", 0.001)}
    assert all("eps" not in r.settings for r in runs if r.settings["optimizer"] == "fo-adam")
    assert [r.settings["q"] for r in runs if r.group == "queries"] == [2, 2]


@pytest.mark.parametrize("text, message", [
    ("name: x\nbogus: 1\n", "unknown key 'bogus'"),
    ("name: x\ncells: [{tasks: [sst2], optimizers: [], schemes: [full]}]\n",
     "'optimizers' must be a non-empty list"),
    ("name: x\nstudies: [{name: s, base: {task: sst2}, vary: {q: [1]}}]\n",
     "must name task, optimizer and scheme"),
])
def test_bad_suites_say_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_suite(str(path))
    with pytest.raises(ConfigError, match="shipped suites"):
        load_suite("no-such-suite")


def row(cell, lr, val, test, grp="cell", **kw):
    return {"key": f"{cell}{lr}", "grp": grp, "cell": cell, "task": "sst2", "model": "m",
            "optimizer": cell.split("/")[2], "scheme": cell.split("/")[3], "lr": lr,
            "eps": 1e-3, "status": "ok", "val_accuracy": val, "test_accuracy": test,
            "peak_bytes": 2**20, "step_s": 0.1, "forward_passes": 1, "losses": [1.0],
            "code_version": "t"} | kw


def test_selection_uses_validation_never_test():
    rows = [row("sst2/m/zo-sgd/full", 1e-3, val=0.70, test=0.95),  # best test, worse val
            row("sst2/m/zo-sgd/full", 1e-4, val=0.80, test=0.60),
            {**row("sst2/m/zo-sgd/full", 1e-5, val=0, test=0), "status": "failed",
             "error": "boom"}]
    chosen = select(rows)
    assert chosen[("cell", "sst2/m/zo-sgd/full")]["lr"] == 1e-4
    text = markdown(rows)
    assert "| zo-sgd | 60.0 |" in text and "95.0" not in text
    assert "failed" in text and "boom" in text


def test_interrupted_suite_resumes_without_rerunning(mini, tmp_path, data_dir):
    store = Store(tmp_path / "runs.db")
    ran, stored = run_suite(mini, store, data_dir=data_dir, max_runs=2)
    assert (ran, stored) == (2, 0)
    ran, stored = run_suite(mini, store, data_dir=data_dir)
    assert (ran, stored) == (len(mini.runs()) - 2, 2)
    rows = store.rows()
    assert len(rows) == len(mini.runs()) and all(r["status"] == "ok" for r in rows)
    r = rows[0]  # a row carries every setting, the report and the code version
    assert r["settings"]["steps"] == 1 and r["report"]["hyperparameters"]["batch_size"] == 2
    assert r["code_version"].startswith("0.")
    assert run_suite(mini, store, data_dir=data_dir) == (0, len(rows))
    store.close()


def test_shards_partition_the_runs_and_merge(mini, tmp_path, data_dir):
    runs = mini.runs()
    parts = [shard_runs(runs, (i, 2)) for i in range(2)]
    assert sorted(r.key + r.group for p in parts for r in p) == sorted(
        r.key + r.group for r in runs)
    dbs = []
    for i in range(2):
        store = Store(tmp_path / f"shard{i}.db")
        run_suite(mini, store, shard=(i, 2), data_dir=data_dir)
        store.close()
        dbs.append(tmp_path / f"shard{i}.db")
    merged = Store(tmp_path / "all.db")
    assert sum(merged.merge(d) for d in dbs) == len(runs)
    assert merged.merge(dbs[0]) == 0  # merging again adds nothing
    assert len(merged.rows()) == len(runs)
    merged.close()


@pytest.mark.slow
def test_smoke_suite_from_the_command_line(tmp_path, data_dir, monkeypatch):
    """What CI runs: the whole smoke suite, its tables and plots."""
    from edgezo.cli.main import app

    monkeypatch.setenv("EDGEZO_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "smoke"
    result = CliRunner().invoke(app, ["bench", "--suite", "smoke", "--results", str(out),
                                      "--data-dir", data_dir])
    assert result.exit_code == 0, result.output
    tables = (out / "tables.md").read_text()
    assert "### sst2, tiny:llama" in tables and "### Study: sparsity" in tables
    assert (out / "accuracy_vs_memory.png").stat().st_size > 1000
    assert (out / "loss_curves_sst2.png").is_file()
    n = sqlite3.connect(out / "runs.db").execute("SELECT COUNT(*) FROM runs").fetchone()[0]
    assert n == len(load_suite("smoke").runs())
    selected = json.loads((out / "selected.json").read_text())
    assert len(selected) == len({(r.group, r.cell) for r in load_suite("smoke").runs()})
    again = CliRunner().invoke(app, ["bench", "--suite", "smoke", "--results", str(out),
                                     "--data-dir", data_dir])
    assert "0 runs now" in again.output


def test_a_cell_can_carry_its_own_search(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: s\nsearch: {lr: {default: [1.0e-5]}, eps: [0.001]}\ncells:\n"
                    "  - {tasks: [sst2], optimizers: [zo-sgd], schemes: [full]}\n"
                    "  - {tasks: [sst2], optimizers: [zo-sgd], schemes: [lora],\n"
                    "     search: {lr: {default: [1.0e-4, 1.0e-3]}}}\n")
    lrs = {(r.settings["scheme"], r.settings["lr"], r.settings["eps"])
           for r in load_suite(str(path)).runs()}
    assert lrs == {("full", 1e-5, 1e-3), ("lora", 1e-4, 1e-3), ("lora", 1e-3, 1e-3)}


def test_table_layout_follows_the_suite_once_per_name():
    rows = [row("sst2/m/zo-sgd/full", 1e-3, 0.7, 0.7), row("sst2/m/zo-sgd/lora", 1e-3, 0.6, 0.6),
            row("sst2/m/fo-sgd/full", 1e-3, 0.8, 0.8)]
    text = markdown(rows, {"optimizers": ["fo-sgd", "zo-sgd", "fo-sgd", "zo-sgd"],
                           "schemes": ["full", "lora", "full"]})
    first = text.split("**Validation")[0]
    assert "| | full | lora |" in first and first.count("| zo-sgd |") == 1
    assert first.index("| fo-sgd |") < first.index("| zo-sgd |")


def test_tables_only_refuses_run_options():
    from edgezo.cli.main import app

    result = CliRunner().invoke(app, ["bench", "--suite", "smoke", "--tables-only",
                                      "--max-runs", "1"])
    assert result.exit_code == 2 and "runs nothing" in result.output


def test_a_generative_tasks_tables_name_its_metric():
    rows = [row("squad/m/zo-sgd/full", 1e-3, 0.3, 0.25, task="squad"),
            row("sst2/m/zo-sgd/full", 1e-3, 0.7, 0.7)]
    squad, sst2 = markdown(rows).split("### sst2")
    assert "**Test F1 (%)" in squad and "**Validation F1 (%)" in squad
    assert "**Test accuracy (%)" in sst2 and "F1" not in sst2


def test_a_suite_runs_a_generative_task_and_selects_on_its_f1(tmp_path, data_dir, monkeypatch):
    """SQuAD in a suite: each run writes answers, scores them by F1, and the selection
    reads that score (the shipped `squad` suite is this at full size)."""
    monkeypatch.setenv("EDGEZO_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "gen.yaml"
    path.write_text("name: gen\ndefaults: {model: 'tiny:llama', profile: cpu-16gb, steps: 1,\n"
                    "  batch_size: 2, eval_examples: 3}\n"
                    "search: {lr: {default: [0.01, 0.001]}, eps: [0.01]}\n"
                    "cells:\n  - {tasks: [squad], optimizers: [zo-sgd], schemes: [lora]}\n")
    store = Store(tmp_path / "runs.db")
    assert run_suite(load_suite(str(path)), store, data_dir=data_dir) == (2, 0)
    rows = store.rows()
    store.close()
    assert all(r["status"] == "ok" and r["report"]["metric"] == "f1" for r in rows)
    (chosen,) = select(rows).values()
    assert chosen["val_accuracy"] == max(r["val_accuracy"] for r in rows)
    assert "squad" in load_suite("squad").runs()[0].cell
