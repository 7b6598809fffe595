"""RunConfig: one source for every option; recipes; the rules between options; bad input
that must end in a message (exit 2), never a traceback."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO
from edgezo.cli.main import app
from typer.testing import CliRunner

from edgezo.config.options import FIELDS, RESUMABLE, SECTION_OF
from edgezo.config.runconfig import RunConfig
from edgezo.errors import CheckpointError, ConfigError, EdgezoError, ProfileError, TaskError

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_round_trips_through_json_and_yaml():
    cfg = RunConfig.from_flat(scheme="lora", lora_r=4, lora_targets=["q_proj", "v_proj"],
                              optimizer="zo-adam", betas=(0.8, 0.99), lr=1e-3, q=2,
                              fo_blocks=["head"], steps=7, output="runs/x")
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert RunConfig.from_dict(yaml.safe_load(cfg.to_yaml())) == cfg
    assert RunConfig.from_dict(cfg.flat()) == cfg  # run.json of earlier versions: flat


def test_names_are_unique_and_every_field_explains_itself():
    assert len(SECTION_OF) == len(FIELDS)
    for name, f in FIELDS.items():
        assert len(f.metadata["help"]) > 15, name
    assert {"data_dir", "eval_batch_size", "steps", "check_budget", "offload_dir",
            "strict_memory"} <= RESUMABLE
    assert "lr" not in RESUMABLE and "seed" not in RESUMABLE


@pytest.mark.parametrize("spelling, canonical", [
    ("bfloat16", "bf16"), ("torch.bfloat16", "bf16"), ("float16", "fp16"),
    ("torch.float32", "fp32"), ("FP32", "fp32"), ("bf16", "bf16")])
def test_dtype_aliases(spelling, canonical):
    assert RunConfig.from_flat(dtype=spelling).validate().model.dtype == canonical


def test_values_are_coerced_or_refused_by_name():
    cfg = RunConfig.from_dict({"optimizer": {"lr": "1e-5", "betas": "0.9,0.99"},
                               "data": {"batch_size": 8.0}, "fo_blocks": "head,-1"})
    assert cfg.optimizer.lr == 1e-5 and cfg.optimizer.betas == (0.9, 0.99)
    assert cfg.data.batch_size == 8 and cfg.estimator.fo_blocks == ["head", "-1"]
    with pytest.raises(ConfigError, match="option batch_size takes int, got 1.5"):
        RunConfig.from_flat(batch_size=1.5)
    with pytest.raises(ConfigError, match="unknown option 'learning_rate'"):
        RunConfig.from_flat(learning_rate=1e-3)
    with pytest.raises(ConfigError, match="section 'data' has no option 'lr'"):
        RunConfig.from_dict({"data": {"lr": 1e-3}})


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        RunConfig.from_flat(batch_size=0, q=0, lr=float("nan")).validate()
    text = str(err.value)
    assert text.startswith("3 problems")
    for needle in ("batch_size must be >= 1", "q must be >= 1", "lr must be a finite"):
        assert needle in text


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_loads_and_validates(recipe):
    cfg = RunConfig.from_file(recipe).validate()
    assert cfg != RunConfig()


def test_print_config_writes_a_complete_commented_recipe_that_loads_back(tmp_path):
    result = invoke("finetune", "--config", RECIPES[0], "--lr", "0.002", "--print-config")
    assert result.exit_code == 0, result.output
    assert result.output.count("  # ") == len(FIELDS)  # every option, with its help
    saved = tmp_path / "run.yaml"
    saved.write_text(result.output)
    cfg = RunConfig.from_file(saved)
    assert cfg == RunConfig.from_file(RECIPES[0]).override(lr=0.002)  # the flag wins


def test_a_bad_recipe_is_a_message(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optimizer:\n  lr: fast\n")
    result = invoke("finetune", "--config", bad, "--print-config")
    assert result.exit_code == 2 and "option lr takes float" in result.output
    bad.write_bytes(b"optimizer:\n  lr: 1e-3 \xff\xfe\n")
    result = invoke("finetune", "--config", bad)
    assert result.exit_code == 2 and "not UTF-8" in result.output


# -- bad input that used to end in a traceback ------------------------------------------

@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_non_finite_profile_values_name_the_field(tmp_path, value):
    from edgezo.device.profiles import load_profile

    path = tmp_path / "p.yaml"
    path.write_text(f"name: p\ndevice: cpu\ndevice_memory_gb: {value}\nhost_memory_gb: 4\n"
                    "host_device_bandwidth_gbps: 1\ndtype: fp32\nheadroom: 0.1\n")
    with pytest.raises(ProfileError, match="'device_memory_gb' must be a finite number"):
        load_profile(str(path))


def test_files_that_are_not_utf8_are_named(tmp_path):
    from edgezo.device.profiles import load_profile
    from edgezo.tasks.user import UserTask

    profile = tmp_path / "p.yaml"
    profile.write_bytes(b"name: p\xff\n")
    with pytest.raises(ProfileError, match="not UTF-8"):
        load_profile(str(profile))
    rows = tmp_path / "rows.jsonl"
    good = json.dumps({"input": "a", "candidates": [" x", " y"], "label": 0}).encode()
    rows.write_bytes(good + b"\n" + good.replace(b'"a"', b'"\xe9"') + b"\n")
    with pytest.raises(TaskError, match=r"rows.jsonl, line 2: not UTF-8"):
        UserTask(rows).split("train")
    spec = tmp_path / "spec.yaml"
    spec.write_bytes(b"train: rows.jsonl\ntemplate: \xff\n")
    with pytest.raises(TaskError, match="not UTF-8"):
        UserTask(spec)


def test_every_yaml_the_user_names_reports_a_parse_error_with_its_file(tmp_path):
    """Profiles, task specs and recipes are read by one reader: a broken file is the
    reader's message with the path, in the error class of what was being loaded."""
    from edgezo.config.values import read_config_file
    from edgezo.device.profiles import load_profile
    from edgezo.tasks.user import UserTask

    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    for load, error in ((lambda: load_profile(str(broken)), ProfileError),
                        (lambda: UserTask(broken), TaskError),
                        (lambda: read_config_file(broken), ConfigError)):
        with pytest.raises(error, match=r"(?s)broken.yaml: not valid YAML \(.*line"):
            load()
    with pytest.raises(ConfigError, match="missing.yaml does not exist"):
        read_config_file(tmp_path / "missing.yaml")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert read_config_file(empty) == {}


