"""GGUF and ONNX export, checked in the readers that run them: transformers' GGUF reader
(`gguf_file=`), gguf.GGUFReader and onnxruntime. Tiny models for the mechanics, one test
on the real SmolLM2 GGUF."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import gguf
import numpy as np
import peft
import pytest
import torch
from conftest import REPO, on_device_of
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from edgezo.errors import ConfigError
from edgezo.export.run import export_model, export_run
from edgezo.export.weights import plain_model, trained_state
from edgezo.models.tiny import tiny_config, tiny_model, tiny_tokenizer
from edgezo.tasks.base import Encoder
from edgezo.tasks.loss import candidate_scores
from edgezo.tasks.make import make_task

ROOT = REPO


def batch(vocab: int = 256) -> dict:
    """A fixed left-padded batch, of another shape than any export traces."""
    ids = torch.randint(3, vocab, (3, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    return {"input_ids": ids, "attention_mask": mask}


def logits(model, b: dict) -> torch.Tensor:
    b = on_device_of(model, b)
    positions = (b["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(**b, position_ids=positions).logits.float().cpu()


def read_back(path: Path) -> torch.nn.Module:
    """The model as transformers' GGUF reader rebuilds it, in fp32."""
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                dtype=torch.float32).eval()


def rounded(model, dtype: torch.dtype):
    """The model with every matrix rounded to `dtype` (vectors stay fp32, as in GGUF)."""
    out = tiny_model(model.config.model_type)
    out.load_state_dict({k: v.to(dtype).float() if v.dim() > 1 else v
                         for k, v in model.state_dict().items()})
    return out


def gguf_arrays(path: Path) -> dict[str, np.ndarray]:
    reader = gguf.GGUFReader(str(path))
    return {t.name: gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
            for t in reader.tensors}


@pytest.mark.parametrize("family, kind, dtype", [
    ("llama", "f32", torch.float32), ("llama", "f16", torch.float16),
    ("llama", "bf16", torch.bfloat16), ("qwen2", "f32", torch.float32),
    ("qwen2", "f16", torch.float16)])
def test_gguf_round_trip_gives_the_same_logits(family, kind, dtype, tmp_path):
    """The file transformers reads back computes what the model computes with its
    matrices rounded to the type: a name or rotary-layout slip moves logits by ~0.1."""
    model = tiny_model(family, seed=3)
    path = export_model(model, tiny_tokenizer(), "gguf", tmp_path, gguf_type=kind)
    assert path.name == f"model-{kind}.gguf"
    back = read_back(path)
    assert type(back) is type(model)
    assert back.config.tie_word_embeddings == model.config.tie_word_embeddings
    torch.testing.assert_close(logits(back, batch()), logits(rounded(model, dtype), batch()),
                               atol=2e-6, rtol=0)


def test_gguf_q8_0_keeps_the_task_predictions(tmp_path, data_dir):
    """Q8_0 rounds each weight to 1/127 of its block's largest: on 64 SST-2 test examples
    every prediction is the fp32 model's (tolerance: no example, so the same accuracy)
    and no candidate's log-likelihood moves by 0.01 (measured: 0.0035; Q4_0 moves 0.04)."""
    model = tiny_model("llama", seed=5, width=64)
    tokenizer = tiny_tokenizer()
    back = read_back(export_model(model, tokenizer, "gguf", tmp_path, gguf_type="q8_0"))
    examples = make_task("sst2", data_dir).split("test")[:64]
    enc = Encoder(tokenizer).encode(examples)
    with torch.no_grad():
        ours, theirs = candidate_scores(back, enc), candidate_scores(model, enc)
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    assert 0 < float((ours - theirs).abs().max()) < 0.01  # quantized, to Q8_0's rounding


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (the kind of SmolLM2 and Qwen2), trained on a few lines,
    with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["a great film, it was great", "a terrible movie!",
                                 "the acting was charming and moving"] * 20, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    tok.chat_template = "{% for m in messages %}<|im|>{{ m['content'] }}{% endfor %}"
    return tok


def test_gguf_carries_the_tokenizer_and_chat_template(tmp_path):
    """From an HF tokenizer, through gguf.vocab: the tokenizer transformers rebuilds from
    the file splits text into the same ids, and the chat template comes along."""
    tok = bpe_tokenizer()
    config = tiny_config("qwen2")
    config.vocab_size = 320  # rows past the vocabulary become [PAD] tokens
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    path = export_model(model, tok, "gguf", tmp_path / "qwen.gguf", gguf_type="f32")
    back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in ("a great film, it was great", "the movie was terrible!", "unseen wörds 42"):
        assert back(text).input_ids == tok(text).input_ids, text
    assert back.chat_template == tok.chat_template
    assert back.eos_token == "<|endoftext|>"
    torch.testing.assert_close(logits(read_back(path), batch(300)), logits(model, batch(300)),
                               atol=2e-6, rtol=0)


