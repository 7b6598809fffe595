"""Quantized bases: the optimum-quanto backend, QZO (ZO on the scales) and its clipping."""

import json
import math

import pytest
import torch
from conftest import lm_batch, on_device_of, zo_engine

from edgezo import Session
from edgezo.config.runconfig import RunConfig
from edgezo.errors import ConfigError
from edgezo.models.quantized import (
    load_quantized,
    quantize_layers,
    quantized_linears,
    scale_count,
    stored_bytes,
    tensor_bytes,
    train_scales,
)
from edgezo.models.tiny import VOCAB, save_tiny, tiny_model
from edgezo.zo.optimizers import make_optimizer

pytest.importorskip("optimum.quanto")


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """Two families with layer widths of 64 (bitsandbytes' NF4 blocks are 64 values)."""
    out = {}
    for family in ("llama", "qwen2"):
        folder = tmp_path_factory.mktemp(f"tiny-{family}-64")
        save_tiny(folder, family, width=64)
        out[family] = str(folder)
    return out


def codes(model) -> dict[str, torch.Tensor]:
    """Every quantized linear's integer codes, as stored by its backend."""
    out = {}
    for name, m in quantized_linears(model):
        w = m.weight
        out[name] = (w._data._data if hasattr(w._data, "_data") else w._data).clone() \
            if hasattr(w, "_data") else w.data.clone()
    return out


def backend_scales(model) -> dict[str, torch.Tensor]:
    return {name: (m.weight._scale if hasattr(m.weight, "_scale")
                   else m.weight.quant_state.absmax).clone()
            for name, m in quantized_linears(model)}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("quantize", ["quanto-int4", "quanto-int8", "quanto-int2", "nf4"])
def test_scales_scheme_trains_only_the_scales_and_keeps_the_codes(wide, data_dir, tmp_path,
                                                                   family, quantize):
    # fp32 on every CPU: the reloaded model must give the very logits, and a bf16 session's
    # head computes its logits in fp32 where the reloaded model's does not
    sess = Session(model=wide[family], data_dir=data_dir, scheme="scales", quantize=quantize,
                   batch_size=4, lr=1e-3, seed=0, dtype="fp32")
    try:
        model = sess.model
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(n.endswith("zo_scale") for n in trainable)
        # 7 linear maps per layer, 2 layers; one scale per group of the backend's format
        assert len(trainable) == 14
        assert sum(p.numel() for n, p in model.named_parameters() if p.requires_grad) == sum(
            scale_count(getattr(m.weight, "quant_state", m.weight).shape, quantize)
            for _, m in quantized_linears(model))
        before_codes, before_scales = codes(model), backend_scales(model)
        results = [sess.step() for _ in range(3)]
        assert all(math.isfinite(r.loss) and not r.skipped for r in results)
        out = sess.save(tmp_path / "run")  # also applies the last, deferred, update
        after_codes, after_scales = codes(model), backend_scales(model)
        for name in before_codes:
            assert torch.equal(before_codes[name], after_codes[name]), name
        # the update landed in the backend's own scale tensors (shared storage)
        assert any(not torch.equal(before_scales[n], after_scales[n]) for n in before_scales)
        logits = model(**on_device_of(model, {k: v for k, v in lm_batch(VOCAB).items()
                                              if k in ("input_ids", "attention_mask")})).logits
    finally:
        sess.close()
    reloaded = load_quantized(out)
    assert len(quantized_linears(reloaded)) == 14
    again = reloaded(**on_device_of(reloaded, {k: v for k, v in lm_batch(VOCAB).items()
                                               if k in ("input_ids", "attention_mask")})).logits
    torch.testing.assert_close(again.cpu(), logits.cpu(), rtol=0, atol=1e-5)
    for name, value in backend_scales(reloaded).items():
        assert torch.equal(value, after_scales[name]), name


