"""Bad paths and bad files get a one-line message naming the fix, before any model loads:
an --output or EDGEZO_CACHE that is a file, lies under a file or is read-only; a .gguf cut
short; a run over the profile's budget (refused before its GGUF is converted)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from edgezo.cli.main import app
from typer.testing import CliRunner

import edgezo.export.run
import edgezo.models.loading
import edgezo.run.build
import edgezo.run.session
from edgezo.models.gguf_cache import default_gguf
from edgezo.models.loading import resolve_model

runner = CliRunner()


def invoke(*args) -> tuple[int, str]:
    """Exit code and the output on one line (rich wraps long messages)."""
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, " ".join(result.output.split())


def refused(code: int, out: str, *needles: str) -> None:
    """A clean refusal: exit 2, `error: ...`, each needle in it, no traceback."""
    assert code == 2, out
    assert out.startswith("error:") or " error: " in f" {out}", out
    assert "Traceback" not in out
    for needle in needles:
        assert needle in out, (needle, out)


def _fail(what: str):
    def fail(*args, **kwargs):
        raise AssertionError(f"{what} before the bad path was reported")

    return fail


@pytest.fixture
def no_session(monkeypatch):
    """The command must refuse before it builds a session (data, tokenizer, weights)."""
    monkeypatch.setattr(edgezo.run.session, "build", _fail("the session was built"))


@pytest.fixture
def no_conversion(monkeypatch):
    """The command must refuse before a GGUF is converted or any weight loads."""
    monkeypatch.setattr(edgezo.models.loading, "convert_gguf", _fail("the GGUF was converted"))
    monkeypatch.setattr(edgezo.run.build, "load", _fail("the weights were loaded"))


@pytest.fixture
def read_only(monkeypatch):
    """`make(folder)`: the folder made read-only. chmod 0o555 stops writes for a user; root
    writes through permissions, so there `os.access` is made to answer for the folder as
    the kernel answers on a read-only filesystem (EROFS, which holds for root too).
    Returns the list of the paths the emulation refused (None where chmod does the job),
    which a test checks so that it cannot pass for another reason."""
    made: list[Path] = []
    asked: list[str] = []
    real_access = os.access

    def make(folder: Path) -> list[str] | None:
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o555)
        made.append(folder)
        if real_access(folder, os.W_OK):  # root: permissions do not stop writes
            def access(path, mode, *args, **kwargs):
                if mode & os.W_OK and any(Path(path) == f or f in Path(path).parents
                                          for f in made):
                    asked.append(str(path))
                    return False
                return real_access(path, mode, *args, **kwargs)

            monkeypatch.setattr(os, "access", access)
            return asked
        return None

    yield make
    for folder in made:
        folder.chmod(0o755)


def checked(asked: list[str] | None) -> bool:
    """Whether a read-only case was really checked: where emulated (root), os.access must
    have refused the folder; elsewhere chmod is the kernel's own answer."""
    return asked is None or bool(asked)


# -- --output ------------------------------------------------------------------------------

@pytest.fixture
def bad_output(tmp_path, read_only):
    """`case -> (path, needle, asked)`: an output path that cannot be written; `asked` is
    None but for the read-only cases (see read_only)."""
    def make(case: str) -> tuple[Path, str, list[str] | None]:
        afile = tmp_path / "afile"
        afile.write_text("not a folder")
        if case == "a file":
            return afile, "is a file, not a folder", None
        if case == "under a file":
            return afile / "run", f"under {afile}, which is a file, not a folder", None
        asked = read_only(tmp_path / "locked")
        target = tmp_path / "locked" if case == "read-only" else tmp_path / "locked" / "run"
        return target, "read-only", asked

    return make


CASES = ["a file", "under a file", "read-only", "under a read-only folder"]


@pytest.mark.parametrize("case", CASES)
def test_finetune_output_that_cannot_be_written_is_refused_before_the_model_loads(
        case, bad_output, no_session):
    out, needle, asked = bad_output(case)
    code, text = invoke("finetune", "--steps", "1", "--output", out)
    refused(code, text, "--output", str(out), needle, "writ")
    assert checked(asked), "the read-only check was never made"


@pytest.fixture
def run_folder(tmp_path) -> Path:
    """A run folder as export reads it (report.json and model/config.json); its model is
    never loaded by these tests."""
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "model" / "config.json").write_text("{}")
    (run / "report.json").write_text(json.dumps({"model": "smollm2", "scheme": "full"}))
    return run


