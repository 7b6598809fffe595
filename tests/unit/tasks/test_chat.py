"""Conversations and texts as tasks (chat_format.py, chat.py): the formats users have,
their errors, what the loss covers, and a session that trains and scores on them."""

import json
from pathlib import Path

import pytest
import torch

from edgezo.errors import TaskError
from edgezo.models.tiny import save_tiny, tiny_tokenizer
from edgezo.tasks.base import Encoder
from edgezo.tasks.chat import ChatTask
from edgezo.tasks.make import make_task
from edgezo.tasks.user import UserTask

# A ChatML-like template in the tiny tokenizer's words (its vocabulary has no roles:
# they read as <unk>, which is enough to tell turns apart).
TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
            "{% if add_generation_prompt %}<s> assistant {% endif %}")

CONVERSATION = [{"role": "system", "content": "a good film"},
                {"role": "user", "content": "was it boring ?"},
                {"role": "assistant", "content": "no , it was great"},
                {"role": "user", "content": "and the story ?"},
                {"role": "assistant", "content": "fresh and original"}]


def write(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def chat_tokenizer():
    tok = tiny_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory) -> str:
    """A tiny Qwen2 (untied head) whose tokenizer has a chat template."""
    folder = tmp_path_factory.mktemp("tiny-chat")
    save_tiny(folder, "qwen2")
    chat_tokenizer().save_pretrained(folder)
    return str(folder)


def conversations(n: int) -> list[dict]:
    words = ["great", "boring", "fresh", "stale", "funny", "flat"]
    return [{"messages": [{"role": "user", "content": f"was it {words[i % 6]} ?"},
                          {"role": "assistant", "content": f"it was {words[(i + 1) % 6]}"}]}
            for i in range(n)]


# -- formats and their errors ---------------------------------------------------------------
@pytest.mark.parametrize("row, fmt", [
    ({"messages": CONVERSATION}, "messages"),
    ({"prompt": "was it good ?", "completion": "yes"}, "prompt-completion"),
    ({"prompt": [{"role": "user", "content": "hi"}],
      "completion": [{"role": "assistant", "content": "yes"}]}, "prompt-completion"),
    ({"text": "a fresh and funny film"}, "text"),
])
def test_each_format_becomes_a_chat_task(tmp_path, row, fmt):
    task = make_task(write(tmp_path / "mine.jsonl", [row] * 6))
    assert isinstance(task, ChatTask) and task.format == fmt
    ex = task.split("train")[0]
    assert ex.messages[-1][0] == ("text" if fmt == "text" else "assistant")
    assert task.generative == (fmt != "text")


def test_classification_rows_stay_a_user_task(tmp_path):
    rows = [{"input": "a film", "candidates": ["bad", "good"], "label": 1}] * 6
    assert isinstance(make_task(write(tmp_path / "mine.jsonl", rows)), UserTask)


def test_a_yaml_spec_may_name_conversation_files(tmp_path):
    write(tmp_path / "train.jsonl", conversations(9))
    write(tmp_path / "test.jsonl", conversations(3))
    (tmp_path / "spec.yaml").write_text("name: talk\ntrain: train.jsonl\ntest: test.jsonl\n")
    task = make_task(str(tmp_path / "spec.yaml"))
    assert isinstance(task, ChatTask) and task.name == "talk"
    assert len(task.split("test")) == 3


@pytest.mark.parametrize("rows, message", [
    ([{"messages": [{"role": "user", "content": "hi"}]}],
     "line 1: the conversation must end with an assistant message"),
    ([{"messages": conversations(1)[0]["messages"]},
      {"messages": [{"role": "robot", "content": "hi"}]}], r"line 2: messages\[0\] must be"),
    ([{"messages": conversations(1)[0]["messages"]}, {"text": "hi"}],
     "line 2: expected a messages row"),
    ([{"text": " "}], "line 1: field 'text' must be a non-empty string"),
    ([{"prompt": "hi", "completion": 3}], "line 1: field 'completion' must be a string"),
    ([{"messages": [{"role": "system", "content": "be brief"},
                    {"role": "assistant", "content": "hi"}]}],
     "line 1: the conversation must start with a user message"),
])
def test_a_malformed_row_names_its_line_and_field(tmp_path, rows, message):
    with pytest.raises(TaskError, match=message):
        make_task(write(tmp_path / "bad.jsonl", rows)).split("train")


def test_a_model_without_a_chat_template_is_told_the_fix():
    enc = Encoder(tiny_tokenizer(), max_length=64)
    task_ex = ChatTask.example(None, {"_messages": (("user", "hi"), ("assistant", "yes"))})
    with pytest.raises(TaskError, match="no chat template.*instruction-tuned model"):
        enc.encode([task_ex])


# -- what the loss covers --------------------------------------------------------------------
def _trained_words(train_on: str) -> list[str]:
    tok = chat_tokenizer()
    enc = Encoder(tok, max_length=128, train_on=train_on)
    ex = ChatTask.example(None, {"_messages": tuple((m["role"], m["content"])
                                                    for m in CONVERSATION)})
    batch = enc.encode([ex])
    labels = batch["labels"][0]
    assert torch.equal(batch["input_ids"][0][labels != -100], labels[labels != -100])
    return tok.decode(labels[labels != -100]).split()


def test_the_loss_covers_the_assistants_turns_by_default():
    assert _trained_words("assistant") == ["no", ",", "it", "was", "great", "</s>",
                                           "fresh", "and", "original", "</s>"]
    assert _trained_words("last") == ["fresh", "and", "original", "</s>"]
    everything = _trained_words("all")  # every token but the first, which has no context
    assert everything[:2] == ["<unk>", "a"] and len(everything) > 20


