"""Generative tasks: SQuAD's splits, answer scores, batched greedy writing, and a
session's evaluation and training on them."""

import dataclasses
import json

import pytest
import torch

from edgezo.errors import TaskError
from edgezo.models.tiny import tiny_model, tiny_tokenizer
from edgezo.tasks import answers
from edgezo.tasks import generate as generate_module
from edgezo.tasks.generate import generate
from edgezo.tasks.make import make_task


# -- answer scores ---------------------------------------------------------------------------
@pytest.mark.parametrize("prediction, references, em, f1", [
    ("the Denver Broncos", ["Denver Broncos"], 1.0, 1.0),  # articles go
    ("Denver Broncos!", ["denver broncos"], 1.0, 1.0),  # case and punctuation go
    ("Denver", ["Denver Broncos"], 0.0, 2 * 0.5 / 1.5),  # precision 1, recall 1/2
    ("Carolina Panthers", ["Denver Broncos", "Broncos"], 0.0, 0.0),
    ("Broncos", ["Denver Broncos", "Broncos"], 1.0, 1.0),  # the best reference
    ("", ["Denver"], 0.0, 0.0),
    ("a an the", ["the"], 1.0, 1.0),  # both empty once normalised
    ("go go team", ["go team"], 0.0, 2 * (2 / 3) * 1 / (2 / 3 + 1)),  # repeats count once
])
def test_exact_match_and_f1_follow_squads_scoring(prediction, references, em, f1):
    assert answers.exact_match(prediction, references) == em
    assert answers.f1(prediction, references) == pytest.approx(f1)


def test_the_answer_is_the_first_line():
    assert answers.first_line(" Denver Broncos\nQuestion: who") == "Denver Broncos"


# -- the task ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def squad(data_dir):
    return make_task("squad", data_dir=data_dir)


def _articles(task, split):
    task.split(split)
    rows = task.train_rows()
    return {rows[i]["article"] for i in task.source_rows[split]}


def test_squad_keeps_each_article_on_one_side(squad):
    sizes = {s: len(squad.split(s)) for s in ("train", "validation", "test")}
    assert all(sizes.values()) and sum(sizes.values()) == len(squad.train_rows())
    train, val, test = (_articles(squad, s) for s in ("train", "validation", "test"))
    assert not (train & val or train & test or val & test)
    assert "split by article" in squad.split_info["notes"][0]


def test_squad_examples_carry_mezos_prompt_and_every_reference(squad):
    ex = squad.split("test")[0]
    assert ex.prompt.startswith("Title: ") and ex.prompt.endswith("\nAnswer:")
    assert "\nContext: " in ex.prompt and "\nQuestion: " in ex.prompt
    assert ex.candidates == (" " + ex.references[0],) and ex.gold == 0
    assert len(set(ex.references)) == len(ex.references) >= 1
    empty = make_task("squad", data_dir=squad.data_dir, template="empty").split("test")[0]
    assert not empty.prompt.startswith("Title")


def test_squads_split_is_a_function_of_the_data_seed(data_dir, squad):
    again = make_task("squad", data_dir=data_dir)
    assert [e.prompt for e in again.split("train")] == [e.prompt for e in squad.split("train")]
    other = make_task("squad", data_dir=data_dir, data_seed=1)
    assert _articles(other, "test") != _articles(squad, "test")


def test_squad_train_examples_grows_train_and_keeps_validation(data_dir, squad):
    few = make_task("squad", data_dir=data_dir, train_examples=5)
    assert few.split("train") == squad.split("train")[:5]
    assert few.split("validation") == squad.split("validation")


def test_a_malformed_squad_file_names_the_place(tmp_path):
    (tmp_path / "squad").mkdir()
    data = {"data": [{"title": "T", "paragraphs": [{"context": "c", "qas": [
        {"question": "q", "answers": [{"text": "a"}]}, {"question": "q2", "answers": []}]}]}]}
    (tmp_path / "squad" / "dev-v1.1.json").write_text(json.dumps(data))
    with pytest.raises(TaskError, match="article 0, paragraph 0, question 1: needs at least"):
        make_task("squad", data_dir=str(tmp_path)).split("train")
    (tmp_path / "squad" / "dev-v1.1.json").write_text("[1, 2]")
    with pytest.raises(TaskError, match="not a SQuAD v1.1 file"):
        make_task("squad", data_dir=str(tmp_path)).split("train")


