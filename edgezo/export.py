"""`edgezo export RUN_DIR --format peft|merged`: ship a fine-tune in a standard format.

- peft: the adapter folder (adapter_config.json + adapter_model.safetensors) and the
  tokenizer, which `peft.PeftModel.from_pretrained(base, folder)` loads (lora, prefix and
  prompt schemes);
- merged: a plain transformers folder (safetensors) that `AutoModelForCausalLM` loads with
  no edgezo installed: LoRA merged into the base weights, or the trained full / head
  model itself. Prefix and prompt adapters have no merged form.
- seedlog: the run's settings (run.json, naming the base model) and its seed log, a few
  hundred bytes per step; `edgezo replay` rebuilds the weights from them and the base
  model, on the same kind of device (ZO estimators only: a backprop step has no seed).

A run folder is what `edgezo finetune --output` writes (report.json and model/), or what
`Session.save` writes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from edgezo.config import PEFT_SCHEMES
from edgezo.errors import ConfigError, unknown_choice

FORMATS = ("peft", "merged", "seedlog")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def _locate(run_dir: Path) -> tuple[Path, dict]:
    """The saved model folder of a run and the run's report."""
    for model_dir in (run_dir / "model", run_dir):
        report = model_dir / "report.json"
        if not report.is_file():
            report = run_dir / "report.json"
        if (model_dir / "config.json").is_file() or (model_dir / ADAPTER_FILES[0]).is_file():
            if not report.is_file():
                raise ConfigError(f"{run_dir} has no report.json; export needs the run's "
                                  "report to know its base model and scheme")
            return model_dir, json.loads(report.read_text())
    raise ConfigError(f"{run_dir} holds no saved model: pass the --output folder of "
                      "`edgezo finetune` (run without --no-save-model) or a Session.save folder")


def _copy_tokenizer(src: Path, out: Path) -> None:
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")) or \
                f.name in ("chat_template.jinja",):
            shutil.copy2(f, out / f.name)


def export_run(run_dir: str | Path, fmt: str, output: str | Path) -> Path:
    """Write the run's model in `fmt` under `output`; returns the folder."""
    run_dir, out = Path(run_dir), Path(output)
    if fmt not in FORMATS:
        raise unknown_choice("format", fmt, FORMATS)
    if fmt == "seedlog":
        return _export_seedlog(run_dir, out)
    model_dir, report = _locate(run_dir)
    scheme = report.get("scheme", "full")
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "peft":
        if scheme not in PEFT_SCHEMES:
            raise ConfigError(f"a {scheme} run trains the model's own weights, so it has no "
                              "adapter; use --format merged")
        for name in ADAPTER_FILES:
            shutil.copy2(model_dir / name, out / name)
        _copy_tokenizer(model_dir, out)
        return out
    if scheme in ("prefix", "prompt"):
        raise ConfigError(f"{scheme} tuning adds virtual tokens that cannot be merged into the "
                          "weights; use --format peft")
    if scheme in PEFT_SCHEMES:
        _merge_lora(model_dir, report, out)
    else:
        for f in model_dir.iterdir():
            if f.is_file() and f.name != "report.json":
                shutil.copy2(f, out / f.name)
    _copy_tokenizer(model_dir, out)
    return out


def _export_seedlog(run_dir: Path, out: Path) -> Path:
    from edgezo.checkpoint import RUN_FILE, SEED_LOG, read_run_file, read_seed_log
    from edgezo.config import RunConfig

    config = RunConfig.from_dict(read_run_file(run_dir), str(run_dir / RUN_FILE))
    if not config.zo_only:
        raise ConfigError(f"{config.optimizer.optimizer} steps use backpropagated gradients, "
                          "which a seed log cannot hold; use --format peft or merged")
    entries = read_seed_log(run_dir)
    if not entries:
        raise ConfigError(f"{run_dir} has no seed log (finetune --output writes one)")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(run_dir / RUN_FILE, out / RUN_FILE)
    (out / SEED_LOG).write_text("".join(json.dumps(e) + "\n" for e in entries))
    return out


def _merge_lora(model_dir: Path, report: dict, out: Path) -> None:
    import peft

    from edgezo.models.loading import load_weights, parse_dtype, resolve_model

    dtype = parse_dtype(report.get("hyperparameters", {}).get("dtype", "fp32"))
    resolved = resolve_model(report.get("model"), dtype)
    base = load_weights(resolved, dtype, "cpu")
    merged = peft.PeftModel.from_pretrained(base, model_dir).merge_and_unload()
    merged.save_pretrained(out)