def test_a_reloaded_int8_model_has_aligned_weights_and_runs_in_bf16(wide, data_dir, tmp_path):
    """safetensors may place a tensor at any byte; torch's int8 x bf16 CPU kernel, which
    quanto int8 uses, crashed the process on AVX-512 machines on weights that did not start
    on a 64-byte boundary (here the second layer's)."""
    sess = Session(model=wide["qwen2"], data_dir=data_dir, scheme="scales",
                   quantize="quanto-int8", batch_size=4, lr=1e-3, seed=0, dtype="bf16")
    try:
        sess.step()
        out = sess.save(tmp_path / "run")
    finally:
        sess.close()
    reloaded = load_quantized(out)
    datas = [m.weight._data for _, m in quantized_linears(reloaded)]
    assert datas and all(d.data_ptr() % 64 == 0 for d in datas)
    batch = {k: v for k, v in lm_batch(VOCAB).items() if k in ("input_ids", "attention_mask")}
    assert torch.isfinite(reloaded(**batch).logits.float()).all()


@pytest.mark.parametrize("quantize", ["quanto-int4", "nf4"])
def test_saved_quantized_model_is_the_size_of_the_loaded_one(wide, data_dir, tmp_path,
                                                              quantize):
    """The trained scales write back into the backend's format: the file is the size of
    the same base saved untrained, and a quarter of the fp32 model's linear bytes."""
    sizes = {}
    for steps in (0, 2):
        sess = Session(model=wide["llama"], data_dir=data_dir, scheme="scales",
                       quantize=quantize, batch_size=4, lr=1e-3, seed=0)
        for _ in range(steps):
            sess.step()
        out = sess.save(tmp_path / f"run{steps}")
        sess.close()
        sizes[steps] = (out / "model.safetensors").stat().st_size
        assert json.loads((out / "report.json").read_text())["scheme"] == "scales"
    assert abs(sizes[0] - sizes[2]) < 64  # the same tensors; metadata may differ by bytes
    dense = tiny_model("llama", width=64)
    linear = sum(m.weight.numel() * 4 for m in dense.model.layers.modules()
                 if isinstance(m, torch.nn.Linear))
    other = sum(p.numel() * 4 for p in dense.parameters()) - linear
    assert sizes[2] < other + linear / 4


def test_quanto_weights_are_priced_by_their_real_bytes():
    model = quantize_layers(tiny_model("llama", width=64), "quanto-int4")
    layer = model.model.layers[0].mlp.down_proj
    real = tensor_bytes(layer.weight)
    assert real == stored_bytes(layer.weight.shape, "quanto-int4", "frozen")
    assert real < layer.weight.numel()  # under a byte a weight


def test_plan_of_the_scales_scheme_prices_the_scales(wide):
    """The planner's meta model (no weights loaded) trains exactly as many scales as the
    loaded quantized model, and prices the weights as the backend stores them."""
    from edgezo.device.profiles import load_profile
    from edgezo.memory.planner import meta_model, price
    from edgezo.models.loading import load_config
    from edgezo.zo.batch import Shape

    for quantize in ("quanto-int4", "nf4"):
        cfg = RunConfig.from_flat(model=wide["llama"], scheme="scales", quantize=quantize,
                                  dtype="fp32").resolved("fp32")
        priced = meta_model(cfg, load_config(wide["llama"]), "fp32")
        planned = sum(p.numel() for p in priced.blocks.params)
        live = train_scales(quantize_layers(tiny_model("llama", width=64), quantize)) \
            if quantize != "nf4" else None
        if live is not None:
            assert planned == sum(p.numel() for p in live.parameters() if p.requires_grad)
        else:
            assert planned == sum(scale_count(m.weight.shape, "nf4") for m in
                                  tiny_model("llama", width=64).model.layers.modules()
                                  if isinstance(m, torch.nn.Linear))
        from edgezo.memory.planner import Shapes

        plan = price(cfg, priced, load_profile("cpu-16gb"),
                     Shapes(Shape(4, 16), None), pair=True)
        assert plan.components["weights"] < sum(
            p.numel() * 4 for p in tiny_model("llama", width=64).parameters())