def test_a_task_spec_with_a_list_of_train_files_is_a_message(tmp_path):
    from edgezo.tasks.user import UserTask

    spec = tmp_path / "spec.yaml"
    spec.write_text("train: [a.jsonl, b.jsonl]\n")
    with pytest.raises(TaskError, match="field 'train' must be one string"):
        UserTask(spec)


def _session(tiny_folder, data_dir, **kw):
    from edgezo.run.session import Session

    base = dict(profile="cpu-16gb", batch_size=2, lr=0.02, eps=1e-2, max_length=48,
                data_dir=data_dir, check_budget=False)
    return Session(tiny_folder, **{**base, **kw})


def test_a_snapshot_of_another_model_is_a_message(tiny_folder, data_dir, tmp_path):
    from edgezo.run import folder as runs
    from edgezo.run.snapshots import load_snapshot, snapshots

    s = _session(tiny_folder, data_dir)
    s.record(tmp_path / "run")
    s.step()
    snap = s.checkpoint()
    s.close()
    other = _session(tiny_folder, data_dir, scheme="lora")
    weights, state = load_snapshot(snap)
    try:
        with pytest.raises(CheckpointError, match="belongs to another model or scheme"):
            runs.restore(other, weights, state, {"step": 1})
    finally:
        other.close()
    lora = _session(tiny_folder, data_dir, scheme="lora", lora_r=4)
    lora.record(tmp_path / "lora")
    lora.step()
    small = load_snapshot(lora.checkpoint())
    lora.close()
    wide = _session(tiny_folder, data_dir, scheme="lora", lora_r=8)
    try:
        with pytest.raises(CheckpointError, match="another shape"):
            runs.restore(wide, *small, {"step": 1})
    finally:
        wide.close()
    assert snapshots(tmp_path / "run")