# -- writing answers --------------------------------------------------------------------------
PROMPTS = ["a great film", "the movie was very boring and", "bad", "It was a fine"]


@pytest.mark.parametrize("family, seed", [("qwen2", 0), ("qwen2", 1), ("gpt2", 1)])
def test_a_batch_writes_what_each_prompt_writes_alone(family, seed):
    """Left padding and the KV cache change nothing: each row of a batch is the greedy
    continuation of its prompt alone. (Random models whose head does not just repeat
    the last word: tied tiny ones do, whatever their attention sees.)"""
    model = tiny_model(family, seed=seed).eval()
    tok = tiny_tokenizer()
    together = generate(model, tok, PROMPTS, 6, torch.device("cpu"))
    alone = [generate(model, tok, [p], 6, torch.device("cpu"))[0] for p in PROMPTS]
    assert together == alone
    assert len({w for text in together for w in text.split()}) >= 4


def test_writing_stops_at_a_stop_token(monkeypatch):
    """A row ends with the stop token it wrote (a line break's text is then cut by
    first_line; end of sequence is a special token, dropped from the text)."""
    model = tiny_model("qwen2").eval()
    tok = tiny_tokenizer()
    free = generate(model, tok, PROMPTS, 6, torch.device("cpu"))
    words = free[0].split()
    assert len(set(words)) == len(words) == 4  # "new clichés like goes": no repeat
    monkeypatch.setattr(generate_module, "stop_ids", lambda *_: [tok.convert_tokens_to_ids(
        words[1])])
    stopped = generate(model, tok, PROMPTS, 6, torch.device("cpu"))
    assert stopped[0].split() == words[:2]
    assert all(s == f or words[1] in s.split() for s, f in zip(stopped, free, strict=True))


def test_stop_ids_hold_end_of_sequence_end_of_turn_and_line_breaks():
    tok = tiny_tokenizer()
    assert generate_module.stop_ids(tok, first_line=True) == [tok.eos_token_id]
    tok = tiny_tokenizer()
    tok.add_tokens(["\n", "<|im_end|>"])
    newline, turn = tok.convert_tokens_to_ids(["\n", "<|im_end|>"])
    assert generate_module.stop_ids(tok, first_line=False) == [tok.eos_token_id, turn]
    assert generate_module.stop_ids(tok, first_line=True) == [tok.eos_token_id, newline, turn]


# -- a session on a generative task -----------------------------------------------------------
@pytest.fixture(scope="module")
def squad_session(tiny_folder, data_dir):
    from edgezo.run.session import Session

    sess = Session(tiny_folder, task="squad", data_dir=data_dir, batch_size=2,
                   eval_batch_size=4, lr=1e-2, eps=1e-2, max_length=96)
    yield sess
    sess.close()


def test_a_generative_evaluation_scores_written_answers(squad_session, monkeypatch):
    sess = squad_session
    examples = sess.task.split("validation")[:6]
    written = sess.generate([e.prompt for e in examples], sess.task.max_new_tokens)
    seen = []
    result = sess.evaluate("validation", max_examples=6,
                           progress=lambda done, total: seen.append((done, total)))
    assert result["metric"] == "f1" and result["examples"] == 6
    assert result["score"] == result["f1"] == pytest.approx(sum(
        answers.f1(answers.first_line(w), e.references)
        for w, e in zip(written, examples, strict=True)) / 6)
    assert 0 <= result["exact_match"] <= result["f1"] <= 1
    assert seen == [(4, 6), (6, 6)]
    # answers that are a reference score full marks: the evaluation reads the references
    right = [dataclasses.replace(e, references=("nothing", answers.first_line(w)))
             for e, w in zip(examples, written, strict=True)]
    monkeypatch.setitem(sess.task._splits, "validation", right)
    result = sess.evaluate("validation", max_examples=6)
    assert result["exact_match"] == result["f1"] == 1.0


