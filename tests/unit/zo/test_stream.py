"""Block streaming: a streamed model computes exactly what the resident model computes."""

from pathlib import Path

import pytest
import torch
from conftest import lm_batch, zo_engine

from edgezo.errors import ConfigError
from edgezo.models.tiny import VOCAB, tiny_model
from edgezo.zo.optimizers import make_optimizer


def run(family, dtype, steps, stream=None, optimizer="zo-sgd", pair=True, **engine_kw):
    model = tiny_model(family, dtype=dtype)
    engine = zo_engine(model, make_optimizer(optimizer), eps=1e-2, seed=3, pair=pair,
                      **engine_kw)
    streamer = engine.stream(**stream) if stream is not None else None
    losses = [engine.step(lm_batch(VOCAB, seed=s), lr=1e-2).loss for s in range(steps)]
    losses.append(engine.loss(lm_batch(VOCAB, seed=99)))  # flushes the last update
    stats = streamer.stats() if streamer else None
    engine.close()
    return losses, {k: v.clone() for k, v in model.state_dict().items()}, stats


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pair", [True, False], ids=["pair", "two-pass"])
def test_streamed_from_disk_equals_resident(family, dtype, pair, tmp_path):
    ref_losses, ref_weights, _ = run(family, dtype, 4, pair=pair)
    losses, weights, stats = run(family, dtype, 4, pair=pair,
                                 stream=dict(layers=[0, 1], device="cpu", tier="disk",
                                             folder=str(tmp_path)))
    assert losses == ref_losses  # bit-exact, not close
    assert weights.keys() == ref_weights.keys()
    for k in ref_weights:
        assert torch.equal(weights[k], ref_weights[k]), k
    # both layers were loaded once per forward; at most one buffer was ever in use
    assert stats["max_layers_held"] == 1
    assert stats["bytes_out"] > 0


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_streamed_from_pinned_host_memory_equals_resident_on_a_gpu(dtype):
    """The host tier (CUDA only): layers in pinned host memory, up and down on their own
    streams while the GPU computes, give the resident GPU run's losses and weights."""
    def run_on_gpu(streamed: bool):
        model = tiny_model("llama", dtype=dtype).cuda()
        engine = zo_engine(model, make_optimizer("zo-sgd"), eps=1e-2, seed=3)
        streamer = engine.stream([0, 1], "cuda", tier="host") if streamed else None
        batches = [{k: v.cuda() for k, v in lm_batch(VOCAB, seed=s).items()}
                   for s in (0, 1, 2, 99)]
        losses = [engine.step(b, lr=1e-2).loss for b in batches[:3]]
        losses.append(engine.loss(batches[3]))  # flushes the last update
        if streamer is not None:  # two buffers on a GPU: one computing, one arriving
            stats = streamer.stats()
            assert stats["buffers"] == 2 and stats["bytes_out"] > 0
        engine.close()
        return losses, {k: v.cpu() for k, v in model.state_dict().items()}

    want_losses, want = run_on_gpu(False)
    losses, got = run_on_gpu(True)
    assert losses == want_losses  # bit-exact, not close
    assert all(torch.equal(got[n], t) for n, t in want.items())


@pytest.mark.parametrize("optimizer, kw", [
    ("fzoo", {"q": 2}), ("hizoo", {}), ("hizoo-l", {}), ("zo-sgd", {"directions": "lowrank"}),
    ("zo-adam", {"directions": "subspace", "rank": 2}), ("zo-sgd", {"noise": "generator"}),
    ("fzoo", {"q": 2, "block_wise": True}),
], ids=str)
def test_the_new_estimators_stream_exactly(optimizer, kw, tmp_path):
    """Each time-to-accuracy estimator through the disk tier equals its resident run."""
    ref_losses, ref_weights, _ = run("llama", torch.float32, 3, optimizer=optimizer,
                                     pair=optimizer != "fzoo", **kw)
    losses, weights, _ = run("llama", torch.float32, 3, optimizer=optimizer,
                             pair=optimizer != "fzoo",
                             stream=dict(layers=[0, 1], device="cpu", tier="disk",
                                         folder=str(tmp_path)), **kw)
    assert losses == ref_losses
    for k in ref_weights:
        assert torch.equal(weights[k], ref_weights[k]), k