def test_a_damaged_log_line_that_a_snapshot_covers_does_not_block_resume(
        tiny_folder, data_dir, tmp_path):
    from edgezo.run.session import Session

    run = tmp_path / "run"
    s = _session(tiny_folder, data_dir)
    s.record(run)
    for _ in range(3):
        s.step()
    s.checkpoint()
    s.step()
    s.step()
    s.engine.flush()
    expected = [p.detach().clone() for p in s.engine.blocks.params]
    s.close()
    log = run / "seedlog.jsonl"
    lines = log.read_bytes().splitlines()
    lines[1] = lines[1][:20] + b"\x00garbage"  # step 1: before the step-3 snapshot
    log.write_bytes(b"\n".join(lines) + b"\n")
    resumed = Session.resume(run)
    try:
        assert resumed.engine.step_index == 5
        assert all(torch.equal(p, e) for p, e in zip(resumed.model.parameters(), expected,
                                                     strict=True))
    finally:
        resumed.close()
    lines[3] = b"{broken"  # step 3: after the snapshot, needed to get to step 5
    log.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(CheckpointError, match="lacks step 3"):
        Session.resume(run)


def test_a_diverging_run_stops_and_goes_back_to_its_last_sound_weights(
        tiny_folder, data_dir, tmp_path):
    """--lr 1e30: the first update saturates the model; every later estimate is exactly
    0 and the loss sits at ln 2. The run stops, goes back to the start (its step-0
    snapshot), saves that, and says to lower --lr."""
    from edgezo.run.snapshots import snapshots
    from edgezo.run.train import finetune

    s = _session(tiny_folder, data_dir, lr=1e30)
    start = [p.detach().clone() for p in s.engine.blocks.params]
    out = tmp_path / "run"
    with pytest.raises(EdgezoError, match=r"Lower --lr \(now 1e\+30\).*went back to step 0"):
        finetune(s, 40, output=str(out), console=_quiet())
    assert s.engine.step_index == 0
    assert all(torch.equal(p, e) for p, e in zip(s.engine.blocks.params, start, strict=True))
    s.close()
    assert snapshots(out)[-1].name == "step-00000000"
    report = json.loads((out / "report.json").read_text())
    assert "went back to step 0" in report["stopped"]
    assert (out / "model" / "model.safetensors").is_file()
    assert len((out / "metrics.jsonl").read_text().splitlines()) < 15  # stopped early


def _quiet():
    from rich.console import Console

    return Console(quiet=True)


def test_eval_every_without_a_run_folder_prints_the_accuracy(tiny_folder, data_dir):
    task = Path(data_dir)
    result = invoke("finetune", "--model", tiny_folder, "--data-dir", task, "--steps", 2,
                    "--batch-size", 2, "--eval-every", 1, "--eval-batch-size", 64,
                    "--profile", "cpu-16gb", "--max-length", 48)
    assert result.exit_code == 0, result.output
    assert "step 1: validation accuracy" in result.output
    assert "step 2: validation accuracy" in result.output
    assert "Learning rate 3e-05, the rate measured best here" in result.output  # open --lr


def test_bench_takes_output_like_every_command(tmp_path):
    result = invoke("bench", "--suite", "smoke", "--output", tmp_path / "b", "--tables-only")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "b" / "tables.md").is_file()