@pytest.mark.parametrize("fmt", ["merged", "gguf", "seedlog"])
@pytest.mark.parametrize("case", CASES)
def test_export_output_that_cannot_be_written_is_refused_before_the_model_loads(
        case, fmt, bad_output, run_folder, monkeypatch):
    monkeypatch.setattr(edgezo.export.run, "load_run", _fail("the run's model was loaded"))
    out, needle, asked = bad_output(case)
    code, text = invoke("export", run_folder, "--format", fmt, "--output", out)
    refused(code, text, "--output", str(out), needle)
    assert checked(asked), "the read-only check was never made"
    if case == "a file":
        assert out.read_text() == "not a folder"


def test_export_to_a_gguf_file_name_checks_its_folder(run_folder, tmp_path, monkeypatch):
    """`--output x/model.gguf` names the file: its folder is what must be writable."""
    monkeypatch.setattr(edgezo.export.run, "load_run", _fail("the run's model was loaded"))
    (tmp_path / "afile").write_text("")
    out = tmp_path / "afile" / "model.gguf"
    code, text = invoke("export", run_folder, "--format", "gguf", "--output", out)
    refused(code, text, f"{tmp_path / 'afile'} is a file, not a folder")


def test_writable_folders_pass(tmp_path):
    from edgezo.errors import PathError, check_writable_folder

    check_writable_folder(tmp_path, "--output")  # exists
    check_writable_folder(tmp_path / "a" / "b", "--output")  # created later
    check_writable_folder(Path("relative-run"), "--output")  # under the working folder
    assert not (tmp_path / "a").exists()  # checking creates nothing
    with pytest.raises(PathError, match="is a file"):
        check_writable_folder(Path(__file__), "--output")


# -- a GGUF file of a tiny model -----------------------------------------------------------