@pytest.mark.parametrize("master", [None, torch.float32], ids=["own-dtype", "fp32-master"])
def test_two_buffers_prefetch_on_the_io_thread_and_stay_exact(master, tmp_path):
    """With two buffers the disk tier reads the next layer and writes updated ones back
    on its worker thread; the run is still bit-identical to the single-buffer one."""
    stream = dict(layers=[0, 1, 2], device="cpu", folder=str(tmp_path / "a"),
                  master_dtype=master)

    def go(buffers, folder):
        model = tiny_model("llama", dtype=torch.bfloat16, layers=3)
        engine = zo_engine(model, make_optimizer("zo-adam"), eps=1e-2, seed=3)
        streamer = engine.stream(**{**stream, "folder": str(tmp_path / folder)},
                                 buffers=buffers)
        losses = [engine.step(lm_batch(VOCAB, seed=s), lr=1e-2).loss for s in range(4)]
        losses.append(engine.loss(lm_batch(VOCAB, seed=99)))
        stats = streamer.stats()
        engine.close()
        return losses, model.state_dict(), stats, streamer

    ref, ref_w, ref_stats, _ = go(1, "one")
    got, got_w, stats, streamer = go(2, "two")
    assert got == ref and all(torch.equal(v, ref_w[k]) for k, v in got_w.items())
    assert ref_stats["max_layers_held"] == 1 and stats["max_layers_held"] == 2
    assert stats["bytes_out"] == ref_stats["bytes_out"] > 0
    assert streamer._io is not None and not streamer._writes


def test_a_failed_write_back_surfaces_on_the_training_thread(tmp_path, monkeypatch):
    from edgezo.zo.stream import disk as stream_mod

    engine = zo_engine(tiny_model("llama"), make_optimizer("zo-sgd"), eps=1e-2, seed=0)
    engine.stream([0, 1], "cpu", folder=str(tmp_path), buffers=2)
    engine.step(lm_batch(VOCAB, seed=0), lr=1e-2)

    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(stream_mod, "_write_exact", full)
    with pytest.raises(OSError, match="free disk space or pick another --offload-dir"):
        for s in range(1, 4):
            engine.step(lm_batch(VOCAB, seed=s), lr=1e-2)
        engine.flush()
        engine.perturbation.streamer.close()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("optimizer", ["zo-sgd", "zo-adam", "zo-sgd-cons"])
def test_fp32_masters_hold_exactly_the_fp32_sum_of_the_updates(dtype, optimizer, tmp_path):
    """A half-precision layer streamed with fp32 masters: after N steps each master is
    bit for bit what the same logged updates give when applied to an fp32 copy of the
    starting weights, and the weights the forward uses are those masters rounded."""
    model = tiny_model("llama", dtype=dtype)
    start = {k: v.float() for k, v in model.state_dict().items()}
    engine = zo_engine(model, make_optimizer(optimizer), eps=1e-2, seed=3)
    streamer = engine.stream([0, 1], "cpu", folder=str(tmp_path), master_dtype=torch.float32)
    # a small lr: most updates are under half an ulp of a 16-bit weight
    log = [engine.step(lm_batch(VOCAB, seed=s), lr=1e-4).log_entry() for s in range(4)]
    engine.flush()
    assert streamer.stats()["master_dtype"] == "float32"
    # the planner's buffer is the streamer's, up to the 64-byte alignment of each view
    from edgezo.memory.streaming import layer_bytes

    planned = max(s.total + s.masters for s in layer_bytes(engine.blocks))
    views = 2 * len(streamer.layers[0].tensors)
    assert planned <= streamer.slot_bytes < planned + 64 * views
    masters, compute = {}, {}
    names = {id(p): n for n, p in model.named_parameters()}
    for layer in streamer.layers:
        with streamer.hold(layer.unit.module):
            for t in layer.tensors:
                masters[names[id(t.param)]] = streamer.master_view(t.param).clone()
                compute[names[id(t.param)]] = t.param.detach().clone()
    assert all(m.dtype == torch.float32 for m in masters.values())

    ref = tiny_model("llama", dtype=torch.float32)
    ref.load_state_dict(start)
    replayer = zo_engine(ref, make_optimizer(optimizer), eps=1e-2, seed=3)
    for entry in log:
        replayer.replay(entry)
    replayer.flush()
    want = dict(ref.named_parameters())
    changed = 0
    for name, m in masters.items():
        assert torch.equal(m, want[name].detach()), name
        assert torch.equal(compute[name], m.to(dtype)), name
        changed += int((m != start[name]).sum())
    # and the masters kept updates that the rounded weights could not show
    lost = sum(int(((m != start[n]) & (compute[n].float() == start[n])).sum())
               for n, m in masters.items())
    assert changed > 0 and lost > 0
    engine.close()