def test_no_row_trains_its_first_token_whatever_its_padding():
    """A text's first token follows only padding: it is never labelled, so a row's loss
    does not depend on which rows share its batch."""
    enc = Encoder(chat_tokenizer(), max_length=64)
    texts = [ChatTask.example(None, {"_messages": (("text", t),)})
             for t in ("a great film", "a very very long and boring film")]
    batch = enc.encode(texts)
    first = batch["attention_mask"].argmax(1)
    assert (batch["labels"][torch.arange(2), first] == -100).all()
    assert ((batch["labels"] != -100).sum(1) == batch["attention_mask"].sum(1) - 1).all()


def test_a_classification_file_with_a_text_field_stays_a_classification_task(tmp_path):
    rows = [{"text": "a great film", "label": 1}, {"text": "boring", "label": 0}] * 4
    write(tmp_path / "reviews.jsonl", rows)
    (tmp_path / "spec.yaml").write_text("train: reviews.jsonl\ntemplate: 'Review: {text}'\n"
                                        "candidates: [' bad', ' good']\n")
    assert isinstance(make_task(str(tmp_path / "spec.yaml")), UserTask)
    rows = [{"text": "a film", "candidates": ["bad", "good"], "label": 1}] * 6
    assert isinstance(make_task(write(tmp_path / "mine.jsonl", rows)), UserTask)


# -- a session ---------------------------------------------------------------------------------
def test_a_session_trains_on_conversations_and_scores_written_answers(chat_folder, tmp_path):
    from edgezo.run.session import Session

    task = write(tmp_path / "talk.jsonl", conversations(30))
    sess = Session(chat_folder, task=task, batch_size=2, eval_batch_size=4, lr=1e-2,
                   eps=1e-2, max_length=64)
    try:
        batch = sess.next_batch()
        assert "gold" not in batch and (batch["labels"] != -100).any()
        assert sess.step(batch).loss > 0
        result = sess.evaluate("validation")
        assert result["metric"] == "f1" and result["examples"] == len(
            sess.task.split("validation"))
        assert sess.shapes.eval.new_tokens == sess.task.max_new_tokens
    finally:
        sess.close()


def test_a_text_task_is_scored_by_its_tokens_log_likelihood(chat_folder, tmp_path):
    from edgezo.run.session import Session

    rows = [{"text": f"a {w} film , really {w}"} for w in ["fresh", "great", "flat"] * 8]
    sess = Session(chat_folder, task=write(tmp_path / "notes.jsonl", rows), batch_size=2,
                   eval_batch_size=4, lr=1e-2, eps=1e-2, max_length=32)
    try:
        result = sess.evaluate("validation")
        alone = [-sess.engine.loss(sess.encoder.encode([ex]))
                 for ex in sess.task.split("validation")]
        assert result["metric"] == "log_likelihood" and result["score"] < 0
        assert result["score"] == pytest.approx(sum(alone) / len(alone), rel=1e-3)
        assert sess.step().loss > 0
    finally:
        sess.close()


# -- talking to a model ----------------------------------------------------------------------
def test_session_generate_takes_a_conversation(chat_folder):
    from edgezo.run.session import Session

    sess = Session(chat_folder, task=None, batch_size=2, max_length=64)
    try:
        said = [{"role": "user", "content": "was it boring ?"}]
        by_messages = sess.generate(said, 5)
        by_text = sess.generate(chat_tokenizer().apply_chat_template(
            said, tokenize=False, add_generation_prompt=True), 5)
        assert by_messages == by_text and by_messages[0].strip()
    finally:
        sess.close()


def test_edgezo_chat_streams_answers_until_exit(chat_folder, tiny_folder):
    from edgezo.cli.main import app
    from typer.testing import CliRunner

    runner = CliRunner()
    out = runner.invoke(app, ["chat", chat_folder, "--max-new-tokens", "4", "--system",
                              "a film"], input="was it good ?\n/reset\nand fun ?\n/exit\n")
    assert out.exit_code == 0, out.output
    assert out.output.count("model> ") == 2 and out.output.count("you> ") == 4
    out = runner.invoke(app, ["chat", tiny_folder], input="hi\n")
    assert out.exit_code == 2 and "no chat template" in out.output


def test_a_template_that_writes_its_own_bos_gets_no_second_one(chat_folder, monkeypatch):
    """Prompts a chat template rendered are tokenized as training tokenizes them: no
    special tokens added (a template with {{ bos_token }} would otherwise start with two)."""
    from edgezo.run.session import Session
    from edgezo.tasks import generate as generate_module

    seen = []
    real = generate_module.generate

    def spy(model, tok, prompts, *args, **kwargs):
        seen.append(kwargs.get("rendered"))
        return real(model, tok, prompts, *args, **kwargs)

    monkeypatch.setattr("edgezo.tasks.generate.generate", spy)
    sess = Session(chat_folder, task=None, batch_size=2, max_length=64)
    try:
        sess.generate([{"role": "user", "content": "hi"}], 2)
        sess.generate("a great film", 2)
        with pytest.raises(Exception, match="not both"):
            sess.generate(["a film", [{"role": "user", "content": "hi"}]], 2)
    finally:
        sess.close()
    assert seen == [True, False]


@pytest.mark.parametrize("options, message", [
    ({"objective": "accuracy"}, "scored by f1: use --objective f1"),
    ({"train_on": "last", "task": "sst2"}, "has no conversations"),
])
def test_options_a_task_would_ignore_are_refused(chat_folder, tmp_path, data_dir, options,
                                                 message):
    from edgezo.errors import ConfigError
    from edgezo.run.session import Session

    task = write(tmp_path / "talk.jsonl", conversations(12))
    with pytest.raises(ConfigError, match=message):
        Session(chat_folder, **{"task": task, "data_dir": data_dir, "batch_size": 2,
                                **options})
