"""Schemes: what trains, how it is initialised, and exports that load back."""

import json
import math

import pytest
import torch
from conftest import lm_batch, on_device_of, zo_engine
from transformers import AutoModelForCausalLM

from edgezo.config.options import SCHEMES
from edgezo.errors import ConfigError
from edgezo.export.run import export_run
from edgezo.models.schemes import apply_scheme
from edgezo.models.tiny import FAMILIES, VOCAB, save_tiny, tiny_model
from edgezo.run.session import Session
from edgezo.zo.optimizers import OPTIMIZERS, make_optimizer


@pytest.fixture(scope="module")
def family_folders(tmp_path_factory):
    folders = {}
    for family in FAMILIES:
        folder = tmp_path_factory.mktemp(f"tiny-{family}")
        save_tiny(folder, family)
        folders[family] = str(folder)
    return folders


def logits(model, batch):
    batch = on_device_of(model, batch)
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     use_cache=False).logits.cpu()


# scales needs a quantized base: test_quantized covers it on two families and backends
@pytest.mark.parametrize("scheme", [s for s in SCHEMES if s != "scales"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_scheme_and_family_steps_and_exports(family_folders, data_dir, tmp_path,
                                                   family, scheme):
    sess = Session(model=family_folders[family], data_dir=data_dir, scheme=scheme,
                   batch_size=4, lr=0.05, seed=0, dtype="fp32")
    try:
        frozen = {n: p.detach().clone() for n, p in sess.model.named_parameters()
                  if not p.requires_grad}
        trained = {n: p.detach().clone() for n, p in sess.model.named_parameters()
                   if p.requires_grad}
        for _ in range(2):
            assert not sess.step().skipped
        model = sess.model
        params = dict(model.named_parameters())
        assert all(torch.equal(params[n], v) for n, v in frozen.items())  # frozen stays
        assert any(not torch.equal(params[n], v) for n, v in trained.items())
        batch = lm_batch(VOCAB)
        expected = logits(model, batch)
        sess.save(tmp_path / "run")
    finally:
        sess.close()
    if scheme in ("lora", "prefix", "prompt"):
        import peft

        out = export_run(tmp_path / "run", "peft", tmp_path / "peft")
        base = AutoModelForCausalLM.from_pretrained(family_folders[family])
        loaded = peft.PeftModel.from_pretrained(base, out).eval()
        torch.testing.assert_close(logits(loaded, batch), expected, rtol=1e-5, atol=1e-5)
    if scheme in ("prefix", "prompt"):
        with pytest.raises(ConfigError, match="cannot be merged"):
            export_run(tmp_path / "run", "merged", tmp_path / "merged")
        return
    out = export_run(tmp_path / "run", "merged", tmp_path / "merged")
    assert not (out / "adapter_config.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits(loaded, batch), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scheme", ["lora", "prefix", "prompt", "head"])
def test_every_optimizer_works_with_every_scheme(scheme):
    """Each optimizer's step moves the scheme's trainable tensors, all finite, and leaves
    the frozen base as it was."""
    for name in OPTIMIZERS:
        model = apply_scheme(tiny_model("qwen2"), scheme)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        engine = zo_engine(model, make_optimizer(name), seed=0)
        r = engine.step(lm_batch(VOCAB), lr=1e-3)
        engine.close()
        assert not r.skipped and math.isfinite(r.loss), (scheme, name)
        after = dict(model.named_parameters())
        trainable = {n for n, p in after.items() if p.requires_grad}
        assert trainable and all(torch.isfinite(after[n]).all() for n in trainable)
        assert any(not torch.equal(after[n], before[n]) for n in trainable), (scheme, name)
        assert all(torch.equal(after[n], before[n]) for n in after if n not in trainable), \
            (scheme, name)


def test_lora_defaults_and_options():
    model = apply_scheme(tiny_model("llama"), "lora")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert {n.split(".")[-4] for n in names} == {"q_proj", "v_proj"}  # r=8 on q and v
    a = dict(model.named_parameters())[names[0]]
    assert 8 in a.shape and model.peft_config["default"].lora_alpha == 16
    from edgezo.config.options import SchemeOptions

    custom = apply_scheme(tiny_model("llama"),
                          SchemeOptions("lora", lora_r=2, lora_targets=["o_proj"]))
    names = [n for n, p in custom.named_parameters() if p.requires_grad]
    assert {n.split(".")[-4] for n in names} == {"o_proj"}


def test_prompt_starts_from_real_vocabulary_embeddings():
    model = apply_scheme(tiny_model("llama"), "prompt")
    prompt = model.prompt_encoder["default"].embedding.weight
    vocab = model.get_input_embeddings().weight
    assert prompt.shape[0] == 10
    for row in prompt:
        assert (vocab == row).all(1).any()


def test_prefix_starts_from_real_keys_and_values():
    base = tiny_model("llama")
    model = apply_scheme(base, "prefix")
    weight = model.prompt_encoder["default"].embedding.weight
    assert weight.shape[0] == 5
    # Row 0 begins with layer 0's key vectors for the first sampled token.
    ids = torch.randint(0, base.get_input_embeddings().weight.shape[0], (1, 5),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = model.get_base_model()(input_ids=ids, use_cache=True).past_key_values
    key0 = cache.layers[0].keys[0, :, 0, :].reshape(-1)
    torch.testing.assert_close(weight[0, : key0.numel()], key0)


def test_head_scheme_trains_only_the_output_matrix():
    model = apply_scheme(tiny_model("gpt2"), "head")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["transformer.wte.weight"]  # tied with lm_head


def test_export_errors(tiny_folder, data_dir, tmp_path):
    with pytest.raises(ConfigError, match="holds no saved model"):
        export_run(tmp_path, "peft", tmp_path / "x")
    sess = Session(model=tiny_folder, data_dir=data_dir, batch_size=4)
    try:
        sess.save(tmp_path / "full")
    finally:
        sess.close()
    with pytest.raises(ConfigError, match="has no adapter; use --format merged"):
        export_run(tmp_path / "full", "peft", tmp_path / "x")
    with pytest.raises(ConfigError, match="valid formats: gguf, merged, onnx, peft"):
        export_run(tmp_path / "full", "tflite", tmp_path / "x")
    assert json.loads((tmp_path / "full" / "report.json").read_text())["scheme"] == "full"


@pytest.fixture(scope="module")
def wide_folder(tmp_path_factory):
    """Layer widths of 64: bitsandbytes' CPU NF4 kernels work in 64-value blocks."""
    folder = tmp_path_factory.mktemp("tiny-llama-64")
    save_tiny(folder, "llama", width=64)
    return str(folder)


@pytest.mark.parametrize("quantize, scheme", [("nf4", "lora"), ("int8", "lora"),
                                              ("nf4", "prompt")])
def test_quantized_bases_train_adapters_on_cpu(wide_folder, data_dir, tmp_path, quantize,
                                                scheme):
    import bitsandbytes as bnb

    sess = Session(model=wide_folder, data_dir=data_dir, scheme=scheme, quantize=quantize,
                   batch_size=4, lr=0.05, seed=0)
    try:
        layer = sess.model.get_base_model().model.layers[0].mlp.down_proj
        kind = bnb.nn.Linear4bit if quantize == "nf4" else bnb.nn.Linear8bitLt
        assert isinstance(getattr(layer, "base_layer", layer), kind)
        frozen = {n: p.detach().clone() for n, p in sess.model.named_parameters()
                  if not p.requires_grad}
        results = [sess.step() for _ in range(2)]
        assert all(not r.skipped and r.loss > 0 for r in results)
        params = dict(sess.model.named_parameters())
        assert all(torch.equal(params[n], v) for n, v in frozen.items())
        assert sess.report()["hyperparameters"]["quantize"] == quantize
        sess.save(tmp_path / "run")
    finally:
        sess.close()
    out = export_run(tmp_path / "run", "peft", tmp_path / "peft")
    assert (out / "adapter_model.safetensors").is_file()


def test_full_fine_tuning_of_a_quantized_base_is_refused(wide_folder, data_dir):
    with pytest.raises(ConfigError, match="cannot take ZO updates"):
        Session(model=wide_folder, data_dir=data_dir, quantize="nf4")


def test_lm_head_gets_a_contiguous_input_for_every_scheme():
    """A strided head input made torch expand the head weight per row (864 MiB on
    SmolLM2 at 16 rows); edgezo hands the head a contiguous copy instead."""
    from edgezo.models.schemes import apply_scheme
    from edgezo.models.tiny import VOCAB, tiny_model

    for scheme in ("full", "lora", "prefix", "prompt", "head"):
        model = apply_scheme(tiny_model("llama"), scheme)
        seen = []
        model.get_output_embeddings().register_forward_hook(
            lambda _m, args, _out, seen=seen: seen.append(args[0].is_contiguous()))
        with torch.no_grad():
            model(input_ids=torch.randint(3, VOCAB, (3, 9)), logits_to_keep=1, use_cache=False)
        assert seen == [True], scheme


def test_a_half_precision_heads_backward_keeps_no_fp32_weight(monkeypatch):
    """A backward through the bf16 head saves only its bf16 inputs (plain autograd saved
    every chunk's fp32 cast: the whole head in fp32, once per call), and its gradients
    and forward-mode tangents are those of the fp32 product."""
    from torch.func import jvp

    from edgezo.models import schemes

    monkeypatch.setattr(schemes, "HEAD_CHUNK_VALUES", 40 * 32)  # 7 chunks of rows
    head = torch.nn.Linear(32, 256).to(torch.bfloat16)
    x = torch.randn(3, 2, 32).to(torch.bfloat16).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t,
                                                  lambda t: t):
        out = schemes._fp32_logits(head, x)
    assert saved and all(t.dtype == torch.bfloat16 for t in saved)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref = [t.detach().clone().requires_grad_() for t in (x, head.weight, head.bias)]
    want = torch.nn.functional.linear(*(t.float() for t in ref))
    want.backward(grad)
    assert torch.equal(out, want)
    for got, exp in zip((x, head.weight, head.bias), ref, strict=True):
        assert got.grad.dtype == torch.bfloat16
        torch.testing.assert_close(got.grad, exp.grad)
    primals = (x.detach(), head.weight.detach(), head.bias.detach())
    tangents = tuple(torch.randn_like(t) for t in primals)
    tangent = jvp(lambda *a: schemes._HalfHeadLogits.apply(*a), primals, tangents)[1]
    expected = jvp(lambda *a: torch.nn.functional.linear(*(t.float() for t in a)),
                   primals, tangents)[1]
    torch.testing.assert_close(tangent, expected)


def test_a_half_precision_head_computes_fp32_logits_a_4_mib_chunk_at_a_time(monkeypatch):
    """The bf16 head's logits are the fp32 product of its weight (the whole matrix cast
    at once gives the same values), cast a chunk of rows at a time: at most
    HEAD_CHUNK_VALUES values of fp32 weight live, and the plan counts that chunk."""
    from edgezo.memory import terms
    from edgezo.models import schemes

    model = schemes.apply_scheme(tiny_model("qwen2", dtype=torch.bfloat16), "full")
    head = model.get_output_embeddings()
    monkeypatch.setattr(schemes, "HEAD_CHUNK_VALUES", 40 * 32)  # 40 rows of 32: 7 chunks
    casts = []
    real_float = torch.Tensor.float
    monkeypatch.setattr(torch.Tensor, "float",
                        lambda t: casts.append(t.shape) or real_float(t))
    x = torch.randn(3, 2, 32).to(torch.bfloat16)
    got = head(x)
    monkeypatch.setattr(torch.Tensor, "float", real_float)
    want = torch.nn.functional.linear(x.float(), head.weight.float())
    assert got.dtype == torch.float32 and torch.equal(got, want)
    weight_casts = [s for s in casts if s[-1] == 32 and s[0] != 3]
    assert [s[0] for s in weight_casts] == [40] * 6 + [16]  # 256 rows
    config = model.config
    small = terms.activation_bytes(config, 4, 8, 2)  # bf16: a 40-row fp32 chunk
    fp32 = terms.activation_bytes(config, 4, 8, 4)
    monkeypatch.setattr(schemes, "HEAD_CHUNK_VALUES", 1 << 20)  # all 256 rows at once
    assert terms.activation_bytes(config, 4, 8, 2) - small == (256 - 40) * 32 * 4
    assert terms.activation_bytes(config, 4, 8, 4) == fp32  # an fp32 head casts nothing


def test_every_registered_scheme_is_applied_by_its_own_function():
    from edgezo.models.catalog import SCHEMES
    from edgezo.models.schemes import APPLY

    assert set(APPLY) == set(SCHEMES)