# -- the compute dtype the hardware really has ---------------------------------------------
def test_a_cpu_without_native_bf16_computes_in_fp32_and_says_why(tiny_folder, monkeypatch):
    from edgezo.device import hardware
    from edgezo.device.profiles import load_profile
    from edgezo.run.session import Session

    monkeypatch.setattr(hardware, "native_on_cpu", lambda dtype: dtype == "fp32")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU's choice
    s = Session(tiny_folder, task=None)  # 8gb-gpu: a bf16 profile, emulated on this CPU
    try:
        assert s.dtype_name == "fp32" and "no native bf16" in s.dtype_reason
        assert s.report()["compute"]["dtype"] == "fp32"
        assert next(s.model.parameters()).dtype == torch.float32
        assert s.plan.budget_bytes == load_profile("8gb-gpu").budget_bytes  # its budget
    finally:
        s.close()
    monkeypatch.setattr(hardware, "native_on_cpu", lambda dtype: True)
    s = Session(tiny_folder, task=None)
    try:
        assert s.dtype_name == "bf16" and "profile" in s.dtype_reason
    finally:
        s.close()
    s = Session(tiny_folder, task=None, dtype="bfloat16")  # asked for: kept, whatever the CPU
    try:
        assert s.dtype_name == "bf16" and s.dtype_reason == "as asked (--dtype)"
    finally:
        s.close()


def test_fp32_gives_way_to_the_profiles_dtype_when_only_that_fits(tiny_folder, tmp_path,
                                                                  monkeypatch):
    from edgezo.device import hardware
    from edgezo.run.session import Session

    monkeypatch.setattr(hardware, "native_on_cpu", lambda dtype: dtype == "fp32")
    profile = tmp_path / "tight.yaml"

    def session(budget_gb: float, **kw) -> Session:
        profile.write_text(f"name: tight\ndevice: cpu\ndevice_memory_gb: {budget_gb}\n"
                           "host_memory_gb: 1\nhost_device_bandwidth_gbps: 1\ndtype: bf16\n"
                           "headroom: 0\n")
        # the generator: on a model this small the table's 4 MiB bf16 twin outweighs the
        # bytes bf16 weights save
        return Session(tiny_folder, task=None, profile=str(profile), batch_size=2,
                       max_length=16, offload="off", noise="generator", **kw)

    need = {}
    for dtype in ("fp32", "bf16"):
        probe = session(1.0, dtype=dtype)
        need[dtype] = probe.plan.total_bytes
        probe.close()
    assert need["bf16"] < need["fp32"]
    s = session((need["bf16"] + 1024) / 2**30)  # bf16 fits, fp32 does not
    try:
        assert s.dtype_name == "bf16" and "fp32 (faster on this CPU) would need" in \
            s.dtype_reason
    finally:
        s.close()


def test_an_open_lr_takes_the_one_measured_for_the_method_and_scheme():
    from edgezo.config.defaults import DEFAULT_LR, MEASURED_LR

    def lr(**kw):
        return RunConfig.from_flat(**kw).validate().resolved("fp32").optimizer.lr

    assert lr() == MEASURED_LR["zo-sgd", "full"] == 3e-5  # the main job's default
    assert lr(optimizer="fo-adam") == 1e-5
    assert lr(scheme="prefix") == MEASURED_LR["zo-sgd", "prefix"] == 1e-3
    assert lr(scheme="prompt") == MEASURED_LR["zo-sgd", "prompt"] == 1e-2
    assert lr(optimizer="zo-adam", scheme="prefix") == DEFAULT_LR  # not measured: fallback
    assert lr(scheme="lora") == MEASURED_LR["zo-sgd", "lora"] == 1e-3
    assert lr(optimizer="fo-adam", scheme="lora") == MEASURED_LR["fo-adam", "lora"] == 1e-3
    assert lr(lr=0.5) == 0.5  # asked for: kept
    # recorded resolved, so a resume is the same run whatever the defaults become
    assert RunConfig.from_dict(RunConfig.from_flat().resolved("fp32").to_dict()) \
        .optimizer.lr == 3e-5