def test_a_tokenizer_gguf_cannot_hold_is_left_out_with_a_note(tmp_path, capsys):
    path = export_model(tiny_model("llama"), tiny_tokenizer(), "gguf", tmp_path)
    fields = gguf.GGUFReader(str(path)).fields
    assert fields["tokenizer.ggml.model"].contents() == "no_vocab"
    assert "holds no vocabulary" in capsys.readouterr().err


# -- runs: the trained weights, and only they, go out -----------------------------------

@pytest.fixture(scope="module")
def runs(tiny_folder, data_dir, tmp_path_factory):
    """Run folders (Session.save) after two ZO steps of each scheme, on the tiny Llama."""
    from edgezo.run.session import Session

    out = {}
    for scheme in ("full", "lora", "head"):
        sess = Session(model=tiny_folder, scheme=scheme, lr=5e-2, batch_size=4, dtype="fp32",
                       data_dir=data_dir, seed=0)
        for _ in range(2):
            sess.step()
        out[scheme] = sess.save(tmp_path_factory.mktemp(scheme))
        sess.close()
    return out


def base_model(tiny_folder):
    return AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32).eval()


def trained(run: Path, tiny_folder):
    """The run's model as torch runs it (the base with the adapter, for LoRA)."""
    if (run / "adapter_config.json").is_file():
        return peft.PeftModel.from_pretrained(base_model(tiny_folder), run).eval()
    return AutoModelForCausalLM.from_pretrained(run, dtype=torch.float32).eval()


CHANGED = {"full": None,  # every tensor: ZO perturbs them all
           "lora": {f"blk.{i}.{p}.weight" for i in (0, 1) for p in ("attn_q", "attn_v")},
           "head": {"token_embd.weight"}}  # tied: the head is the embedding


@pytest.mark.parametrize("scheme", ["full", "lora", "head"])
def test_trained_weights_go_out_and_nothing_else(scheme, runs, tiny_folder, tmp_path):
    base = export_model(base_model(tiny_folder), tiny_tokenizer(), "gguf", tmp_path / "b",
                        gguf_type="f32")
    out = export_run(runs[scheme], "gguf", tmp_path / "run", gguf_type="f32")
    a, b = gguf_arrays(base), gguf_arrays(out)
    assert a.keys() == b.keys()
    changed = {n for n in a if not np.array_equal(a[n], b[n])}
    assert changed == (CHANGED[scheme] or set(a))
    model = trained(runs[scheme], tiny_folder)
    torch.testing.assert_close(logits(read_back(out), batch()), logits(model, batch()),
                               atol=2e-6, rtol=0)


def test_session_saves_gguf_and_keeps_training(tiny_folder, data_dir, tmp_path):
    """Session.save(dir, "gguf") writes the model as it is now, perturbation hooks out,
    and the session trains on after it exactly as one that never saved."""
    from edgezo.run.session import Session

    def session():
        return Session(model=tiny_folder, scheme="lora", lr=5e-2, batch_size=4,
                       dtype="fp32", data_dir=data_dir, seed=0)

    a, b = session(), session()
    try:
        a.step(), b.step()
        path = a.save(tmp_path, "gguf", gguf_type="f32")
        assert path.name == "model-f32.gguf"
        torch.testing.assert_close(logits(read_back(path), batch()),
                                   logits(a.model, batch()), atol=2e-6, rtol=0)
        with pytest.raises(ConfigError, match="gguf_type applies"):
            a.save(tmp_path / "run", gguf_type="q8_0")
        assert a.step().loss == b.step().loss
        assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(),
                                                     b.model.parameters(), strict=True))
    finally:
        a.close(), b.close()


def test_lora_merges_in_fp32_so_a_small_update_survives_a_bf16_base():
    """B·A below a bf16 weight's rounding step still reaches an f32/f16 GGUF or ONNX: the
    merge is done in fp32 (bf16 + a 1e-4 delta would round back to the bf16 weight)."""
    model = tiny_model("llama", seed=3).to(torch.bfloat16)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"],
                                                      init_lora_weights=False))
    layer = lora.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_A["default"].weight.fill_(1e-2)
        layer.lora_B["default"].weight.fill_(1e-2)
    delta = layer.get_delta_weight("default").float()
    _, state = trained_state(lora)
    merged = state["model.layers.0.self_attn.q_proj.weight"]
    base = layer.get_base_layer().weight.float()
    assert merged.dtype == torch.float32
    torch.testing.assert_close(merged, base + delta, atol=0, rtol=0)
    assert not torch.equal((base + delta).bfloat16().float(), base + delta)  # bf16 loses it
    assert plain_model(lora).model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


