"""Quantization-aware ZO (--qat): the fake quantization is GGUF's, forwards see it, the
updates go to the master, and the exported GGUF is the model that was trained."""

import gguf
import numpy as np
import pytest
import torch
from conftest import lm_batch, on_device_of, zo_engine

from edgezo import Session
from edgezo.config.runconfig import RunConfig
from edgezo.errors import ConfigError
from edgezo.models.catalog import SCHEMES
from edgezo.models.tiny import VOCAB, tiny_model
from edgezo.zo.optimizers import make_optimizer
from edgezo.zo.qat import extra_bytes, fake_quant, quantized_tensors

KINDS = {"int4": gguf.GGMLQuantizationType.Q4_1, "int8": gguf.GGMLQuantizationType.Q8_0}


def gguf_round_trip(w: torch.Tensor, fmt: str) -> torch.Tensor:
    kind = KINDS[fmt]
    packed = gguf.quants.quantize(w.numpy().astype(np.float32), kind)
    return torch.from_numpy(gguf.quants.dequantize(packed, kind).reshape(w.shape).copy())


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_fake_quant_is_gguf_quantize_then_dequantize_bit_for_bit(fmt):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g) * torch.logspace(-4, 1, 64).unsqueeze(1)
    w[0, :32] = 0.25  # a constant block (d = 0)
    w[1, :32] = 0.0
    w[2, :32] = torch.arange(32) / 2 - 8  # exact halves: the rounding's ties
    ours = fake_quant(w, fmt)
    assert torch.equal(ours, gguf_round_trip(w, fmt))
    assert torch.equal(fake_quant(ours, fmt), ours)  # quantized values stay put
    assert not torch.equal(ours, w)


def qat_engine(model, fmt="int4", scheme="full", **kw):
    engine = zo_engine(model, make_optimizer("zo-sgd"), seed=4, eps=1e-2, **kw)
    engine.enable_qat(fmt, SCHEMES[scheme].adapts_linears)
    return engine


@pytest.mark.parametrize("fmt, family", [("int4", "llama"), ("int8", "llama"),
                                         ("int4", "qwen2")])
def test_full_qat_forward_sees_quantized_weights_and_the_master_takes_the_update(fmt,
                                                                                 family):
    """One QAT step is one plain ZO step taken from the quantized weights, whose update
    lands in the master (W0 + the same −η·g·z); the weights stay exactly quantized."""
    model = tiny_model(family, width=64)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = qat_engine(model, fmt)
    tensors = dict(quantized_tensors(model, fmt, False))
    # 7 linear maps a layer, the embedding and (untied) the head
    assert len(tensors) == 2 * 7 + 1 + (not model.config.tie_word_embeddings)
    names = {id(p): n for n, p in model.named_parameters()}
    quantized_start = {n: p.detach().clone() for n, p in model.named_parameters()}
    quantized_state = {k: v.clone() for k, v in model.state_dict().items()}
    for t, tfmt in quantized_tensors(model, fmt, False):
        assert torch.equal(t, fake_quant(start[names[id(t)]], tfmt))
    r = engine.step(lm_batch(VOCAB), lr=1e-2)
    engine.flush()

    plain = tiny_model(family, width=64)
    plain.load_state_dict(quantized_state)
    reference = zo_engine(plain, make_optimizer("zo-sgd"), seed=4, eps=1e-2)
    r_plain = reference.step(lm_batch(VOCAB), lr=1e-2)
    reference.close()
    assert r.projected_grads == pytest.approx(r_plain.projected_grads, rel=1e-6)
    moved = dict(plain.named_parameters())
    masters = {names[id(engine.blocks.params[i])]: m
               for i, (m, _) in engine.qat.masters.items()}
    for name, master in masters.items():
        step = moved[name].detach() - quantized_start[name]
        torch.testing.assert_close(master - start[name], step, rtol=0, atol=1e-6)
    for t, tfmt in quantized_tensors(model, fmt, False):
        assert torch.equal(t, fake_quant(masters[names[id(t)]], tfmt))
    engine.close()


def test_qat_replays_and_restores_from_its_state_bit_exactly():
    model = tiny_model("llama", width=64)
    engine = qat_engine(model)
    log = [engine.step(lm_batch(VOCAB, seed=s), lr=1e-2).log_entry() for s in range(3)]
    saved = {k: v.clone() for k, v in engine.state_tensors().items()}
    assert saved and all(k.startswith("qat.master.") for k in saved)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    more = [engine.step(lm_batch(VOCAB, seed=9), lr=1e-2)]
    engine.close()

    fresh = tiny_model("llama", width=64)
    replayed = qat_engine(fresh)
    for entry in log:
        replayed.replay(entry)
    replayed.flush()
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, weights[k]), k
    for k, v in replayed.state_tensors().items():
        assert torch.equal(v, saved[k]), k
    replayed.close()

    resumed_model = tiny_model("llama", width=64)
    resumed_model.load_state_dict(weights)
    resumed = qat_engine(resumed_model)
    resumed.load_state_tensors(saved, step=3, mask_epoch=None)
    again = resumed.step(lm_batch(VOCAB, seed=9), lr=1e-2)
    resumed.close()
    assert again.projected_grads == more[0].projected_grads
    for k, v in resumed_model.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k