def test_an_open_eps_is_larger_in_half_precision_except_for_scales():
    """A perturbation of 1e-3 rounds away in bf16 (adapters) or drifts over 1000 steps
    (full); a scale of 0.01-0.1 would be moved by 10-100% at 1e-2."""
    def eps(dtype, **kw):
        return RunConfig.from_flat(**kw).validate().resolved(dtype).estimator.eps

    assert eps("fp32") == eps("fp32", scheme="lora") == 1e-3
    assert eps("bf16") == eps("bf16", scheme="lora") == eps("fp16", scheme="prefix") == 1e-2
    assert eps("bf16", scheme="scales", quantize="nf4") == 1e-3
    assert eps("bf16", scheme="lora", eps=3e-3) == 3e-3  # asked for: kept


def test_a_run_says_why_it_takes_its_learning_rate(tiny_folder):
    """An open --lr that falls back to the unmeasured 1e-5 (ZO-Adam prefix, where it can
    leave the model where it started) is said before the steps are spent, and recorded; a
    measured default says where it comes from; a given rate says nothing."""
    from edgezo.run.session import Session

    cases = [({}, "measured best here for zo-sgd full"),
             ({"scheme": "prefix"}, "measured best here for zo-sgd prefix"),
             ({"scheme": "prefix", "optimizer": "zo-adam"},
              "a fallback: nothing was measured for zo-adam prefix"),
             ({"lr": 1e-4}, None)]
    for options, said in cases:
        s = Session(tiny_folder, task=None, batch_size=2, max_length=16, **options)
        try:
            why = s.report()["learning_rate"]["why"]
            if said is None:
                assert s.lr_reason is None and why.startswith("given")
            else:
                assert said in s.lr_reason and why == s.lr_reason
                assert f"{s.config.optimizer.lr:g}" in s.lr_reason
        finally:
            s.close()


def test_run_json_records_what_the_run_decided(tiny_folder, data_dir, tmp_path):
    """The defaults a run fills in (dtype, lr, ε, max length, snapshot cadence and count,
    whether the model is saved, pair mode) are in its run.json, not null, so a resume is
    the same run whatever the defaults become. What it did not use is left out, and
    reading the file back gives the run's own configuration."""
    from edgezo.run.snapshots import read_run_file
    from edgezo.run.train import finetune

    s = _session(tiny_folder, data_dir)
    out = tmp_path / "run"
    finetune(s, 1, output=str(out), console=_quiet())
    s.close()
    recorded = read_run_file(out)
    assert recorded["train"]["checkpoint_every"] == 100 and recorded["train"]["keep"] == 3
    assert recorded["train"]["save_model"] is True
    assert recorded["estimator"]["pair"] in (True, False)
    for section, name in (("model", "dtype"), ("optimizer", "lr"), ("estimator", "eps"),
                          ("estimator", "q"), ("estimator", "directions"),
                          ("data", "max_length")):
        assert recorded[section][name] is not None, name
    assert not [(sec, k) for sec, opts in recorded.items() for k, v in opts.items()
                if v is None]
    assert "momentum" not in recorded["optimizer"]  # zo-sgd has none
    assert RunConfig.from_file(out / "run.json") == s.config


def test_resume_refuses_what_would_change_the_run_and_names_what_may_change():
    from edgezo.config.rules import resume_problem

    assert resume_problem(["steps", "eval_every", "threads"]) is None
    problem = resume_problem(["steps", "lr", "config"])
    assert problem.startswith("--resume keeps the run's own settings; drop --config, --lr (")
    assert "--steps" in problem.split("(only ")[1]


def test_a_resolved_config_is_frozen():
    """A run's parts read one resolved config; a change makes a new one."""
    import dataclasses

    resolved = RunConfig.from_flat(lr=1e-3).resolved("bf16")
    with pytest.raises(dataclasses.FrozenInstanceError):
        resolved.optimizer.lr = 1.0
    assert resolved.override(lr=1.0).optimizer.lr == 1.0 and resolved.optimizer.lr == 1e-3


@pytest.mark.parametrize("optimizer", ["fo-sgd", "forward-grad"])
def test_an_objective_function_of_ones_own_needs_a_zo_optimizer(optimizer):
    with pytest.raises(ConfigError, match="needs a ZO optimizer"):
        RunConfig.from_flat(objective="custom", optimizer=optimizer).validate()
    RunConfig.from_flat(objective="custom", optimizer="zo-sgd").validate()