def test_exporting_a_lora_model_leaves_it_untouched(runs, tiny_folder, tmp_path):
    """export_model merges LoRA into copies (a Session keeps training the model after), and
    its merged and peft folders load back to the same logits."""
    model = trained(runs["lora"], tiny_folder)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_model(model, tiny_tokenizer(), "gguf", tmp_path, gguf_type="f32")
    merged = export_model(model, tiny_tokenizer(), "merged", tmp_path / "merged")
    adapter = export_model(model, tiny_tokenizer(), "peft", tmp_path / "peft")
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    _, state = trained_state(model)
    assert "model.layers.0.self_attn.q_proj.weight" in state  # merged, named as plain
    plain_model(model).set_attn_implementation("eager")  # as the ONNX export does
    assert model.config._attn_implementation == "sdpa"
    expected = logits(model, batch())
    plain = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(plain, batch()), expected, atol=2e-6, rtol=0)
    again = peft.PeftModel.from_pretrained(base_model(tiny_folder), adapter).eval()
    torch.testing.assert_close(logits(again, batch()), expected, atol=0, rtol=0)


# -- ONNX --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def onnx_export(runs, tmp_path_factory):
    """The LoRA run exported by the CLI (one export: the exporter takes ~10 s)."""
    from edgezo.cli.main import app
    from typer.testing import CliRunner

    out = tmp_path_factory.mktemp("onnx")
    result = CliRunner().invoke(app, ["export", str(runs["lora"]), "--format", "onnx",
                                      "--output", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.slow
def test_onnxruntime_logits_equal_torch(onnx_export, runs, tiny_folder):
    from edgezo.export.onnx import OnnxLogits

    assert (onnx_export / "model.onnx").is_file() and (onnx_export / "tokenizer.json").is_file()
    graph, model = OnnxLogits(onnx_export / "model.onnx"), trained(runs["lora"], tiny_folder)
    unpadded = {k: v[1:2, :5] for k, v in batch().items()}  # 1 row, no padding
    for b in (batch(), unpadded):
        ours, theirs = graph(**b).logits, logits(model, b)
        real = b["attention_mask"].bool()  # a pad attends to nothing: no defined output
        torch.testing.assert_close(ours[real], theirs[real], atol=1e-4, rtol=0)


def test_onnx_example_scores_a_task_as_torch_does(onnx_export, runs, tiny_folder, data_dir):
    """examples/onnx_predict.py (onnxruntime + tokenizers, no torch) predicts what edgezo's
    torch scoring predicts on 48 SST-2 test examples, so its accuracy is the same."""
    spec = importlib.util.spec_from_file_location("onnx_predict",
                                                  ROOT / "examples" / "onnx_predict.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    session, tokenizer = example.load(onnx_export)
    rows = example.read_task("sst2", data_dir, 48)
    ours = example.predict(session, tokenizer, rows)
    examples = make_task("sst2", data_dir).split("test")[:48]
    assert [ex.gold for ex in examples] == [gold for _, _, gold in rows]
    model = trained(runs["lora"], tiny_folder)
    with torch.no_grad():
        theirs = candidate_scores(model, Encoder(AutoTokenizer.from_pretrained(runs["lora"])
                                                 ).encode(examples)).argmax(-1).tolist()
    assert ours == theirs
    accuracy = example.main([str(onnx_export), "--data-dir", data_dir, "--max-examples", "48"])
    assert accuracy == sum(p == ex.gold for p, ex in zip(theirs, examples, strict=True)) \
        / len(examples)  # the fixture's test rows: fewer than 48


def test_tensor_types_follow_the_ask_the_base_and_llama_cpp_rules():
    from edgezo.export.gguf import Q, tensor_type, writable_type

    assert [writable_type(Q[t]).name for t in ("Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")] == \
        ["Q4_1", "Q8_0", "Q4_0", "Q5_0", "Q8_0"]
    assert tensor_type("blk.0.attn_norm.weight", (64,), Q.Q4_0, None) == Q.F32  # vectors
    assert tensor_type("blk.0.ffn_up.weight", (64, 48), Q.Q4_0, None) == Q.F16  # 48 % 32
    assert tensor_type("blk.0.ffn_up.weight", (64, 64), None, Q.Q6_K) == Q.Q8_0
    assert tensor_type("blk.0.ffn_up.weight", (64, 64), Q.Q4_0, None) == Q.Q4_0
    assert tensor_type("token_embd.weight", (64, 64), Q.Q4_0, None) == Q.Q8_0  # kept wider
    assert tensor_type("token_embd.weight", (64, 64), None, Q.Q4_1) == Q.Q4_1  # base's own


# -- errors ------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["gpt2", "gemma3", "opt"])
def test_an_unmapped_architecture_names_the_supported_ones(family, tmp_path):
    with pytest.raises(ConfigError, match=f"cannot export a {family}.*llama, qwen2"):
        export_model(tiny_model(family), tiny_tokenizer(), "gguf", tmp_path)


@pytest.mark.parametrize("fmt", ["gguf", "onnx", "merged"])
@pytest.mark.parametrize("config", [peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                            num_virtual_tokens=2),
                                    peft.PromptTuningConfig(task_type="CAUSAL_LM",
                                                            num_virtual_tokens=2)])
def test_prefix_and_prompt_adapters_have_no_plain_form(fmt, config, tmp_path):
    model = peft.get_peft_model(tiny_model("llama"), config)
    with pytest.raises(ConfigError, match="virtual tokens.*--format peft"):
        export_model(model, tiny_tokenizer(), fmt, tmp_path)


def test_run_folder_errors(runs, tmp_path):
    with pytest.raises(ConfigError, match="unknown GGUF type 'q3_k'; valid GGUF types: bf16"):
        export_run(runs["full"], "gguf", tmp_path, gguf_type="q3_k")
    with pytest.raises(ConfigError, match="--gguf-type applies to --format gguf"):
        export_run(runs["full"], "onnx", tmp_path, gguf_type="f16")
    prefix = tmp_path / "prefix"
    prefix.mkdir()
    (prefix / "adapter_config.json").write_text("{}")
    (prefix / "report.json").write_text(json.dumps({"scheme": "prefix"}))
    with pytest.raises(ConfigError, match="prefix tuning adds virtual tokens"):
        export_run(prefix, "gguf", tmp_path / "x")


def test_cli_gguf_export_and_a_bad_type(runs, tmp_path):
    from edgezo.cli.main import app
    from typer.testing import CliRunner

    runner = CliRunner()
    ok = runner.invoke(app, ["export", str(runs["lora"]), "--format", "gguf", "--gguf-type",
                             "q8_0", "--output", str(tmp_path)])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "model-q8_0.gguf").is_file()
    bad = runner.invoke(app, ["export", str(runs["lora"]), "--format", "gguf", "--gguf-type",
                              "q2", "--output", str(tmp_path)])
    assert bad.exit_code == 2 and "valid GGUF types" in bad.output


# -- the real model ----------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.real_model
def test_smollm2_export_is_the_base_file_except_where_trained(tmp_path):
    """SmolLM2 came as Q4_1 (a Q8_0 embedding): exported in the base's own types, every
    tensor training did not touch is the base file's, bit for bit (Q4_1 re-quantizes its
    own dequantized blocks exactly), the metadata (tokenizer, chat template) is the
    base's, and the one projection changed here differs, by the change."""
    from edgezo.models.gguf_cache import default_gguf
    from edgezo.models.loading import load_model

    loaded = load_model(None, torch.float32)
    q = loaded.model.model.layers[3].self_attn.q_proj.weight
    with torch.no_grad():
        q[5] += 0.5  # one output row: head 0, rotary dim 5, a "trained" change
    path = export_model(loaded.model, loaded.tokenizer, "gguf", tmp_path,
                        base_gguf=default_gguf())
    assert path.name == "model-q4_1.gguf"
    base, ours = gguf.GGUFReader(str(default_gguf())), gguf.GGUFReader(str(path))
    keys = [k for k in base.fields if not k.startswith("GGUF.")]
    assert sorted(keys) == sorted(k for k in ours.fields if not k.startswith("GGUF."))
    for k in keys:
        assert base.fields[k].types == ours.fields[k].types, k
        assert base.fields[k].contents() == ours.fields[k].contents(), k
    theirs = {t.name: t for t in base.tensors}
    differ = {t.name for t in ours.tensors
              if t.tensor_type != theirs[t.name].tensor_type
              or not np.array_equal(np.asarray(t.data), np.asarray(theirs[t.name].data))}
    assert differ == {"blk.3.attn_q.weight"}
    mine = {t.name: t for t in ours.tensors}
    moved = [gguf.quants.dequantize(np.asarray(t["blk.3.attn_q.weight"].data),
                                    gguf.GGMLQuantizationType.Q4_1) for t in (mine, theirs)]
    rows = np.flatnonzero(np.abs(moved[0] - moved[1]).max(1) > 0.1)
    assert rows.tolist() == [10]  # rotary dim 5 of head 0 sits at row 2*5 in llama.cpp's order


@pytest.mark.real_model
def test_the_default_model_names_its_base_gguf():
    """Session.save(dir, "gguf") of the default model (model=None) finds SmolLM2's file."""
    from edgezo.export.run import base_gguf
    from edgezo.models.gguf_cache import default_gguf

    assert base_gguf(None) == base_gguf("smollm2") == default_gguf()