def test_fp32_masters_travel_as_fp32_only_for_trainable_tensors(tmp_path):
    from edgezo.models.schemes import apply_scheme

    model = apply_scheme(tiny_model("llama", dtype=torch.bfloat16), "lora")
    engine = zo_engine(model, make_optimizer("zo-sgd"), eps=1e-2, seed=0)
    streamer = engine.stream([0, 1], "cpu", folder=str(tmp_path), master_dtype=torch.float32)
    frozen = [t for layer in streamer.layers for t in layer.tensors if not t.trainable]
    assert frozen and not any(t.wide for t in frozen)  # the base stays in bf16
    engine.step(lm_batch(VOCAB, seed=0), lr=1e-2)
    engine.flush()
    trainable = [t for layer in streamer.layers for t in layer.tensors if t.trainable]
    assert streamer.bytes_out == sum(t.shape.numel() * 4 for t in trainable)
    engine.close()


def test_fp32_masters_on_a_bf16_model_refuse_other_master_dtypes(tmp_path):
    engine = zo_engine(tiny_model("llama", dtype=torch.bfloat16), make_optimizer("zo-sgd"))
    with pytest.raises(ConfigError, match="fp32 or the weights' own dtype"):
        engine.stream([0], "cpu", master_dtype=torch.float16)


@pytest.mark.parametrize("optimizer", ["zo-adam", "zo-sgd-cons", "zo-sgd-mmt"])
def test_stateful_and_conservative_optimizers_stream_exactly(optimizer, tmp_path):
    ref = run("llama", torch.float32, 3, optimizer=optimizer)
    got = run("llama", torch.float32, 3, optimizer=optimizer,
              stream=dict(layers=[1], device="cpu", folder=str(tmp_path)))
    assert got[0] == ref[0]
    assert all(torch.equal(got[1][k], v) for k, v in ref[1].items())


def test_block_wise_and_q_stream_exactly(tmp_path):
    kw = dict(block_wise=True, q=2)
    ref = run("qwen2", torch.float32, 3, **kw)
    got = run("qwen2", torch.float32, 3, stream=dict(layers=[0, 1], device="cpu"), **kw)
    assert got[0] == ref[0]
    assert all(torch.equal(got[1][k], v) for k, v in ref[1].items())


def test_frozen_weights_never_written_back(tmp_path):
    from edgezo.models.schemes import apply_scheme

    model = apply_scheme(tiny_model("llama"), "lora")
    engine = zo_engine(model, make_optimizer("zo-sgd"), eps=1e-2, seed=0)
    streamer = engine.stream([0, 1], "cpu", folder=str(tmp_path))
    for s in range(3):
        engine.step(lm_batch(VOCAB, seed=s), lr=1e-2)
    engine.flush()
    lora_bytes = sum(t.nbytes for layer in streamer.layers for t in layer.tensors
                     if t.trainable)
    # every step after the first writes back exactly the LoRA tensors, no base weight
    assert 0 < streamer.bytes_out <= 3 * lora_bytes
    assert streamer.bytes_out % lora_bytes == 0
    engine.close()


def test_streamed_weights_are_nan_placeholders_between_forwards():
    model = tiny_model("llama")
    engine = zo_engine(model, make_optimizer("zo-sgd"), eps=1e-2, seed=0)
    engine.stream([0], "cpu")
    w = model.model.layers[0].self_attn.q_proj.weight
    assert torch.isnan(w).all() and w.untyped_storage().nbytes() == w.element_size()
    engine.close()  # back to an ordinary model with real weights
    assert not torch.isnan(w).any()


