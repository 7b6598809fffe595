"""The command line: clean errors (exit 2, no traceback) and a full tiny fine-tune."""

import json

import pytest
from edgezo.cli.main import app
from typer.testing import CliRunner

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, list(args))


@pytest.mark.parametrize("args, needle", [
    (["finetune", "--profile", "9gb-gpu"], "unknown profile '9gb-gpu'; valid profiles"),
    (["finetune", "--task", "imdb"], "unknown task 'imdb'; valid tasks: <file>.jsonl"),
    (["finetune", "--model", "./no/such/folder"], "is not a model folder"),
    (["finetune", "--model", "missing.gguf"], "GGUF file missing.gguf does not exist"),
    (["finetune", "--optimizer", "adamw"], "hizoo-l, zo-adam, zo-sgd"),
    (["finetune", "--scheme", "adapter"], "valid schemes: full, head"),
    (["eval", "--split", "dev"], "valid splits: train, validation, test"),
])
def test_user_errors_exit_2_with_a_message(args, needle):
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert needle in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_bad_dtype_lists_valid_ones(tiny_folder, data_dir):
    result = invoke("finetune", "--model", tiny_folder, "--dtype", "int4",
                    "--data-dir", data_dir, "--steps", "1")
    assert result.exit_code == 2 and "valid dtypes: bf16, fp16, fp32" in result.output


def test_profiles_list_and_show():
    listed = invoke("profiles", "list")
    assert listed.exit_code == 0 and "jetson-orin-8gb" in listed.output
    shown = invoke("profiles", "show", "8gb-gpu")
    assert shown.exit_code == 0 and "device_memory_gb: 8" in shown.output


def test_finetune_writes_report_and_metrics(tiny_folder, data_dir, tmp_path):
    out = tmp_path / "run"
    result = invoke("finetune", "--model", tiny_folder, "--data-dir", data_dir, "--steps", "3",
                    "--batch-size", "4", "--lr", "0.01", "--eval-every", "2",
                    "--output", str(out))
    assert result.exit_code == 0, result.output
    assert "emulating profile 8gb-gpu" in result.output or "Running on cuda" in result.output
    # the header names the prompt the run took, since the default is chosen per task
    assert "Task sst2: template movie (the task's default" in " ".join(result.output.split())
    report = json.loads((out / "report.json").read_text())
    assert report["splits"]["template"] == "movie"
    for key in ("model", "task", "optimizer", "scheme", "profile", "steps", "seed",
                "hyperparameters", "accuracy_before", "test_accuracy", "validation_accuracy",
                "peak_memory_bytes", "predicted_peak_memory_bytes", "step_time_s",
                "forward_passes_per_step", "device"):
        assert key in report, key
    assert report["steps"] == 3 and report["hyperparameters"]["lr"] == 0.01
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert "validation_accuracy" in rows[1] and "validation_accuracy" not in rows[0]
    assert (out / "model" / "model.safetensors").is_file()


def test_eval_command(tiny_folder, data_dir):
    result = invoke("eval", "--model", tiny_folder, "--data-dir", data_dir, "--split",
                    "validation", "--max-examples", "16", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["examples"] == 16


def test_lora_finetune_then_export_both_formats(tiny_folder, data_dir, tmp_path):
    run = tmp_path / "run"
    result = invoke("finetune", "--model", tiny_folder, "--data-dir", data_dir, "--steps", "2",
                    "--batch-size", "4", "--scheme", "lora", "--dtype", "fp32", "--output",
                    str(run))
    assert result.exit_code == 0, result.output
    for fmt in ("peft", "merged"):
        out = tmp_path / fmt
        exported = invoke("export", str(run), "--format", fmt, "--output", str(out))
        assert exported.exit_code == 0, exported.output
    assert (tmp_path / "peft" / "adapter_config.json").is_file()
    assert (tmp_path / "merged" / "config.json").is_file()
    bad = invoke("export", str(run), "--format", "tflite", "--output", str(tmp_path / "x"))
    assert bad.exit_code == 2 and "valid formats: gguf, merged, onnx, peft" in bad.output


def test_report_writes_markdown_json_and_a_plot(tiny_folder, data_dir, tmp_path):
    run = tmp_path / "run"
    task = tmp_path / "small.jsonl"  # 30 rows: the evaluations stay short
    task.write_text("\n".join(json.dumps({"input": f"a great film {i}", "label": i % 2,
                                          "candidates": [" terrible", " great"]})
                              for i in range(30)))
    finetuned = invoke("finetune", "--model", tiny_folder, "--task", str(task), "--steps", "2",
                       "--batch-size", "4", "--no-save-model", "--output", str(run),
                       "--profile", "cpu-16gb")  # a CPU run also where a GPU is visible
    assert finetuned.exit_code == 0, finetuned.output
    result = invoke("report", str(run))
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "memory.json").read_text())
    assert summary["predicted_components"]["weights"] > 0
    assert set(summary["measured_peak_by_phase"]) >= {"load", "train", "eval"}
    md = (run / "memory.md").read_text()
    assert "| phase | predicted | measured | measured / predicted |" in md
    assert set(summary["predicted_peak_by_phase"]) == {"train", "eval"}
    assert (run / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["measured_reserved_peak_by_phase"] == {}  # a CPU run has none
    assert "reserved" not in md
    missing = invoke("report", str(tmp_path / "nothing"))
    assert missing.exit_code == 2 and "no report.json" in " ".join(missing.output.split())
    # a CUDA run's report also gives the allocator's reserved peak per phase
    report = json.loads((run / "report.json").read_text())
    phases = report["peak_memory_by_phase"]
    report["reserved_peak_memory_by_phase"] = {k: v + (8 << 20) for k, v in phases.items()}
    (run / "report.json").write_text(json.dumps(report))
    assert invoke("report", str(run)).exit_code == 0
    md = (run / "memory.md").read_text()
    assert "| measured / predicted | reserved (CUDA) |" in md
    summary = json.loads((run / "memory.json").read_text())
    assert summary["measured_reserved_peak_by_phase"]["train"] == phases["train"] + (8 << 20)


def test_eval_scores_a_saved_model_with_the_template_it_was_trained_with(tiny_folder, data_dir,
                                                                        tmp_path):
    """A model trained with one prompt and scored with another can read as untrained."""
    run = tmp_path / "run"
    trained = invoke("finetune", "--model", tiny_folder, "--data-dir", data_dir, "--steps", "1",
                     "--batch-size", "4", "--template", "aligned", "--eval-examples", "8",
                     "--no-eval-before", "--output", str(run))
    assert trained.exit_code == 0, trained.output

    def scored(*extra):
        result = invoke("eval", "--model", str(run / "model"), "--data-dir", data_dir,
                        "--split", "validation", "--max-examples", "8", *extra)
        assert result.exit_code == 0, result.output
        return result.output

    assert "template aligned, as the model was trained" in scored()
    assert "as the model was trained" not in scored("--template", "natural")
    assert "as the model was trained" not in scored("--task", "copa")  # another task