def test_a_resolved_run_without_its_folder_keeps_no_folder_settings():
    """finetune(session, output=None) on a session made with an output: the snapshot
    settings the run folder had decided go with it."""
    resolved = RunConfig.from_flat(output="runs/x").resolved("fp32")
    assert resolved.train.keep == 3
    again = resolved.override(output=None).resolved("fp32").validate()
    assert again.train.keep is None and again.train.checkpoint_every is None


def test_the_optimizers_command_lists_every_optimizer():
    from edgezo.zo.methods import OPTIMIZERS

    result = CliRunner().invoke(app, ["optimizers"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert all(name in result.output for name in OPTIMIZERS)


def test_a_run_records_its_update_rules_defaults():
    """Adam's betas and ε, momentum's β: the values the rule used are in run.json, so a
    resume keeps them whatever the defaults become; rules without them record none."""
    adam = RunConfig.from_flat(optimizer="zo-adam").resolved("bf16").validate()
    assert adam.optimizer.betas == (0.9, 0.999) and adam.optimizer.adam_eps == 1e-8
    mmt = RunConfig.from_flat(optimizer="zo-sgd-mmt", momentum=0.5).resolved("bf16")
    assert mmt.optimizer.momentum == 0.5 and mmt.optimizer.betas is None
    assert RunConfig.from_flat().resolved("bf16").optimizer.momentum is None


def test_the_default_model_is_recorded_by_name():
    """A run on the embedded model records which one, so its run.json says what it
    trained (and a later default cannot change a resumed run's model)."""
    assert RunConfig.from_flat().resolved("bf16").model.model == "smollm2"
    assert RunConfig.from_flat(model="some/model").resolved("bf16").model.model == "some/model"


def test_structured_runs_record_how_their_z_is_computed():
    """A lowrank or subspace run records structured_z ("exact" unless set), so that a
    later change of its definition cannot silently alter a resumed or replayed run; the
    other directions do not use it and their run.json leaves it out."""
    for kind in ("lowrank", "subspace"):
        config = RunConfig.from_flat(directions=kind).resolved("fp32")
        assert config.to_dict(used_only=True)["estimator"]["structured_z"] == "exact"
        chunked = RunConfig.from_flat(directions=kind, structured_z="chunked").resolved("fp32")
        assert chunked.get("structured_z") == "chunked"
    plain = RunConfig.from_flat().resolved("fp32").to_dict(used_only=True)
    assert "structured_z" not in plain["estimator"]
    with pytest.raises(ConfigError, match="unknown structured z computation .approximate."):
        RunConfig.from_flat(directions="lowrank", structured_z="approximate").validate()
    with pytest.raises(ConfigError, match="structured_z shapes lowrank and subspace"):
        RunConfig.from_flat(structured_z="exact").validate()  # accepted and ignored: no


def test_a_run_json_from_before_names_the_default_model(tmp_path):
    """Older run.json files hold null for the embedded model; read back, they name it,
    so such a run compares equal to the same settings today (a run stopped before its
    first step may start again)."""
    from edgezo.run.folder import config_of
    from edgezo.run.snapshots import write_run_file

    old = RunConfig.from_flat(lr=1e-3).resolved("fp32").override(model=None)
    write_run_file(tmp_path, old.to_dict())
    assert config_of(tmp_path) == RunConfig.from_flat(lr=1e-3).resolved("fp32")


def test_run_json_keeps_a_none_that_is_not_the_default():
    """`task: None` (batches given to step(), an app's Session) is a choice, not an unused
    option: run.json keeps it, or a resumed app would load SST-2."""
    cfg = RunConfig.from_flat(task=None, output="x").resolved("fp32")
    recorded = cfg.to_dict(used_only=True)
    assert recorded["data"]["task"] is None and "momentum" not in recorded["optimizer"]
    assert RunConfig.from_dict(recorded) == cfg