def test_streaming_refuses_first_order_and_magnitude_masks():
    """The configuration refuses them (one rule, with the fix); an engine built around it
    keeps the invariant."""
    from edgezo.config.runconfig import RunConfig

    for kw in ({"optimizer": "fo-sgd"}, {"optimizer": "forward-grad"},
               {"fo_blocks": ["head"]}):
        with pytest.raises(ConfigError, match="streaming runs ZO"):
            RunConfig.from_flat(offload="disk", **kw).validate()
    with pytest.raises(ConfigError, match="sparsity-mask random"):
        RunConfig.from_flat(offload="disk", sparsity=0.5, sparsity_mask="magnitude").validate()
    for optimizer in ("fo-sgd", "forward-grad"):
        engine = zo_engine(tiny_model("llama"), make_optimizer(optimizer))
        with pytest.raises(RuntimeError, match="ZO-only engine"):
            engine.stream([0], "cpu")
    engine = zo_engine(tiny_model("llama"), make_optimizer("zo-sgd"))
    with pytest.raises(ConfigError, match="host tier"):
        engine.stream([0], "cpu", tier="host")
    with pytest.raises(ConfigError, match="do not exist"):
        engine.stream([7], "cpu")


def tiny_profile(tmp_path, budget_mb: float, device: str = "cuda"):
    path = tmp_path / "tiny-budget.yaml"
    path.write_text(f"name: tiny-budget\ndevice: {device}\ndevice_memory_gb: {budget_mb / 1024}\n"
                    "host_memory_gb: 1\nhost_device_bandwidth_gbps: 10\ndtype: fp32\n"
                    "headroom: 0\n")
    return str(path)


@pytest.fixture(scope="module")
def wide_folder(tmp_path_factory):
    """A 12-layer Llama of width 512: 9.4 MB a layer in fp32, 113 MB in all (above RSS
    noise, and deep enough that one layer buffer is a small part of it)."""
    from edgezo.models.tiny import save_tiny

    folder = tmp_path_factory.mktemp("wide-llama")
    save_tiny(folder, "llama", width=512, layers=12)
    return str(folder)