@pytest.mark.parametrize("options, message", [
    ({"scheme": "scales"}, "add --quantize"),
    ({"scheme": "scales", "quantize": "int8"}, "LLM.int8 keeps no group scales"),
    ({"scheme": "scales", "quantize": "nf4", "optimizer": "fo-adam"}, "pick a ZO optimizer"),
    ({"g_clip": 1.0, "optimizer": "fo-sgd"}, "makes none"),
    ({"quantize": "quanto-int4"}, "--scheme scales"),
])
def test_scales_options_that_cannot_work_are_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_flat(**options).validate()


def test_scales_scheme_clips_g_by_default():
    cfg = RunConfig.from_flat(scheme="scales", quantize="nf4").resolved("fp32")
    assert cfg.estimator.g_clip == 100.0
    assert RunConfig.from_flat().resolved("fp32").estimator.g_clip is None


def test_clipped_estimates_are_logged_clipped_and_replay_exactly():
    """g beyond ±C becomes ±C: in the update, in the seed log (so a replay redoes the
    clipped step) and in the step's count."""
    def run(clip):
        model = tiny_model("llama")
        engine = zo_engine(model, make_optimizer("zo-sgd"), seed=3, eps=1e-2, g_clip=clip)
        rs = [engine.step(lm_batch(VOCAB, seed=s), lr=1e-2) for s in range(3)]
        engine.close()
        return model, rs

    _, free = run(None)
    raw = [g for r in free for g in r.projected_grads]
    clip = sorted(abs(g) for g in raw)[1] * 0.999  # below all but the smallest |g|
    model, clipped = run(clip)
    got = [g for r in clipped for g in r.projected_grads]
    assert got[0] == pytest.approx(max(-clip, min(clip, raw[0])), rel=1e-9)
    assert all(abs(g) <= clip for g in got)
    assert sum(r.clipped for r in clipped) >= 1
    assert all(e["grads"] == r.projected_grads for r in clipped
               for e in r.log_entry()["groups"])
    fresh = tiny_model("llama")
    engine = zo_engine(fresh, make_optimizer("zo-sgd"), seed=3, eps=1e-2, g_clip=clip)
    for r in clipped:
        engine.replay(r.log_entry())
    engine.close()
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("scheme", ["lora", "prompt", "head"])
def test_adapter_schemes_train_on_a_quanto_base(wide, data_dir, scheme):
    sess = Session(model=wide["qwen2"], data_dir=data_dir, scheme=scheme,
                   quantize="quanto-int4", batch_size=4, lr=1e-2, seed=0)
    try:
        model = sess.model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        before = codes(base)
        assert len(before) == 14
        results = [sess.step() for _ in range(2)]
        assert all(math.isfinite(r.loss) for r in results)
        assert all(torch.equal(v, codes(base)[n]) for n, v in before.items())
        assert sess.report()["hyperparameters"]["quantize"] == "quanto-int4"
    finally:
        sess.close()


def test_bf16_quanto_int4_scales_keep_the_reference_layout():
    """In bf16 quanto packs int4 groups of 128 for TinyGemm, folding the scales away;
    the scales scheme keeps (codes, scale, shift) and trains them."""
    model = tiny_model("llama", width=256, dtype=torch.bfloat16)
    model = train_scales(quantize_layers(model, "quanto-int4", plain=True))
    engine = zo_engine(model, make_optimizer("zo-sgd"), seed=0, eps=1e-3)
    before = backend_scales(model)
    assert len(before) == 14 and all(v.dtype == torch.bfloat16 for v in before.values())
    engine.step(lm_batch(VOCAB), lr=1e-3)
    engine.close()
    assert any(not torch.equal(v, backend_scales(model)[n]) for n, v in before.items())


def test_quanto_group_sizes_follow_quanto():
    from edgezo.models.quantized import quanto_group

    assert [quanto_group(n, 4) for n in (64, 200, 576, 960, 1536)] == [None, None, 96, 96,
                                                                          128]
    assert quanto_group(1536, 8) is None