def test_the_plan_prices_the_written_answers_kv_cache(squad_session):
    plan = squad_session.plan
    shape = squad_session.shapes.eval
    assert shape.new_tokens == squad_session.task.max_new_tokens
    cfg = squad_session.model.config
    elem = next(squad_session.model.parameters()).element_size()
    per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * (
        cfg.hidden_size // cfg.num_attention_heads) * elem
    assert plan.eval_components["generation_kv_cache"] == shape.rows * shape.seq_len * per_token


def test_a_generative_task_trains_on_its_answer_tokens(squad_session):
    batch = squad_session.next_batch()
    assert "labels" in batch and batch["loss_type"] == "lm"
    r = squad_session.step(batch)
    assert r.loss > 0 and r.projected_grads


@pytest.mark.full_data
def test_squad_on_the_whole_dev_file_is_mezos_1000_500_1000(full_data_dir):
    task = make_task("squad", data_dir=full_data_dir)
    assert [len(task.split(s)) for s in ("train", "validation", "test")] == [1000, 500, 1000]
    train, val, test = (_articles(task, s) for s in ("train", "validation", "test"))
    assert not (train & val or train & test or val & test)
    assert len(train | val | test) == 48


# -- F1 as the objective ----------------------------------------------------------------------
def test_the_f1_objective_steps_on_written_answers_in_two_passes(tiny_folder, data_dir):
    """ZO can follow a score it cannot differentiate: each pass writes the answers at
    θ ± εz, and the loss is −F1 (MeZO's SQuAD F1 objective)."""
    from edgezo.run.session import Session
    from edgezo.tasks.loss import negative_f1

    sess = Session(tiny_folder, task="squad", data_dir=data_dir, batch_size=2,
                   eval_batch_size=4, lr=1e-2, eps=1e-2, max_length=96, objective="f1")
    try:
        assert not sess.pair  # a KV cache per sign
        assert sess.shapes.train.new_tokens == sess.task.max_new_tokens
        assert sess.plan.components["generation_kv_cache"] > 0
        batch = sess.next_batch()
        spec = batch["written"]
        written = sess.generate(spec.prompts, spec.max_new_tokens)
        want = [-answers.f1(answers.first_line(w), r)
                for w, r in zip(written, spec.references, strict=True)]
        assert negative_f1(sess.model, batch).tolist() == pytest.approx(want)
        r = sess.step(batch)
        assert r.forward_passes == 2 and -1 <= r.loss <= 0
    finally:
        sess.close()


@pytest.mark.parametrize("options, message", [
    ({"task": "sst2", "objective": "f1"}, "scores a choice among candidates"),
    ({"task": "squad", "objective": "f1", "pair": True}, "drop --pair"),
])
def test_the_f1_objective_refuses_what_it_cannot_do(tiny_folder, data_dir, options, message):
    from edgezo.errors import ConfigError
    from edgezo.run.session import Session

    with pytest.raises(ConfigError, match=message):
        Session(tiny_folder, data_dir=data_dir, batch_size=2, **options)


def test_squads_chat_template_asks_as_a_user_turn(data_dir):
    from edgezo.models.tiny import tiny_tokenizer
    from edgezo.tasks.base import Encoder

    task = make_task("squad", data_dir=data_dir, template="chat")
    ex = task.split("test")[0]
    assert ex.prompt == "" and [r for r, _ in ex.messages] == ["user", "assistant"]
    assert ex.messages[1][1] == ex.references[0] and "Question: " in ex.messages[0][1]
    tok = tiny_tokenizer()
    tok.chat_template = ("{% for m in messages %}<s> {{ m['content'] }} </s> {% endfor %}"
                         "{% if add_generation_prompt %}<s> {% endif %}")
    prompt = Encoder(tok, max_length=512).prompt_of(ex)
    assert prompt.startswith("<s> Title: ") and prompt.endswith("</s> <s> ")


def test_a_rendered_prompt_is_tokenized_without_added_special_tokens():
    """A chat template writes its own BOS: `rendered` prompts get none added, so they
    start as training tokenizes them (chat_format.encode), with one BOS, not two."""
    from tokenizers import processors

    model = tiny_model("qwen2").eval()
    tok = tiny_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    seen = []
    real = model.generate
    model.generate = lambda **kw: seen.append(kw["input_ids"][0, :2].tolist()) or real(**kw)
    bos = tok.bos_token_id
    generate(model, tok, ["<s> a great film"], 2, torch.device("cpu"), rendered=True)
    generate(model, tok, ["a great film"], 2, torch.device("cpu"))
    assert seen[0][0] == bos and seen[0][1] != bos and seen[1][0] == bos