def test_planner_streams_the_fewest_layers_that_fit(wide_folder, tmp_path):
    from planning import plan_of, run_plan

    base = dict(model=wide_folder, dtype="fp32", batch_size=2, seq_len=16)
    resident = plan_of(profile=tiny_profile(tmp_path, 4096), **base, pair=False)
    layer = resident.components["weights"] // 12  # twelve equal layers dominate the weights
    budget = (resident.total_bytes - layer // 2) / 2**20  # half a layer short
    result = run_plan(profile=tiny_profile(tmp_path, budget), **base, pair=False)
    assert result.plan.fits
    s = result.plan.streaming
    assert s is not None and s["layers"] and s["tier"] == "host"
    # two buffers for a GPU profile: streaming three layers frees one layer's worth
    assert len(s["layers"]) == 3 and s["buffers"] == 2
    assert 2 * s["bytes_in_per_step"] == 3 * result.plan.components["stream_buffers"]
    assert s["bytes_out_per_step"] == s["bytes_in_per_step"]  # full FT: all trainable
    off = run_plan(profile=tiny_profile(tmp_path, budget), offload="off", **base, pair=False)
    assert not off.plan.fits and off.plan.streaming is None
    assert any("--offload auto" in a["change"] and a["fits"] for a in off.alternatives)


def test_planner_keeps_fp32_masters_where_the_tier_holds_them(wide_folder, tmp_path):
    """bf16 full fine-tuning: fp32 masters add 2 bytes a weight to the tier, to each
    layer buffer and to the traffic both ways, and are dropped when the host is short."""
    from planning import plan_of

    base = dict(model=wide_folder, dtype="bf16", batch_size=2, seq_len=16)
    profile = tiny_profile(tmp_path, 4096)  # a GPU profile with 1 GiB of host memory
    plan = plan_of(profile=profile, offload="host", **base, pair=False, streamed=12)
    s = plan.streaming
    half = plan_of(profile=profile, offload="off", **base, pair=False)
    layer = (half.components["weights"] - plan.components["weights"]) // 12  # bf16 bytes
    assert s["master_dtype"] == "fp32"
    assert s["host_bytes"] == s["bytes_in_per_step"] == 12 * layer * 2
    assert s["bytes_out_per_step"] == 12 * layer * 2  # every weight trainable, as fp32
    assert plan.components["stream_buffers"] == 2 * layer * 3  # bf16 view + fp32 master
    # a host of 0.1 GiB cannot hold 12 layers' fp32 masters: the tier keeps bf16
    small = tmp_path / "small.yaml"
    text = Path(profile).read_text()
    small.write_text(text.replace("host_memory_gb: 1", "host_memory_gb: 0.1"))
    plan = plan_of(profile=str(small), offload="host", **base, pair=False, streamed=12)
    assert plan.streaming["master_dtype"] == "same"
    assert plan.streaming["host_bytes"] == 12 * layer
    assert plan.components["stream_buffers"] == 2 * layer
    forced = plan_of(profile=str(small), offload="host", stream_masters="fp32", **base,
                     pair=False, streamed=12)
    assert forced.streaming["master_dtype"] == "fp32"  # asked for: priced, room or not
    plain = plan_of(profile=profile, offload="host", stream_masters="model", **base,
                    pair=False, streamed=12)
    assert plain.streaming["master_dtype"] == "same"
    assert plain.streaming["bytes_in_per_step"] == 12 * layer
    # a host too small for even the bf16 layers: auto picks the disk, which keeps fp32
    # masters, and the host holds only the pinned staging twins of the two buffers
    small.write_text(text.replace("host_memory_gb: 1", "host_memory_gb: 0.01"))
    plan = plan_of(profile=str(small), **base, pair=False, streamed=12)
    s = plan.streaming
    assert s["tier"] == "disk" and s["master_dtype"] == "fp32"
    assert s["disk_bytes"] == 12 * layer * 2
    assert s["host_bytes"] == plan.components["stream_buffers"] == 2 * layer * 3


def test_session_streams_under_a_budget_smaller_than_the_weights(wide_folder, tmp_path,
                                                                  data_dir):
    from planning import plan_of

    from edgezo import Session

    base = dict(model=wide_folder, dtype="fp32", batch_size=2, seq_len=64)
    resident = plan_of(profile=tiny_profile(tmp_path, 4096, "cpu"), **base, pair=False)
    weights = resident.components["weights"]
    # smaller than the weights alone (plus the CPU runtime, which is not the model's)
    budget_mb = (0.8 * weights + resident.components["cpu_runtime"]) / 2**20
    s = Session(wide_folder, profile=tiny_profile(tmp_path, budget_mb, "cpu"),
                data_dir=data_dir,
                batch_size=2, lr=1e-3, max_length=64, offload_dir=str(tmp_path / "off"))
    assert s.streamer is not None and s.plan.fits
    planned = s.plan.streaming["buffers"]
    before = s.evaluate("validation", max_examples=8)
    for _ in range(3):
        s.step()
    s.evaluate("validation", max_examples=8)
    stats = s.report()["streaming"]
    assert stats["max_layers_held"] <= planned  # counted, not assumed
    assert stats["loads"] >= 3 * len(s.plan.streaming["layers"])
    out = s.save(tmp_path / "model")
    s.close()
    assert (out / "model.safetensors").is_file()
    assert before["examples"] == 8


@pytest.mark.parametrize("scheme", ["prefix", "prompt"])
def test_frozen_layers_stream_and_never_travel_back(scheme, tmp_path):
    """With prompt learning no layer is trainable: layers come in, nothing goes out, and
    the run equals the resident one."""
    from edgezo.models.schemes import apply_scheme

    def go(stream: bool):
        model = apply_scheme(tiny_model("llama"), scheme)
        engine = zo_engine(model, make_optimizer("zo-sgd"), eps=1e-2, seed=0)
        streamer = engine.stream([0, 1], "cpu", folder=str(tmp_path)) if stream else None
        losses = [engine.step(lm_batch(VOCAB, seed=s), lr=1e-2).loss for s in range(3)]
        stats = streamer.stats() if streamer else None
        engine.close()
        return losses, stats

    ref, _ = go(False)
    got, stats = go(True)
    assert got == ref
    assert stats["loads"] >= 6 and stats["bytes_out"] == 0


def test_streaming_options_that_cannot_apply_are_refused(tiny_folder, data_dir, tmp_path):
    from edgezo import Session

    for kw, message in [({"offload": "off", "offload_dir": str(tmp_path)}, "--offload off"),
                        ({"offload": "off", "stream_layers": 1}, "--offload off"),
                        ({"offload": "host", "offload_dir": str(tmp_path)}, "disk tier")]:
        with pytest.raises(ConfigError, match=message):
            Session(tiny_folder, data_dir=data_dir, check_budget=False, **kw)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_streamed_run_snapshots_and_resumes_exactly(tiny_folder, data_dir, tmp_path, dtype):
    """Snapshots read streamed layers one at a time; resume writes them back to the tier.
    In bf16 the disk tier keeps fp32 masters, and the snapshot must keep them too."""
    from edgezo import Session

    kw = dict(data_dir=data_dir, check_budget=False, offload="disk", batch_size=2,
              lr=0.02, eps=1e-2, max_length=48, optimizer="zo-adam", dtype=dtype)

    def trainable(s):
        s.engine.flush()
        assert s.streamer.stats()["master_dtype"] == ("float32" if dtype == "bf16" else "same")
        out = {}
        for layer in s.streamer.layers:
            with s.streamer.hold(layer.unit.module):
                out |= {t.name + str(layer.index): s.streamer.master_view(t.param).clone()
                        for t in layer.tensors}
        with s.streamer.materialized():
            return out | {n: p.detach().clone() for n, p in
                          zip(s.engine.blocks.names, s.engine.blocks.params, strict=True)}

    ref = Session(tiny_folder, **kw)
    for _ in range(4):
        ref.step()
    expected = trainable(ref)
    ref.close()
    s = Session(tiny_folder, **kw)
    s.record(tmp_path / "run")
    for _ in range(2):
        s.step()
    s.checkpoint()
    s.step()
    s.close()
    resumed = Session.resume(tmp_path / "run")
    assert resumed.streamer is not None and resumed.engine.step_index == 3
    resumed.step()
    got = trainable(resumed)
    resumed.close()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], v) for k, v in expected.items())


