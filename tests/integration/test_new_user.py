"""What a new user trips on: evaluating a LoRA run (or a run folder) as the README shows,
error messages that keep their brackets, an ONNX export that says what it is doing, the
ONNX example reading data and prompts as edgezo does, `plan` and `finetune` figures that
agree, and one `--eval-examples` for eval and finetune."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import peft
import pytest
import torch
from conftest import REPO
from edgezo.cli.main import app
from safetensors.torch import load_file
from typer.testing import CliRunner

from edgezo.tasks.make import make_task

ROOT = REPO
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def flat(text: str) -> str:
    """Output with rich's line wrapping undone."""
    return " ".join(text.split())


def last_json(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def lora_run(tiny_folder, data_dir, tmp_path_factory) -> Path:
    """A LoRA run trained with the `aligned` prompt (not the task's default)."""
    run = tmp_path_factory.mktemp("lora") / "run"
    result = invoke("finetune", "--model", tiny_folder, "--data-dir", data_dir, "--steps", 2,
                    "--batch-size", 4, "--scheme", "lora", "--dtype", "fp32", "--lr", 0.05,
                    "--template", "aligned", "--eval-examples", 8, "--no-eval-before",
                    "--output", run)
    assert result.exit_code == 0, result.output
    assert (run / "model" / "adapter_config.json").is_file()
    assert not (run / "model" / "config.json").is_file()
    return run


@pytest.fixture(scope="module")
def onnx_export(lora_run, tmp_path_factory) -> tuple[Path, str]:
    """The LoRA run exported as ONNX by the CLI (the exporter takes ~10 s): the folder and
    what the command printed."""
    out = tmp_path_factory.mktemp("onnx")
    result = invoke("export", lora_run, "--format", "onnx", "--output", out)
    assert result.exit_code == 0, result.output
    return out, result.output


def onnx_example():
    spec = importlib.util.spec_from_file_location("onnx_predict",
                                                  ROOT / "examples" / "onnx_predict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- eval of a LoRA run, and of a run folder ----------------------------------------------

def test_eval_takes_a_lora_runs_model_folder_or_the_run_folder(lora_run, data_dir):
    """The README's `edgezo eval --model runs/x/model` for a LoRA run (an adapter folder,
    no config.json), and `--model runs/x`, score the same, with the run's own prompt."""
    scores = []
    for model in (lora_run / "model", lora_run):
        result = invoke("eval", "--model", model, "--data-dir", data_dir, "--split",
                        "validation", "--eval-examples", 8)
        assert result.exit_code == 0, result.output
        out = flat(result.output)
        assert "template aligned, as the model was trained" in out
        assert "lora adapter" in out and "on base" in out
        scores.append(re.search(r"accuracy (\d\.\d+) on 8 examples", out).group(1))
    assert scores[0] == scores[1]
    as_json = invoke("eval", "--model", lora_run, "--data-dir", data_dir, "--split",
                     "validation", "--eval-examples", 8, "--json")
    assert as_json.exit_code == 0, as_json.output
    assert last_json(as_json.output)["examples"] == 8


def test_the_eval_session_holds_the_saved_adapter(lora_run, data_dir):
    """The adapter eval loads is the one the run saved (not a fresh, untrained one), and
    the model computes what export's load_run (peft's own loader) computes."""
    from edgezo.cli.talk import open_eval_session

    from edgezo.export.run import load_run

    saved = load_file(lora_run / "model" / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in saved.items())
    session, info = open_eval_session({"model": str(lora_run), "data_dir": data_dir,
                                       "template": "aligned", "dtype": "fp32"})
    try:
        assert info["scheme"] == "lora" and info["folder"] == str(lora_run / "model")
        held = peft.get_peft_model_state_dict(session.model)
        assert held.keys() == saved.keys()
        for k, v in saved.items():
            torch.testing.assert_close(held[k].float().cpu(), v.float(), atol=0, rtol=0)
        reference = load_run(lora_run)[0]
        ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        with torch.no_grad():
            ours = session.model(input_ids=ids.to(session.device),
                                 attention_mask=mask.to(session.device)).logits
            theirs = reference(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(ours.float().cpu(), theirs.float(), atol=1e-4, rtol=0)
    finally:
        session.close()


def test_eval_takes_a_peft_export_without_its_run(lora_run, data_dir, tmp_path):
    """`edgezo export --format peft` writes only the adapter and the tokenizer: the base
    named in adapter_config.json is loaded under it."""
    out = tmp_path / "peft"
    assert invoke("export", lora_run, "--format", "peft", "--output", out).exit_code == 0
    result = invoke("eval", "--model", out, "--data-dir", data_dir, "--split", "validation",
                    "--eval-examples", 4, "--template", "aligned", "--json")
    assert result.exit_code == 0, result.output
    assert last_json(result.output)["examples"] == 4


def test_eval_takes_a_full_runs_folder(tiny_folder, data_dir, tmp_path):
    run = tmp_path / "run"
    trained = invoke("finetune", "--model", tiny_folder, "--data-dir", data_dir, "--steps", 1,
                     "--batch-size", 4, "--template", "aligned", "--eval-examples", 8,
                     "--no-eval-before", "--output", run)
    assert trained.exit_code == 0, trained.output
    result = invoke("eval", "--model", run, "--data-dir", data_dir, "--split", "validation",
                    "--eval-examples", 8)
    assert result.exit_code == 0, result.output
    assert "template aligned, as the model was trained" in flat(result.output)
    # a run folder without its model says how to get one
    unsaved = tmp_path / "unsaved"
    assert invoke("finetune", "--model", tiny_folder, "--data-dir", data_dir, "--steps", 1,
                  "--batch-size", 4, "--eval-examples", 4, "--no-eval-before",
                  "--no-save-model", "--output", unsaved).exit_code == 0
    missing = invoke("eval", "--model", unsaved, "--data-dir", data_dir)
    assert missing.exit_code == 2, missing.output
    assert "edgezo replay" in flat(missing.output) and "Traceback" not in missing.output


# -- eval --eval-examples -----------------------------------------------------------------

def test_eval_takes_eval_examples_and_still_the_hidden_max_examples(tiny_folder, data_dir):
    new = invoke("eval", "--model", tiny_folder, "--data-dir", data_dir, "--split",
                 "validation", "--eval-examples", 8, "--json")
    assert new.exit_code == 0, new.output
    assert last_json(new.output)["examples"] == 8
    old = invoke("eval", "--model", tiny_folder, "--data-dir", data_dir, "--split",
                 "validation", "--max-examples", 8, "--json")
    assert old.exit_code == 0, old.output
    assert last_json(old.output)["examples"] == 8
    assert "--max-examples is deprecated" in flat(old.stderr)
    both = invoke("eval", "--model", tiny_folder, "--max-examples", 8, "--eval-examples", 4)
    assert both.exit_code == 2 and "--eval-examples" in flat(both.output)
    shown = flat(invoke("eval", "--help").output)
    assert "--eval-examples" in shown and "--max-examples" not in shown


# -- errors keep their brackets; export says what it does ----------------------------------

def test_error_messages_are_printed_as_written():
    """Rich markup would eat `[export]` (and fail on a stray `[/]`)."""
    import typer
    from edgezo.cli.main import user_errors

    from edgezo.errors import EdgezoError

    @user_errors
    def fails():
        raise EdgezoError("pip install 'edgezo[export]' [bold]x[/] [/]")

    cmd = typer.Typer()
    cmd.command()(fails)
    result = runner.invoke(cmd, [])
    assert result.exit_code == 2
    assert "pip install 'edgezo[export]' [bold]x[/] [/]" in result.output


def test_an_error_outside_a_command_body_is_printed_as_written(monkeypatch, capsys):
    import edgezo.cli.main as cli

    from edgezo.errors import EdgezoError

    def app():
        raise EdgezoError("pip install 'edgezo[export]'")

    monkeypatch.setattr(cli, "app", app)
    with pytest.raises(SystemExit) as stopped:
        cli.main()
    assert stopped.value.code == 2
    assert "pip install 'edgezo[export]'" in flat(capsys.readouterr().err)


def test_onnx_export_without_the_extra_names_the_extra(monkeypatch, lora_run, tmp_path):
    for name in ("onnx", "onnxscript"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails, as when not installed
    result = invoke("export", lora_run, "--format", "onnx", "--output", tmp_path / "o")
    assert result.exit_code == 2, result.output
    assert "pip install 'edgezo[export]'" in flat(result.output)
    assert "loading" not in result.output  # refused before the model is loaded


@pytest.mark.slow
def test_onnx_export_says_what_it_does_and_how_long_it_took(onnx_export):
    folder, output = onnx_export
    out = flat(output)
    tracing = out.index("tracing it to ONNX")
    wrote = out.index("wrote onnx export")
    assert out.index("loading the run's model") < tracing < wrote
    assert re.search(r"wrote onnx export of .* in \d+(\.\d)? s", out)
    meta = json.loads((folder / "edgezo.json").read_text())
    assert meta["task"] == "sst2" and meta["template"] == "aligned"


# -- examples/onnx_predict.py -------------------------------------------------------------

def test_onnx_example_finds_data_as_edgezo_does(onnx_export, data_dir, monkeypatch, tmp_path,
                                                capsys):
    """No --data-dir: $EDGEZO_DATA_DIR (then edgezo's other places), from any folder."""
    folder, _ = onnx_export
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EDGEZO_DATA_DIR", data_dir)
    example = onnx_example()
    accuracy = example.main([str(folder), "--max-examples", "8"])
    assert 0.0 <= accuracy <= 1.0
    assert "template aligned" in flat(capsys.readouterr().out)


def test_onnx_example_scores_with_the_runs_prompt_else_the_tasks_default(onnx_export,
                                                                         data_dir, tmp_path):
    folder, _ = onnx_export
    example = onnx_example()
    assert example.trained_template(folder, "sst2") == "aligned"
    assert example.trained_template(folder, "copa") is None  # another task's prompt
    assert example.trained_template(tmp_path, "sst2") is None  # no metadata
    for template in ("aligned", "auto"):
        rows = example.read_task("sst2", data_dir, 6, template=template)
        want = make_task("sst2", data_dir, template=template).split("test")[:6]
        assert [(p, tuple(c), g) for p, c, g in rows] == \
            [(ex.prompt, ex.candidates, ex.gold) for ex in want]
    assert make_task("sst2", data_dir).template == "movie"
    assert example.read_task("sst2", data_dir, 1)[0][0].startswith("Movie review: ")


# -- plan and finetune agree ----------------------------------------------------------------

def test_plan_and_finetune_print_consistent_figures(tiny_folder, tmp_path):
    """finetune prints the plan's peak of the tensors (what it measures, on a CPU that
    emulates a GPU profile); plan prints that peak too, and says what its total adds: the
    CUDA context, and its --max-length default where finetune measures the task's rows."""
    task = tmp_path / "small.jsonl"  # same-length rows: one width for train and eval
    task.write_text("\n".join(json.dumps({"input": f"a great film number {i}", "label": i % 2,
                                          "candidates": [" terrible", " great"]})
                              for i in range(30)))
    run = tmp_path / "run"
    tuned = invoke("finetune", "--model", tiny_folder, "--task", task, "--steps", 1,
                   "--batch-size", 4, "--eval-examples", 4, "--no-eval-before",
                   "--no-save-model", "--profile", "8gb-gpu", "--output", run)
    assert tuned.exit_code == 0, tuned.output
    report = json.loads((run / "report.json").read_text())
    width = report["plan"]["seq_len"]
    assert report["plan"]["eval_shape"]["seq_len"] == width
    printed = re.search(r"Plan: predicted peak (\d+\.\d\d) GiB", flat(tuned.output)).group(1)

    args = ("plan", "--model", tiny_folder, "--batch-size", 4, "--profile", "8gb-gpu")
    as_json = invoke(*args, "--seq-len", width, "--json")
    assert as_json.exit_code == 0, as_json.output
    plan = json.loads(as_json.output)["plan"]
    assert plan["peak_bytes"] == report["predicted_peak_memory_bytes"]
    shown = invoke(*args, "--seq-len", width)
    assert shown.exit_code == 0, shown.output
    out = flat(shown.output)
    gib = 1024**3
    peak = re.search(r"tensors' peak │ (\d+\.\d+) \(finetune's 'predicted peak'", out)
    assert peak and peak.group(1) == f"{plan['peak_bytes'] / gib:.3f}"
    assert f"{plan['peak_bytes'] / gib:.2f}" == printed
    assert f"predicted peak {printed} GiB (+ " in out  # finetune's words, and what they leave out
    context = plan["runtime_overhead_bytes"]
    assert context > 0 and f"{context / gib:.3f}" in out
    assert f"{(plan['peak_bytes'] + context) / gib:.3f} of" in out  # the total, explained
    if not torch.cuda.is_available():
        assert "no CUDA context on this CPU, which emulates the profile" in out
    # without --seq-len the plan prices --max-length tokens, and says so
    default = flat(invoke(*args).output)
    assert "256 (--max-length" in default and "--seq-len" in default


def test_finetune_says_what_the_budget_check_adds_to_its_peak(tiny_folder, data_dir, tmp_path):
    tuned = invoke("finetune", "--model", tiny_folder, "--data-dir", data_dir, "--steps", 1,
                   "--batch-size", 4, "--eval-examples", 4, "--no-eval-before",
                   "--no-save-model", "--profile", "8gb-gpu", "--output", tmp_path / "run")
    assert tuned.exit_code == 0, tuned.output
    assert "CUDA context" in flat(tuned.output)