def bpe_tokenizer():
    """A byte-level BPE tokenizer (SmolLM2's kind, which a GGUF can carry)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["a great film, it was great", "a terrible movie!",
                                 "negative positive sentiment review"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    """A tiny Qwen2 with its tokenizer as one f32 .gguf file (~100 KB)."""
    from transformers import AutoModelForCausalLM

    from edgezo.export.run import export_model
    from edgezo.models.tiny import tiny_config

    config = tiny_config("qwen2")
    config.vocab_size = 320
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    folder = tmp_path_factory.mktemp("gguf")
    return export_model(model, bpe_tokenizer(), "gguf", folder / "tiny.gguf", gguf_type="f32")


def cut(path: Path, size: int, into: Path) -> Path:
    """The first `size` bytes of `path`, as a download stopped early leaves them."""
    into.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "rb") as src, open(into, "wb") as dst:
        dst.write(src.read(size))
    return into


# -- EDGEZO_CACHE --------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_cache_that_cannot_be_written_is_refused_before_converting(
        case, tiny_gguf, bad_output, data_dir, no_conversion, monkeypatch):
    cache, needle, asked = bad_output(case)
    monkeypatch.setenv("EDGEZO_CACHE", str(cache))
    code, text = invoke("finetune", "--model", tiny_gguf, "--data-dir", data_dir,
                        "--steps", "1")
    refused(code, text, "EDGEZO_CACHE", str(cache), needle)
    assert checked(asked), "the read-only check was never made"


def test_read_only_cache_that_holds_the_conversion_is_fine(tiny_gguf, tmp_path, read_only,
                                                            monkeypatch):
    """A prepared cache may be read-only (a shared or baked-in one): only a conversion
    still to write needs it writable. Planning never writes."""
    monkeypatch.setenv("EDGEZO_CACHE", str(tmp_path / "cache"))
    first = resolve_model(str(tiny_gguf), torch.float32)
    read_only(tmp_path / "cache")
    again = resolve_model(str(tiny_gguf), torch.float32)
    assert again.folder == first.folder
    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("EDGEZO_CACHE", str(tmp_path / "afile"))
    code, text = invoke("plan", "--model", tiny_gguf, "--json")
    assert code == 0, text


# -- a .gguf cut short ---------------------------------------------------------------------

@pytest.mark.parametrize("command", ["plan", "finetune"])
@pytest.mark.parametrize("where", ["in its header", "in its tensors", "empty"])
def test_truncated_gguf_says_so_and_to_download_it_again(command, where, tiny_gguf, tmp_path,
                                                         data_dir, no_conversion,
                                                         monkeypatch):
    monkeypatch.setenv("EDGEZO_CACHE", str(tmp_path / "cache"))
    full = tiny_gguf.stat().st_size
    size = {"in its header": 300, "in its tensors": full - 1000, "empty": 0}[where]
    bad = cut(tiny_gguf, size, tmp_path / "dl" / "tiny.gguf")
    args = ["--data-dir", data_dir, "--steps", "1"] if command == "finetune" else []
    code, text = invoke(command, "--model", bad, *args)
    refused(code, text, str(bad), "download it again")
    assert "may not be supported" not in text
    if where == "in its tensors":
        assert f"{size:,} bytes" in text and f"{full:,}" in text
    elif where == "in its header":
        assert "header" in text
    else:
        assert "empty" in text


def test_a_file_that_is_not_gguf_says_so(tmp_path, no_conversion):
    bad = tmp_path / "page.gguf"
    bad.write_text("<html>404 Not Found</html>" * 10)
    code, text = invoke("plan", "--model", bad)
    refused(code, text, "not a GGUF file", "download it again")


@pytest.mark.real_model
@pytest.mark.parametrize("command", ["plan", "finetune"])
@pytest.mark.parametrize("megabytes", [1, 60])
def test_truncated_smollm2_gguf(command, megabytes, tmp_path, data_dir, no_conversion,
                                monkeypatch):
    """The real file cut at 1 MB (inside its 1.8 MB header) and at 60 MB (in its tensors,
    where transformers used to blame the architecture)."""
    monkeypatch.setenv("EDGEZO_CACHE", str(tmp_path / "cache"))
    real = default_gguf()
    bad = cut(real, megabytes * 1_000_000, tmp_path / real.name)
    args = ["--data-dir", data_dir, "--steps", "1"] if command == "finetune" else []
    code, text = invoke(command, "--model", bad, *args)
    refused(code, text, "download it again")
    assert "may not be supported" not in text
    if megabytes == 60:
        assert f"{real.stat().st_size:,}" in text


# -- the budget, before any conversion -----------------------------------------------------

def tiny_profile(tmp_path: Path, gb: float) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text("name: tiny\ndescription: a test budget\ndevice: cpu\n"
                    f"device_memory_gb: {gb:.6f}\nhost_memory_gb: {gb:.6f}\n"
                    "host_device_bandwidth_gbps: 0\ndtype: bf16\nheadroom: 0.1\n")
    return path


def test_over_budget_gguf_run_is_refused_before_its_conversion(tiny_gguf, tmp_path,
                                                               data_dir, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("EDGEZO_CACHE", str(cache))
    code, text = invoke("finetune", "--model", tiny_gguf, "--data-dir", data_dir,
                        "--steps", "1", "--profile", tiny_profile(tmp_path, 0.00001))
    refused(code, text, "the run needs", "allows")
    assert not cache.exists() or not any(cache.rglob("*")), list(cache.rglob("*"))


def test_over_budget_gguf_session_is_refused_before_its_conversion(tiny_gguf, tmp_path,
                                                                   data_dir, monkeypatch):
    from edgezo.errors import OutOfBudgetError
    from edgezo.run.session import Session

    cache = tmp_path / "cache"
    monkeypatch.setenv("EDGEZO_CACHE", str(cache))
    with pytest.raises(OutOfBudgetError, match="allows"):
        Session(model=str(tiny_gguf), data_dir=data_dir,
                profile=str(tiny_profile(tmp_path, 0.00001)))
    assert not cache.exists() or not any(cache.rglob("*"))


def test_gguf_run_that_fits_converts_after_planning_and_trains(tiny_gguf, tmp_path, data_dir,
                                                               monkeypatch):
    """The first run of a GGUF plans from its metadata and tokenizer, then converts it
    once (in the run's dtype) and trains; the next run reuses the conversion."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("EDGEZO_CACHE", str(cache))
    model = shutil.copy(tiny_gguf, tmp_path / "tiny.gguf")
    args = ("finetune", "--model", model, "--data-dir", data_dir, "--steps", "1",
            "--batch-size", "4", "--eval-examples", "8", "--dtype", "fp32")
    code, text = invoke(*args)
    assert code == 0, text
    converted = sorted(cache.glob("gguf/*/config.json"))
    assert len(converted) == 1 and converted[0].parent.name.endswith("-float32")
    code, again = invoke(*args)
    assert code == 0, again
    assert "Converting" not in again
    assert sorted(cache.glob("gguf/*/config.json")) == converted


def test_cache_for_a_streamed_models_copy_must_be_writable(tiny_folder, tmp_path,
                                                           monkeypatch):
    """A model that streams is stored once in the run's dtype (models/convert.py), into
    the same cache: a file there is named before any weight is read."""
    from edgezo.errors import PathError
    from edgezo.models.convert import stream_ready_folder

    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("EDGEZO_CACHE", str(tmp_path / "afile"))
    with pytest.raises(PathError, match="EDGEZO_CACHE .*afile is a file.*set EDGEZO_CACHE"):
        stream_ready_folder(Path(tiny_folder), torch.bfloat16)