def test_a_folder_in_another_dtype_is_stored_once_in_the_run_dtype(tmp_path, monkeypatch):
    """The copy has the same tensors, cast; a keep-in-fp32 module keeps its dtype; shards
    stay under SHARD_BYTES; the second call reuses the copy; a matching folder is used
    as it is."""
    from safetensors.torch import load_file

    from edgezo.models import convert
    from edgezo.models.tiny import save_tiny

    monkeypatch.setenv("EDGEZO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(convert, "SHARD_BYTES", 64 << 10)
    folder = tmp_path / "fp32"
    save_tiny(folder, "llama", width=64, layers=2)
    original = load_file(str(folder / "model.safetensors"))
    out = convert.stream_ready_folder(folder, torch.bfloat16, keep_fp32=["norm"])
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 2 and all(f.stat().st_size < 2 * (64 << 10) + 4096 for f in shards)
    copy = {}
    for f in shards:
        copy |= load_file(str(f))
    assert copy.keys() == original.keys()
    for name, t in original.items():
        kept = "norm" in name  # matched as transformers does: a search in the name
        want = t if kept else t.to(torch.bfloat16)
        assert copy[name].dtype == want.dtype and torch.equal(copy[name], want), name
    assert '"bfloat16"' in (out / "config.json").read_text()
    stamp = shards[0].stat().st_mtime_ns
    assert convert.stream_ready_folder(folder, torch.bfloat16) == out
    assert shards[0].stat().st_mtime_ns == stamp
    assert convert.stream_ready_folder(folder, torch.float32) == folder


def _file_mapped(suffix: str) -> list[tuple[int, int]]:
    """Address ranges of this process mapped from files whose name ends in `suffix`."""
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 6 and fields[5].endswith(suffix):
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((lo, hi))
    return ranges


def test_a_streamed_model_in_another_dtype_loads_without_holding_its_weights(
        wide_folder, tmp_path, monkeypatch):
    """fp32 weights, a bf16 run, every layer streamed: the layers load as pages of a
    memory-mapped checkpoint, not as the process's own memory (a cast by transformers
    would hold the whole model: a model larger than RAM could not load), and the weights
    are the bf16 load's, bit for bit."""
    from edgezo import Session
    from edgezo.run import build as session_mod

    monkeypatch.setenv("EDGEZO_CACHE", str(tmp_path / "cache"))
    seen = {}

    def load_and_look(*args, **kwargs):
        model = load_weights(*args, **kwargs)
        maps = _file_mapped(".safetensors")
        layers = [p for n, p in model.named_parameters() if ".layers." in n]
        seen["mapped"] = sum(any(lo <= p.data_ptr() < hi for lo, hi in maps) for p in layers)
        seen["layers"] = len(layers)
        return model

    load_weights = session_mod.load_weights
    monkeypatch.setattr(session_mod, "load_weights", load_and_look)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # host-side loading
    kw = dict(dtype="bf16", check_budget=False, task=None)
    s = Session(wide_folder, offload="disk", offload_dir=str(tmp_path / "off"), **kw)
    assert seen["layers"] > 0 and seen["mapped"] == seen["layers"]
    s.engine.flush()
    with s.streamer.materialized():
        streamed = {k: v.clone() for k, v in s.module.state_dict().items()}
    s.close()
    ref = Session(wide_folder, offload="off", **kw)
    resident = ref.module.state_dict()
    assert streamed.keys() == resident.keys()
    assert all(torch.equal(streamed[k], v) for k, v in resident.items())
    ref.close()


def test_a_streamed_hub_model_is_fetched_then_stored_in_the_run_dtype(tmp_path, monkeypatch):
    import huggingface_hub
    from transformers import LlamaForCausalLM

    from edgezo.models import convert, loading
    from edgezo.models.tiny import save_tiny

    monkeypatch.setenv("EDGEZO_CACHE", str(tmp_path / "cache"))
    snapshot = tmp_path / "hub" / "snapshots" / "abc"
    save_tiny(snapshot, "llama", width=64, layers=2)
    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, **kw: asked.append(repo) or str(snapshot))
    hub = loading.ResolvedModel("someone/tiny", "someone/tiny", "hub", None, LlamaForCausalLM)
    out = convert.streamable_folder(hub, torch.bfloat16)
    assert asked == ["someone/tiny"] and "converted" in out
    assert convert.streamable_folder(hub, torch.float32) == str(snapshot)  # already fp32
    for f in snapshot.glob("*.safetensors"):
        f.unlink()  # a .bin-only repository: transformers loads it from the hub id
    assert convert.streamable_folder(hub, torch.bfloat16) == "someone/tiny"


def test_stream_masters_choose_the_tier_copy_and_need_streaming(tiny_folder, data_dir,
                                                                 tmp_path):
    from edgezo import Session

    kw = dict(data_dir=data_dir, check_budget=False, dtype="bf16", batch_size=2,
              max_length=48)
    for masters, want in (("auto", "float32"), ("fp32", "float32"), ("model", "same")):
        s = Session(tiny_folder, offload="disk", stream_masters=masters, **kw)
        s.step()
        assert s.report()["streaming"]["master_dtype"] == want
        assert s.config.streaming.stream_masters == masters
        s.close()
    with pytest.raises(ConfigError, match="--offload off forbids"):
        Session(tiny_folder, offload="off", stream_masters="fp32", **kw)
    with pytest.raises(ConfigError, match="stream masters"):
        Session(tiny_folder, offload="disk", stream_masters="fp16", **kw)
    # auto, and the weights fit: nothing streams, so neither option would do anything
    for extra, flag in (({"stream_masters": "fp32"}, "--stream-masters"),
                        ({"offload_dir": str(tmp_path)}, "--offload-dir")):
        with pytest.raises(ConfigError, match=f"{flag} set how layers stream.*none does"):
            Session(tiny_folder, **extra, **kw)
