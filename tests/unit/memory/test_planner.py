"""`edgezo plan`: arithmetic on hand-checkable configs, decisions, advice."""

import json

import pytest
import torch
from edgezo.cli.main import app
from planning import plan_of, run_plan
from typer.testing import CliRunner

from edgezo.device.profiles import load_profile
from edgezo.models.tiny import tiny_config
from edgezo.zo import chunking, noise_table

LLAMA_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
            "vocab_size": 32000, "max_position_embeddings": 4096}


@pytest.fixture()
def config_file(tmp_path):
    def write(config: dict):
        path = tmp_path / "config.json"
        path.write_text(json.dumps(config))
        return str(path)
    return write


def tiny_llama_file(config_file):
    return config_file(tiny_config("llama").to_dict())


def test_components_by_hand(config_file):
    """Tiny Llama (H=32, I=64, 2 layers, vocab 256, tied), fp32, batch 2 x 8 tokens."""
    path = tiny_llama_file(config_file)
    req = dict(model=path, profile="cpu-16gb", dtype="fp32", batch_size=2, seq_len=8,
               optimizer="zo-adam")
    plan = plan_of(**req, pair=True)
    H, inter, V, L = 32, 64, 256, 2
    # per layer: 2 norms (H), q (H·H), k and v (H·H/2 each: 2 of 4 heads), o (H·H), MLP 3·H·I
    layer = 2 * H + H * H + 2 * (H * H // 2) + H * H + 3 * H * inter
    params = V * H + L * layer + H  # tied embedding/head counted once, final norm
    assert plan.components["optimizer_state"] == 8 * params
    rows = 2 * 2  # pair mode doubles the batch: the logits are the doubled batch's
    # but each layer computes its two halves in turn: one half's transient (2 rows), plus
    # the doubled input and the first half's output (rows x H) while the second computes
    half = (2 * 8 * (4 * H + 3 * inter) * 4 + 2 * 4 * 8 * 8 * 4 + rows * 8 * H * 4
            + rows * V * (4 + 3 * 4))
    assert plan.components["activations"] == half
    # block-wise ZO leaves the layers outside the current block unsplit: the doubled batch
    doubled = (rows * 8 * (4 * H + 3 * inter) * 4 + rows * 4 * 8 * 8 * 4
               + rows * V * (4 + 3 * 4))
    blockwise = plan_of(**{**req, "block_wise": True}, pair=True)
    assert blockwise.components["activations"] == doubled
    # so does a layer trained by FO in hybrid ZO/FO (nothing in it is perturbed)
    hybrid = plan_of(**{**req, "fo_blocks": [-1]}, pair=True)
    assert hybrid.components["activations"] == doubled
    head_fo = plan_of(**{**req, "fo_blocks": ["head"]}, pair=True)
    assert head_fo.components["activations"] == half
    assert plan.components["weights"] >= params * 4  # plus the rotary buffer
    # z from the table is cheap to re-read: pair mode fills its halves one after the other
    # in one scratch copy, as two-pass does; drawn z is kept, so pair holds both signs
    two = plan_of(**req, pair=False)
    assert two.components["perturbation_scratch"] == plan.components["perturbation_scratch"]
    drawn = {**req, "noise": "generator"}
    assert (plan_of(**drawn, pair=False).components["perturbation_scratch"]
            < plan_of(**drawn, pair=True).components["perturbation_scratch"])


def test_noise_buffers_follow_the_largest_chunk_and_fo_has_no_scratch(config_file,
                                                                       monkeypatch):
    """Each noise thread's buffers hold one chunk of the largest trainable tensor: a full
    2^18 values for a 7B Llama's matrices, one embedding row-block for a tiny model, a
    LoRA matrix for LoRA. A pure FO run perturbs nothing: no scratch."""
    from edgezo.memory.peak import THREAD_BUFFERS

    def buffers(path, **kw):
        plan = plan_of(model=path, profile="cpu-16gb", dtype="fp32", batch_size=2,
                       seq_len=8, **kw, pair=True)
        return plan, plan.components["noise_buffers"] // (THREAD_BUFFERS * 4)

    # the table's chunk work stays on the calling thread; the generator's draws go to
    # the noise pool as well, each of its threads with its own set
    monkeypatch.setenv("EDGEZO_NOISE_THREADS", "2")
    per_thread = 1
    _, big = buffers(config_file(LLAMA_7B))
    assert big == chunking.CHUNK_ELEMENTS * per_thread
    _, drawn = buffers(config_file(LLAMA_7B), noise="generator")
    assert drawn == chunking.CHUNK_ELEMENTS * 3  # the caller and two pool threads
    monkeypatch.setenv("EDGEZO_NOISE_THREADS", "1")  # no pool: the caller's set alone
    assert buffers(config_file(LLAMA_7B), noise="generator")[1] == chunking.CHUNK_ELEMENTS
    tiny = tiny_llama_file(config_file)
    _, full = buffers(tiny)
    assert full == 256 * 32 * per_thread  # the 256 x 32 embedding is one chunk
    _, lora = buffers(tiny, scheme="lora")
    assert lora == 8 * 32 * per_thread  # r = 8 rows of 32
    fo, _ = buffers(tiny, optimizer="fo-adam")
    assert fo.components["perturbation_scratch"] == 0


def test_the_noise_table_and_its_bf16_twin_are_priced_where_a_step_reads_them(config_file):
    """fp32 table values: 4 bytes each; bf16 weights on the CPU also read the bf16 twin
    (2 bytes a value); the generator, FO and LoRA's fp32 adapters read neither twin."""

    def table(**kw):
        plan = plan_of(model=tiny_llama_file(config_file), profile="cpu-16gb", batch_size=2,
                       seq_len=8, pair=True, **kw)
        return plan.components.get("noise_table", 0)

    assert table(dtype="fp32") == noise_table.TABLE_VALUES * 4
    assert table(dtype="bf16") == noise_table.TABLE_VALUES * 6
    assert table(dtype="bf16", directions="lowrank") == noise_table.TABLE_VALUES * 4  # fp32 norms
    assert table(dtype="bf16", directions="rademacher") == noise_table.TABLE_VALUES * 4
    assert table(dtype="bf16", sparsity=0.5) == noise_table.TABLE_VALUES * 4  # d = mask ⊙ z
    assert table(dtype="bf16", optimizer="hizoo") == noise_table.TABLE_VALUES * 4  # d = Σ^½ z
    assert table(dtype="bf16", scheme="lora") == noise_table.TABLE_VALUES * 4
    assert table(dtype="bf16", noise="generator") == 0
    assert table(dtype="bf16", optimizer="fo-adam") == 0
    # an exact structured z's bf16 update reads its dither from the table, whatever the
    # source of its values (Direction.table_bits)
    assert table(dtype="bf16", directions="lowrank", noise="generator") \
        == noise_table.TABLE_VALUES * 4
    assert table(dtype="fp32", directions="lowrank", noise="generator") == 0


def test_on_cuda_noise_buffers_hold_a_span_and_layers_are_copied(config_file, monkeypatch):
    """On CUDA the noise buffers hold a span (1M values: four 64-row chunks of a 7B
    Llama's 4096-wide matrices), and a pair step perturbs two scratch copies of a layer
    even with the table (perturb.CHUNKED_LINEAR_DEVICES); emulated on the CPU, the same
    profile's layers keep their linear maps out of the copy."""
    from edgezo.memory.peak import THREAD_BUFFERS

    req = dict(model=config_file(LLAMA_7B), profile="8gb-gpu", dtype="bf16", batch_size=2,
               seq_len=8)
    emulated = plan_of(**req, pair=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = plan_of(**req, pair=True)
    assert (emulated.device, gpu.device) == ("cpu", "cuda")
    assert chunking.SPAN_ELEMENTS["cuda"] == 1 << 20
    H, inter = 4096, 11008
    # plus the fused pieces' z, fp32 copy and dither (zo/fused.py), 4M values at most, and
    # their row layouts (two int64 a row, twice, and the table offsets once): 32 layers'
    # rows, the embedding's and the head's, and the norms' (a 1-D tensor's values are its
    # rows)
    rows = 32 * (4 * H + 2 * inter + H + 2 * H) + 2 * 32000 + H
    assert gpu.components["noise_buffers"] == THREAD_BUFFERS * 4 * 2 * (1 << 20) \
        + 12 * (1 << 22) + 40 * rows
    layer = 4 * H * H + 3 * H * inter + 2 * H
    assert gpu.components["perturbation_scratch"] == 2 * layer * 2  # two bf16 copies
    assert emulated.components["perturbation_scratch"] < layer * 2 // 20  # spans, norms


def test_the_planner_prices_the_fused_path_for_the_generator_but_not_coordinates(
        config_file, monkeypatch):
    from edgezo.zo import fused

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    req = dict(model=config_file(LLAMA_7B), profile="8gb-gpu", dtype="bf16", batch_size=2,
               seq_len=64, pair=True)
    table = plan_of(**req).components["noise_buffers"]
    assert plan_of(**req, noise="generator").components["noise_buffers"] == table
    coords = plan_of(**req, directions="coordinate", q=4).components["noise_buffers"]
    assert coords < table - 12 * fused.FUSED_VALUES


def test_config_plan_matches_the_live_session_plan(tiny_folder, data_dir):
    from edgezo.run.session import Session

    for scheme, optimizer in (("full", "zo-sgd"), ("lora", "zo-adam"), ("prompt", "zo-sgd")):
        sess = Session(model=tiny_folder, data_dir=data_dir, scheme=scheme,
                       optimizer=optimizer, batch_size=4)
        try:
            live = sess.plan
        finally:
            sess.close()
        planned = plan_of(model=tiny_folder, scheme=scheme, optimizer=optimizer,
                          batch_size=4, seq_len=live.seq_len, pair=live.pair,
                          dtype=sess.dtype_name)  # fp32 where this CPU lacks native bf16
        assert planned.components == live.components, scheme


def test_largest_batch_is_the_boundary(config_file):
    path = config_file(LLAMA_7B)
    req = dict(model=path, profile="24gb-gpu", scheme="lora", quantize="nf4", seq_len=512)
    result = run_plan(**req)
    best = result.max_batch_size
    assert best > 1
    at = plan_of(**{**req, "batch_size": best}, pair=result.plan.pair)
    over = plan_of(**{**req, "batch_size": best + 1}, pair=result.plan.pair)
    assert at.fits and not over.fits


def test_a_7b_model_on_8gb_is_refused_with_priced_advice(config_file):
    path = config_file(LLAMA_7B)
    result = run_plan(model=path, profile="8gb-gpu", offload="off")
    assert not result.plan.fits and result.max_batch_size == 0
    changes = {a["change"]: a for a in result.alternatives}
    assert changes["--scheme lora --quantize nf4"]["fits"]
    assert not changes["--scheme lora"]["fits"]  # bf16 weights alone are 12.6 GiB
    assert any(c.startswith("--profile") for c in changes)
    assert any("--offload auto" in c and a["fits"] for c, a in changes.items())
    args = ["plan", "--model", path, "--profile", "8gb-gpu", "--offload", "off"]
    cli = CliRunner().invoke(app, args)
    assert cli.exit_code == 1 and "does not fit" in cli.output
    assert "try: --scheme lora --quantize nf4" in " ".join(cli.output.split())
    as_json = CliRunner().invoke(app, [*args, "--json"])
    assert json.loads(as_json.output)["plan"]["fits"] is False


def test_a_7b_model_on_8gb_fits_by_streaming_layers(config_file):
    path = config_file(LLAMA_7B)
    result = run_plan(model=path, profile="8gb-gpu")
    p = result.plan
    assert p.fits and p.streaming["tier"] == "host" and p.streaming["buffers"] == 2
    n = len(p.streaming["layers"])
    fewer = plan_of(model=path, profile="8gb-gpu", pair=p.pair, streamed=n - 1)
    assert not fewer.fits  # the fewest layers that fit
    # the bound is the slower of moving the streamed layers (in, and back: full FT) and
    # the forward's FLOPs at the profile's throughput
    s = p.streaming
    assert s["bytes_out_per_step"] == s["bytes_in_per_step"] == s["host_bytes"]
    assert s["transfer_s"] == pytest.approx(2 * s["host_bytes"] / 20e9)
    assert s["step_bound_s"] == max(s["transfer_s"], s["compute_s"])
    cli = CliRunner().invoke(app, ["plan", "--model", path, "--profile", "8gb-gpu"])
    assert cli.exit_code == 0 and "streamed layers" in cli.output


def test_quantized_weight_bytes_by_hand(config_file):
    path = config_file(LLAMA_7B)
    fp = plan_of(model=path, scheme="lora", dtype="bf16", pair=False)
    nf4 = plan_of(model=path, scheme="lora", quantize="nf4", dtype="bf16", pair=False)
    int8 = plan_of(model=path, scheme="lora", quantize="int8", dtype="bf16", pair=False)
    linear = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)  # per layer: q,k,v,o + MLP
    other = fp.components["weights"] - 2 * linear
    # LoRA matrices stay bf16; NF4 = 4 bits + absmax bytes; int8 = 1 byte + row scales
    assert nf4.components["weights"] == pytest.approx(other + linear * (0.5 + 1 / 64),
                                                      rel=1e-3)
    assert int8.components["weights"] == pytest.approx(other + linear, rel=1e-3)


def test_every_profile_plans_with_its_own_budget_and_device(config_file):
    """The same tiny model under each profile: the budget is the profile's, the CUDA
    context is counted on GPU profiles only, the CPU runtime where the CPU computes."""
    path = tiny_llama_file(config_file)
    for name in ("4gb-gpu", "8gb-gpu", "jetson-orin-8gb", "cpu-16gb", "h100-80gb"):
        plan = plan_of(model=path, profile=name, pair=True)
        profile = load_profile(name)
        assert plan.budget_bytes == profile.budget_bytes
        assert plan.runtime_overhead_bytes == (450 * 2**20 if profile.device == "cuda" else 0)
        assert ("cpu_runtime" in plan.components) == (not torch.cuda.is_available()
                                                      or profile.device == "cpu")


def test_options_the_optimizer_would_not_use_are_refused(config_file):
    from edgezo.errors import ConfigError

    path = tiny_llama_file(config_file)
    with pytest.raises(ConfigError, match="sparsity does not apply to fo-adam"):
        plan_of(model=path, optimizer="fo-adam", sparsity=0.5)


@pytest.mark.parametrize("scheme", ["prefix", "prompt"])
def test_meta_block_map_matches_the_live_one_for_prompt_learning(scheme):
    """peft registers the prompt encoder after the base model but runs it first; a
    backward for it crosses every layer (the FO plan counted none before)."""
    from edgezo.models.schemes import apply_scheme
    from edgezo.models.tiny import tiny_config, tiny_model
    from edgezo.zo.blocks import backward_depth, build_block_map

    live = build_block_map(apply_scheme(tiny_model("llama"), scheme))
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        meta_model = apply_scheme(AutoModelForCausalLM.from_config(tiny_config("llama")),
                                  scheme)
    meta = build_block_map(meta_model)
    assert [b.name for b in meta.blocks] == [b.name for b in live.blocks]
    assert meta.blocks[0].name == "pre" and meta.blocks[0].param_indices == [0]
    everything = set(range(len(meta.params)))
    assert backward_depth(meta, everything) == backward_depth(live, everything) == 2


def test_candidate_rows_answer_positions_and_the_eval_phase(config_file):
    """COPA-like batches: 2 rows per example and logits read at 5 positions; evaluation
    at its own batch and length, without the step's scratch; the peak is the larger."""
    from edgezo.memory.peak import CPU_RUNTIME_BYTES
    from edgezo.zo.batch import Shape

    path = tiny_llama_file(config_file)
    H, inter, V = 32, 64, 256

    def activations(rows, seq, positions):
        return (rows * seq * (4 * H + 3 * inter) * 4 + rows * 4 * seq * seq * 4
                + rows * positions * V * (4 + 3 * 4))

    eval_shape = Shape(batch_size=32, seq_len=24, rows_per_example=2, logit_positions=5)
    req = dict(model=path, profile="cpu-16gb", dtype="fp32", batch_size=2, seq_len=8,
               rows_per_example=2, logit_positions=5, eval_shape=eval_shape)
    plan = plan_of(**req, pair=False)
    assert plan.components["activations"] == activations(2 * 2, 8, 5)
    assert plan.components["cpu_runtime"] == CPU_RUNTIME_BYTES  # a CPU profile computes here
    ev = plan.eval_components
    assert ev["activations"] == activations(64, 24, 5)
    assert "perturbation_scratch" not in ev
    for kept in ("weights", "noise_buffers", "optimizer_state", "cpu_runtime"):
        assert ev[kept] == plan.components[kept]
    assert plan.phases == {"train": sum(plan.components.values()), "eval": sum(ev.values())}
    assert plan.peak_bytes == max(plan.phases.values()) == plan.phases["eval"]
    assert json.loads(json.dumps(plan.to_dict()))["eval_shape"]["rows_per_example"] == 2
    assert "prefix_kv_cache" not in plan.components
    # prefix tuning: every layer's K and V over 5 virtual + 8 real tokens, 2 kv heads of 8
    prefix = plan_of(**{**req, "scheme": "prefix"}, pair=True)
    assert prefix.components["prefix_kv_cache"] == 8 * 2 * 2 * 2 * (5 + 8) * 8 * 4
    assert prefix.eval_components["prefix_kv_cache"] == 64 * 2 * 2 * 2 * (5 + 24) * 8 * 4
    # prompt tuning: its 10 virtual tokens lengthen every row the layers see (the logits
    # are still read at the last 5 positions); its frozen layers take the doubled batch
    # of pair mode at once
    prompt = plan_of(**{**req, "scheme": "prompt"}, pair=True)
    assert prompt.components["activations"] == activations(2 * 2 * 2, 8 + 10, 5)
    assert prompt.eval_components["activations"] == activations(64, 24 + 10, 5)
    assert "prefix_kv_cache" not in prompt.components
    fo = plan_of(**{**req, "scheme": "prompt", "optimizer": "fo-adam"}, pair=False)
    # the backward crosses both layers, whose weights are frozen: 8H + 3I values a token
    # and each layer's padding mask (T x T a row), then holds one layer's gradients
    T = 8 + 10
    assert fo.components["fo_activations"] == (2 * 4 * T * (8 * H + 3 * inter) * 4
                                               + 2 * 4 * T * T * 4 + 4 * 5 * V * 3 * 4)
    assert fo.components["activations"] == 4 * T * (4 * H + 3 * inter) * 4


def test_session_plans_the_task_geometry(tiny_folder, data_dir):
    from edgezo.run.session import Session

    sst2 = Session(model=tiny_folder, data_dir=data_dir, batch_size=4, eval_batch_size=8)
    copa = Session(model=tiny_folder, data_dir=data_dir, task="copa", batch_size=4,
                   eval_batch_size=8)
    try:
        assert (sst2.plan.rows_per_example, sst2.plan.logit_positions) == (1, 1)
        assert copa.plan.rows_per_example == 2 and copa.plan.logit_positions > 1
        assert copa.plan.eval_shape.batch_size == 8
        # the planned lengths cover every batch the run can meet, padding included
        for sess in (sst2, copa):
            for split, shape in (("train", sess.plan), ("test", sess.plan.eval_shape)):
                for i in range(0, len(sess.task.split(split)), 64):
                    enc = sess.encoder.encode(sess.task.split(split)[i:i + 64])
                    assert enc["input_ids"].shape[1] <= shape.seq_len, (split, i)
    finally:
        sst2.close()
        copa.close()


def test_cli_plan_prices_evaluation_at_its_batch_size(config_file):
    path = tiny_llama_file(config_file)
    runner = CliRunner()

    def phases(eval_batch: str) -> dict:
        out = runner.invoke(app, ["plan", "--model", path, "--profile", "cpu-16gb",
                                  "--batch-size", "2", "--seq-len", "8",
                                  "--eval-batch-size", eval_batch, "--json"])
        assert out.exit_code == 0, out.output
        return json.loads(out.output)["plan"]["phases"]

    small, large = phases("1"), phases("512")
    assert small["train"] == large["train"] and large["eval"] > small["eval"]


def test_advice_shrinks_the_eval_batch_when_evaluation_sets_the_peak(config_file):
    from edgezo.zo.batch import Shape

    path = tiny_llama_file(config_file)
    big_eval = dict(model=path, dtype="fp32", batch_size=1, seq_len=64,
                    eval_shape=Shape(4096, 64))
    need = plan_of(profile="cpu-16gb", **big_eval, pair=False)
    assert need.phases["eval"] > need.phases["train"]
    tight = (need.phases["train"] + need.phases["eval"]) // 2 / 2**30  # between them
    prof = path.replace("config.json", "tight.yaml")
    with open(prof, "w") as f:
        f.write(f"name: tight\ndevice: cpu\ndevice_memory_gb: {tight}\n"
                "host_memory_gb: 1\nhost_device_bandwidth_gbps: 10\ndtype: fp32\n"
                "headroom: 0\n")
    result = run_plan(profile=prof, **big_eval)
    assert not result.plan.fits
    hint = [a for a in result.alternatives if a["change"].startswith("--eval-batch-size")]
    assert hint and hint[0]["fits"]


def test_lora_backward_keeps_the_fp32_adapters_inputs(config_file):
    """peft keeps LoRA weights in fp32 on a bf16 model, so each adapted map casts its input:
    an FO backward keeps that fp32 copy and lora_A's rank-r output."""
    from edgezo.memory.terms import saved_activation_bytes

    path = tiny_llama_file(config_file)
    plan = plan_of(model=path, profile="cpu-16gb", dtype="bf16", batch_size=2, seq_len=8,
                   scheme="lora", optimizer="fo-adam", pair=False)
    base = saved_activation_bytes(tiny_config("llama"), 2, 8, 2, 2)
    # q_proj and v_proj in 2 layers, r = 8, fan-in 32, fp32: 4 x (8 + 32) x 4 bytes a token
    assert plan.components["fo_activations"] - base == 2 * 8 * 4 * (8 + 32) * 4


@pytest.mark.parametrize("scheme,T", [("full", 32), ("lora", 32), ("prompt", 32),
                                      ("lora", 256)])
def test_saved_activations_match_what_autograd_saves(scheme, T):
    """The FO term against autograd itself: bytes the saved-tensor hooks see per decoder
    layer (a 2-layer model minus a 1-layer one, bf16, padded rows). Frozen weights save no
    linear inputs, which LoRA and prompt tuning's plans must not count. At 256 tokens
    each layer's own copy of the T x T padding mask is 12% of the layer."""
    import peft
    from transformers import AutoModelForCausalLM

    from edgezo.memory.terms import lora_saved_bytes_per_token, saved_activation_bytes

    rows, H = 4, 128

    def config(layers):
        cfg = tiny_config("llama", H, layers)
        cfg.intermediate_size, cfg.vocab_size = 344, 256
        return cfg

    def saved(layers):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config(layers), dtype=torch.bfloat16)
        model.requires_grad_(scheme == "full")
        if scheme == "lora":
            model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", r=8))
        ids = torch.randint(0, 256, (rows, T))
        mask = torch.ones(rows, T, dtype=torch.long)
        mask[:, :5] = 0
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(scheme == "prompt")
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=1,
                  use_cache=False)
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        return sum(n for ptr, n in storages.items() if ptr not in weights), model

    one, _ = saved(1)
    two, model = saved(2)
    planned = (saved_activation_bytes(config(1), rows, T, 2, 1, 1, int(scheme == "full"))
               - saved_activation_bytes(config(1), rows, T, 2, 0))
    planned -= rows * config(1).vocab_size * 3 * 4  # the logits, counted once
    if scheme == "lora":
        planned += lora_saved_bytes_per_token(model, 2) * rows * T // 2  # per layer
    assert 0.95 <= planned / (two - one) <= 1.02


def test_subspace_bases_are_priced_at_each_matrixs_own_rank():
    """A matrix narrower than --rank (a LoRA factor) keeps min(rank, rows, cols) basis
    columns (bases.rank_of): P and Q of that many, for two basis seeds, 4 bytes each."""
    from types import SimpleNamespace

    from edgezo.config.options import EstimatorOptions
    from edgezo.memory.planner import basis_bytes

    blocks = SimpleNamespace(params=[torch.zeros(4, 100), torch.zeros(100)])
    est = EstimatorOptions(directions="subspace", rank=8, structured_z="chunked")
    assert basis_bytes(blocks, est) == 2 * 4 * (4 + 100) * 4
