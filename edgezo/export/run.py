"""`edgezo export RUN_DIR --format peft|merged|gguf|onnx|seedlog`: ship a fine-tune in a
standard format.

- peft: the adapter folder (adapter_config.json + adapter_model.safetensors) and the
  tokenizer, which `peft.PeftModel.from_pretrained(base, folder)` loads (lora, prefix and
  prompt schemes);
- merged: a plain transformers folder (safetensors) that `AutoModelForCausalLM` loads with
  no edgezo installed: LoRA merged into the base weights, or the trained full / head
  model itself. Prefix and prompt adapters have no merged form.
- seedlog: the run's settings (run.json, naming the base model) and its seed log, a few
  hundred bytes per step; `edgezo replay` rebuilds the weights from them and the base
  model, on the same kind of device (ZO estimators only: a backprop step has no seed).
- gguf: one .gguf file (weights, tokenizer, chat template) for llama.cpp and the apps on
  it, which transformers' GGUF reader also loads (export/gguf.py);
- onnx: an fp32 ONNX graph of ids + mask -> logits, with the tokenizer beside it, for
  onnxruntime (export/onnx.py; examples/onnx_predict.py scores a task with it).

`export_model` does the same from a model in memory (a Session's, or any transformers
causal LM, peft LoRA included), without changing it.

A run folder is what `edgezo finetune --output` writes (report.json and model/), or what
`Session.save` writes.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgezo.config.runconfig import RunConfig
from edgezo.errors import ConfigError, EdgezoError, PathError, check_writable_folder, unknown_choice
from edgezo.export.gguf import write_gguf
from edgezo.export.onnx import ONNX_FILE, require_exporter, write_onnx
from edgezo.export.weights import plain_model, trained_state
from edgezo.models.catalog import DEFAULT_MODEL, PEFT_SCHEMES, SCHEMES
from edgezo.models.loading import (
    load_weights,
    locate_model,
    parse_dtype,
    resolve_model,
)
from edgezo.models.quantized import load_quantized
from edgezo.run.resume import check_log_is_whole
from edgezo.run.snapshots import RUN_FILE, SEED_LOG, read_run_file, read_seed_log

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

FORMATS = ("peft", "merged", "seedlog", "gguf", "onnx")
MODEL_FORMATS = ("peft", "merged", "gguf", "onnx")  # what export_model writes
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
ONNX_META_FILE = "edgezo.json"  # beside model.onnx: the task and prompt it was trained on


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


PEFT_TYPES = {"LORA": "lora", "PREFIX_TUNING": "prefix", "PROMPT_TUNING": "prompt"}
# what an eval of an adapter takes from the run (report.json's hyperparameters), or from
# adapter_config.json where there is no report (a --format peft export): the base is
# loaded as it trained, and the adapter built with the shapes of the saved one
_ADAPTER_OPTIONS = {"lora": {"lora_r": "r", "lora_alpha": "lora_alpha",
                             "lora_targets": "target_modules"},
                    "prefix": {"prefix_tokens": "num_virtual_tokens"},
                    "prompt": {"prompt_tokens": "num_virtual_tokens"}}


@dataclass
class SavedModel:
    """A model folder edgezo saved (a run's model/, a Session.save folder) or a peft
    export: `folder` holds config.json (the weights) or adapter_config.json (an adapter,
    whose base is loaded under it); `report` is the run's report.json ({} when none)."""

    folder: Path
    report: dict
    adapter: dict | None  # adapter_config.json

    @property
    def scheme(self) -> str:
        if self.adapter is not None:
            return PEFT_TYPES.get(self.adapter.get("peft_type"), self.report.get("scheme"))
        return self.report.get("scheme", "full")

    def base_options(self) -> dict:
        """Session options that rebuild an adapter's model: its base (quantized as it
        trained), its scheme and the scheme's sizes."""
        adapter, hyper = self.adapter or {}, self.report.get("hyperparameters") or {}
        scheme = self.scheme
        if scheme not in PEFT_SCHEMES:
            raise ConfigError(f"{self.folder} is a {adapter.get('peft_type')} adapter; "
                              f"edgezo evaluates {', '.join(PEFT_SCHEMES)} adapters")
        options = {"model": _adapter_base(self.report.get("model"),
                                          adapter.get("base_model_name_or_path")),
                   "scheme": scheme}
        for name, key in _ADAPTER_OPTIONS[scheme].items():
            value = hyper.get(name, adapter.get(key))
            if value is not None:
                options[name] = sorted(value) if isinstance(value, (set, list)) else value
        for name in ("quantize", "trust_remote_code"):
            if hyper.get(name):
                options[name] = hyper[name]
        if options["model"] is None:
            raise ConfigError(f"{self.folder} names no base model (no report.json, and no "
                              "base_model_name_or_path in adapter_config.json)")
        return options


def _adapter_base(reported: str | None, recorded: str | None) -> str | None:
    """The base an adapter trained on: the model the run named (report.json: "smollm2",
    a hub id, a path), unless that is a path no longer there and the adapter's own
    record (peft's base_model_name_or_path: the folder loaded, e.g. a converted GGUF's)
    is."""
    def missing_path(spec: str) -> bool:
        looks_local = spec.startswith((".", "/", "~")) or spec.endswith(".gguf")
        return looks_local and not Path(spec).expanduser().exists()

    if reported and missing_path(reported) and recorded and not missing_path(recorded):
        return recorded
    return reported or recorded


def _is_model_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file() or (folder / ADAPTER_FILES[0]).is_file()


def saved_model(spec: str | Path | None) -> SavedModel | None:
    """`spec` as a folder edgezo saved a model in: a weights or adapter folder, or a run
    folder (finetune --output) holding one under model/. None for what is not a folder
    edgezo wrote (a hub id, a .gguf file, a plain transformers folder is a SavedModel with
    no report). A run folder without a saved model is a ConfigError that says what to do."""
    if spec is None:
        return None
    path = Path(spec).expanduser()
    if not path.is_dir():
        return None
    folder = path
    if not _is_model_folder(path) and _is_model_folder(path / "model"):
        folder = path / "model"
    if not _is_model_folder(folder):
        if (path / "run.json").is_file() or (path / "report.json").is_file():
            raise ConfigError(f"{path} is a run folder with no saved model (run with "
                              "--no-save-model?): rebuild its weights with `edgezo replay "
                              f"{path} --output DIR` and pass DIR")
        return None  # not ours: the model loader says what is missing
    report: dict = {}
    for candidate in (folder / "report.json", folder.parent / "report.json"):
        if candidate.is_file():
            try:
                found = json.loads(candidate.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            report = found if isinstance(found, dict) else {}
            break
    adapter = None
    if not (folder / "config.json").is_file():
        try:
            adapter = json.loads((folder / ADAPTER_FILES[0]).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"{folder / ADAPTER_FILES[0]} cannot be read: {err}") from None
        if not isinstance(adapter, dict):
            raise ConfigError(f"{folder / ADAPTER_FILES[0]} is not a peft adapter config")
    return SavedModel(folder, report, adapter)


def trained_template(report: dict, task: str | None) -> str | None:
    """The prompt template a run resolved for `task` (report.json: the splits' template,
    which names what "auto" meant then), or None for another task or no record: scored
    with another prompt, a fine-tuned model can read as untrained."""
    if not isinstance(report, dict) or task is None or report.get("task") != task:
        return None
    template = ((report.get("splits") or {}).get("template")
                or (report.get("hyperparameters") or {}).get("template"))
    return template if template not in (None, "auto") else None


def _copy_tokenizer(src: Path, out: Path) -> None:
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")) or \
                f.name in ("chat_template.jinja",):
            shutil.copy2(f, out / f.name)


def export_run(run_dir: str | Path, fmt: str, output: str | Path, *,
               gguf_type: str | None = None,
               progress: Callable[[str], None] | None = None) -> Path:
    """Write the run's model in `fmt` under the folder `output`; returns the folder
    (peft, merged, seedlog) or the file written (gguf, onnx).

    `gguf_type` (gguf only): f16, bf16, f32, q8_0, q5_1, q5_0, q4_1 or q4_0; None keeps
    the types of the base when it was a GGUF file (SmolLM2: Q4_1), else f16.
    `progress(line)` hears what a slow export is doing (loading the model, tracing it),
    before it starts."""
    run_dir, out = Path(run_dir), Path(output)
    if fmt not in FORMATS:
        raise unknown_choice("format", fmt, FORMATS)
    if gguf_type is not None and fmt != "gguf":
        raise ConfigError(f"--gguf-type applies to --format gguf, not {fmt}")
    if fmt == "onnx":  # the missing extra is said at once, not after the model loads
        require_exporter()
    check_output(fmt, out, "--output")
    if fmt == "seedlog":
        return _export_seedlog(run_dir, out)
    model_dir, report = _locate(run_dir)
    scheme = report.get("scheme", "full")
    if fmt in ("gguf", "onnx"):
        return _export_runtime(run_dir, report, fmt, out, gguf_type, progress or _silent)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "peft":
        if scheme not in PEFT_SCHEMES:
            raise ConfigError(f"a {scheme} run trains the model's own weights, so it has no "
                              "adapter; use --format merged")
        for name in ADAPTER_FILES:
            shutil.copy2(model_dir / name, out / name)
        _copy_tokenizer(model_dir, out)
        return out
    _refuse_prompt_learning(scheme, "--format peft")
    if scheme in PEFT_SCHEMES:
        (progress or _silent)(f"loading the run's model (the base and its {scheme} adapter) "
                              "to merge them ...")
        model = load_run(run_dir)[0]  # loaded for this: merging it in place harms nothing
        model.merge_and_unload().save_pretrained(out)
    else:
        for f in model_dir.iterdir():
            if f.is_file() and f.name != "report.json":
                shutil.copy2(f, out / f.name)
    _copy_tokenizer(model_dir, out)
    return out


def check_output(fmt: str, out: Path, name: str) -> None:
    """Raise PathError unless the export can write `out`: a folder, or for gguf a file
    name ending in .gguf whose folder is checked. Why here: the write comes after the
    run's model loads, where a file or read-only folder in the way ends in a traceback."""
    if fmt == "gguf" and out.suffix == ".gguf":
        if out.is_dir():
            raise PathError(f"{name} {out} is a folder, but a name ending in .gguf is the "
                            "file to write: remove the folder, or give another name")
        check_writable_folder(out.parent, f"the folder of {name}",
                              f"give {name} a .gguf name in a folder you can write to")
    else:
        check_writable_folder(out, name)


def _refuse_prompt_learning(scheme: str, instead: str) -> None:
    if not SCHEMES[scheme].merges:
        raise ConfigError(f"{scheme} tuning adds virtual tokens that cannot be merged into the "
                          f"weights; use {instead}")


def _silent(_line: str) -> None:
    pass


def _export_runtime(run_dir: Path, report: dict, fmt: str, out: Path,
                    gguf_type: str | None, progress: Callable[[str], None]) -> Path:
    """GGUF or ONNX from a run folder: the trained model (the base with the adapter, for
    LoRA: merged as it is written) and, for GGUF, the base's own file when it was one."""
    _refuse_prompt_learning(report.get("scheme", "full"),
                            "--format peft (or train with --scheme lora)")
    if SCHEMES[report.get("scheme", "full")].quantized_scales:
        raise ConfigError(f"a scales run is its quantized base with trained scales, kept in "
                          f"{report.get('hyperparameters', {}).get('quantize')}'s own format; "
                          f"{fmt} export reads dense weights: use --format merged (the "
                          "quantized folder), or train with --qat int4 for a GGUF")
    scheme = report.get("scheme", "full")
    progress("loading the run's model" + (f" (the base and its {scheme} adapter)"
                                          if scheme in PEFT_SCHEMES else "") + " ...")
    started = time.perf_counter()
    model, tokenizer, report = load_run(run_dir)
    base = base_gguf(report.get("model")) if fmt == "gguf" else None
    loaded = f"loaded in {time.perf_counter() - started:.1f} s; "
    progress(loaded + ("tracing it to ONNX with torch.onnx.export (the slow part: about "
                       "a minute and a half for SmolLM2-135M on 2 CPU cores) ..."
                       if fmt == "onnx" else "writing the GGUF file ..."))
    task = report.get("task")
    meta = {"task": task, "template": trained_template(report, task),
            "model": report.get("model"), "scheme": scheme} if fmt == "onnx" else None
    return export_model(model, tokenizer, fmt, out, gguf_type=gguf_type, base_gguf=base,
                        meta=meta)


def load_run(run_dir: str | Path) -> tuple[nn.Module, PreTrainedTokenizerBase, dict]:
    """(model, tokenizer, report) of a run folder: the trained model as torch runs it,
    its saved folder, or for an adapter scheme the base with the adapter on top."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, report = _locate(Path(run_dir))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if SCHEMES[report.get("scheme", "full")].quantized_scales:
        return load_quantized(model_dir), tokenizer, report
    if report.get("scheme", "full") not in PEFT_SCHEMES:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
        return model.eval(), tokenizer, report
    import peft

    dtype = parse_dtype(report.get("hyperparameters", {}).get("dtype", "fp32"))
    base = load_weights(resolve_model(report.get("model"), dtype), dtype, "cpu")
    return peft.PeftModel.from_pretrained(base, model_dir).eval(), tokenizer, report


def base_gguf(spec: str | None) -> Path | None:
    """The GGUF file the run's base came from, if it did (and is still there); None as
    `spec` is the default model, as everywhere a model is named."""
    spec = spec or DEFAULT_MODEL
    try:
        path, kind = locate_model(spec)
    except EdgezoError as err:
        if spec.endswith(".gguf") or spec == DEFAULT_MODEL:
            print(f"note: the base GGUF is gone or damaged ({err}); the export rebuilds its "
                  "metadata from the run's tokenizer and defaults to f16", file=sys.stderr)
        return None
    return path if kind == "gguf" else None


def export_model(model: nn.Module, tokenizer: PreTrainedTokenizerBase, fmt: str,
                 path: str | Path, *,
                 gguf_type: str | None = None, base_gguf: str | Path | None = None,
                 meta: dict | None = None) -> Path:
    """Write a model in memory as `fmt` (peft, merged, gguf, onnx) under `path`; the
    model is left as it was (LoRA is merged into copies of the projections it touches).

    `path` is a folder (created), or for gguf also a file name ending in .gguf. Returns
    the folder (peft, merged) or the file: `<path>/model-<type>.gguf`, `<path>/model.onnx`
    (the tokenizer is saved beside both). `gguf_type` and `base_gguf`: see edgezo.export.gguf.
    `meta` (onnx): what the model was trained as ({"task", "template", ...}), written
    beside the graph as edgezo.json, where examples/onnx_predict.py finds its prompt.
    Prefix and prompt adapters have no plain-model form: ConfigError, as for a family
    GGUF cannot map.
    """
    if fmt not in MODEL_FORMATS:
        raise unknown_choice("format", fmt, MODEL_FORMATS)
    if gguf_type is not None and fmt != "gguf":
        raise ConfigError(f"gguf_type applies to the gguf format, not {fmt}")
    out = Path(path)
    check_output(fmt, out, "the export path")
    if fmt == "gguf":
        base, state = trained_state(model)
        return write_gguf(state, base.config, tokenizer, out, gguf_type=gguf_type,
                          base_gguf=base_gguf)
    if fmt == "onnx":
        written = write_onnx(model, out / ONNX_FILE)
        tokenizer.save_pretrained(out)
        if meta:
            (out / ONNX_META_FILE).write_text(json.dumps(
                {k: v for k, v in meta.items() if v is not None}, indent=1) + "\n")
        else:  # not another export's, left in the same folder
            (out / ONNX_META_FILE).unlink(missing_ok=True)
        return written
    if fmt == "peft":
        if getattr(model, "peft_config", None) is None:
            raise ConfigError("only an adapter (a peft model) has the peft format; use "
                              "merged, gguf or onnx")
        model.save_pretrained(out)
    else:
        plain_model(model).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _export_seedlog(run_dir: Path, out: Path) -> Path:
    config = RunConfig.from_dict(read_run_file(run_dir), str(run_dir / RUN_FILE))
    if not config.zo_only:
        raise ConfigError(f"{config.optimizer.optimizer} steps use backpropagated gradients, "
                          "which a seed log cannot hold; use --format peft or merged")
    entries = read_seed_log(run_dir)
    if not entries:
        raise ConfigError(f"{run_dir} has no seed log (finetune --output writes one)")
    check_log_is_whole(run_dir, entries)  # a shipped log must rebuild every step taken
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(run_dir / RUN_FILE, out / RUN_FILE)
    (out / SEED_LOG).write_text("".join(json.dumps(e) + "\n" for e in entries))
    return out