def _positions(b):
    return (b["attention_mask"].cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("scheme", ["full", "lora"])
def test_the_gguf_export_of_a_qat_run_is_the_model_it_trained(tmp_path, data_dir, scheme):
    """The Q4_1 file transformers reads back computes the QAT model's logits: the export
    re-quantizes weights that are already on the Q4_1 grid (LoRA: merged first)."""
    from transformers import AutoModelForCausalLM

    from edgezo.models.tiny import save_tiny

    folder = tmp_path / "tiny"
    save_tiny(folder, "llama", width=64)
    sess = Session(model=str(folder), data_dir=data_dir, scheme=scheme, qat="int4",
                   batch_size=4, lr=1e-2 if scheme == "full" else 5e-2, seed=0, dtype="fp32")
    try:
        for _ in range(3):
            assert not sess.step().skipped
        sess.engine.flush()
        b = {k: v for k, v in lm_batch(VOCAB).items() if k in ("input_ids", "attention_mask")}
        with torch.no_grad():
            ours = sess.model(**on_device_of(sess.model, b),
                              position_ids=_positions(b).to(sess.device)).logits.cpu()
        path = sess.save(tmp_path / "gguf", "gguf", gguf_type="q4_1")
        assert sess.report()["hyperparameters"]["qat"] == "int4"
        assert "qat_masters" in sess.plan.components
    finally:
        sess.close()
    back = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = back(**b, position_ids=_positions(b)).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)


def test_lora_qat_computes_the_merged_weight_quantized():
    import peft

    model = peft.get_peft_model(tiny_model("llama", width=64),
                                peft.LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    engine = qat_engine(model, scheme="lora")
    engine.step(lm_batch(VOCAB), lr=1e-2)
    engine.flush()
    b = {k: v for k, v in lm_batch(VOCAB).items() if k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        ours = model(**b).logits
        engine.close()  # the adapters' own forward back
        merged = model.merge_and_unload()
        for t, fmt in quantized_tensors(merged, "int4", False):
            t.copy_(fake_quant(t, fmt))
        expected = merged(**b).logits
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


def test_plan_prices_the_masters():
    """One fp32 master per quantized trainable matrix: every layer linear map and the
    tied embedding (counted once)."""
    model = tiny_model("llama", width=64)
    layer_linears = sum(m.weight.numel() for m in model.model.layers.modules()
                        if isinstance(m, torch.nn.Linear))
    assert extra_bytes(model, False) == 4 * (layer_linears + VOCAB * 64)


@pytest.mark.parametrize("options, message", [
    ({"qat": "int4", "scheme": "prefix"}, "use full or lora"),
    ({"qat": "int4", "scheme": "lora", "quantize": "nf4"}, "drop one of them"),
    ({"qat": "int4", "optimizer": "fo-adam"}, "pick a ZO optimizer"),
    ({"qat": "int4", "offload": "disk"}, "does not stream"),
])
def test_qat_options_that_cannot_work_are_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_flat(**options).validate()


def test_lora_qat_leaves_the_adapters_unquantized_at_any_rank():
    """peft's lora_A/lora_B are nn.Linear too: at rank 32 both would fill 32-value
    blocks, but only the base weights are quantized (merged with the adapter)."""
    import peft

    model = peft.get_peft_model(tiny_model("llama", width=64),
                                peft.LoraConfig(r=32, lora_alpha=64, task_type="CAUSAL_LM"))
    engine = qat_engine(model, scheme="lora")
    names = {id(p): n for n, p in model.named_parameters()}
    assert not engine.qat.masters  # no trainable tensor is quantized in LoRA QAT
    quantized = [names[id(t)] for t, _ in quantized_tensors(model, "int4", True)]
    assert quantized and not any("lora_" in n for n in quantized)
    assert len(engine.qat.adapted) == 2 * 2 * 2  # A and B of q and v in two layers
    engine.close()


def test_bf16_qat_masters_do_not_drift_without_updates():
    """A bf16 weight holds Q(master) rounded to bf16; moving "the change" into the master
    must not move it by that rounding on every call."""
    model = tiny_model("llama", width=64, dtype=torch.bfloat16)
    engine = qat_engine(model)
    masters = {i: m.clone() for i, (m, _) in engine.qat.masters.items()}
    for _ in range(3):
        engine.qat.after_update(list(masters))
    for i, m in engine.qat.masters.items():
        assert torch.equal(m[0], masters[i]), i
    engine.close()


def test_chunked_requantization_is_the_whole_matrix_pass(monkeypatch):
    """Re-quantizing a few blocks at a time (small temporaries) gives the one-pass result,
    and a QAT step with tiny chunks is bit-identical to one with a single chunk."""
    from edgezo.zo import qat

    g = torch.Generator().manual_seed(3)
    master = torch.randn(64, 96, generator=g)
    whole = fake_quant(master, "int4")
    monkeypatch.setattr(qat, "CHUNK_BLOCKS", 5)
    out = torch.empty_like(master)
    qat.requantize(out, master, "int4")
    assert torch.equal(out, whole)

    def one_step():
        model = tiny_model("llama", width=64)
        engine = qat_engine(model)
        engine.step(lm_batch(VOCAB), lr=1e-2)
        engine.flush()
        state = {k: v.clone() for k, v in engine.state_tensors().items()}
        engine.close()
        return model.state_dict(), state

    small = one_step()
    monkeypatch.setattr(qat, "CHUNK_BLOCKS", 1 << 20)
    big = one_step()
    for a, b in zip(small, big, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
