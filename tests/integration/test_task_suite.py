"""The task suite: templates on known rows, splits, losses and user tasks."""

import json

import pytest
import torch
from conftest import FIXTURE_DATA
from torch import nn

from edgezo.errors import TaskError
from edgezo.tasks.base import Encoder, Example
from edgezo.tasks.loss import candidate_scores, example_losses
from edgezo.tasks.make import TASKS, make_task

# A few real rows of each task (the data_dir fixture's folder).
DATA = str(FIXTURE_DATA)


def first(task, template="aligned"):
    t = make_task(task, data_dir=DATA, template=template)
    row = t.train_rows()[0]
    ex = t.example(row)
    return ex[0] if isinstance(ex, list) else ex, ex




def test_copa_template():
    ex, _ = first("copa")
    assert ex.prompt == "My body cast a shadow over the grass because"
    assert ex.candidates == (" the sun was rising.", " the grass was cut.") and ex.gold == 0
    empty, _ = first("copa", "empty")
    assert empty.prompt == "My body cast a shadow over the grass."
    assert empty.candidates == (" The sun was rising.", " The grass was cut.")


def test_winogrande_template_scores_the_continuation_after_each_option():
    ex, _ = first("winogrande")
    stem = "Sarah was a much better surgeon than Maria so "
    assert ex.prompts == (stem + "Sarah", stem + "Maria")
    assert ex.candidates == (" always got the easier cases.",) * 2 and ex.gold == 1
    empty, _ = first("winogrande", "empty")
    assert empty.prompt == "" and empty.candidates[0] == stem + "Sarah always got the easier cases."


def test_boolq_wic_wsc_templates():
    boolq, _ = first("boolq")
    assert boolq.prompt.startswith("Ethanol fuel -- All biomass")
    assert boolq.prompt.endswith("\nQuestion: does ethanol take more energy make that produces?"
                                 "\nAnswer:")
    assert boolq.candidates == (" No", " Yes")
    wic, _ = first("wic")
    assert wic.prompt == ('Does the word "place" have the same meaning in these two sentences? '
                          "Yes, No?\nDo you want to come over to my place later?\nA political "
                          "system with no place for the less prominent groups.\n")
    assert wic.candidates == ("No", "Yes") and wic.gold == 0
    wsc, _ = first("wsc")
    assert wsc.prompt == ("Mark told Pete many lies about himself, which Pete included in his "
                          "book. He should have been more skeptical.\nIn the previous sentence, "
                          'does the pronoun "he" refer to Mark? Yes or No?\n')
    assert wsc.gold == 0


def test_multirc_is_one_example_per_answer_grouped_by_question():
    t = make_task("multirc", data_dir=DATA)
    exs = t.example(t.test_rows()[0])
    assert [e.gold for e in exs] == [0, 1, 1, 0] and len({e.group for e in exs}) == 1
    assert exs[0].prompt.endswith('\nQuestion: Would the mass of a baseball affect how much '
                                  'force you have to use to pick it up?\nI found this answer '
                                  '"No". Is that correct? Yes or No?\n')


def test_sst2_empty_template():
    t = make_task("sst2", data_dir=DATA, template="empty")
    ex = t.example({"sentence": "a fine film ", "label": 1})
    assert ex.prompt == "a fine film" and ex.candidates == (" terrible", " great")


FULL_SIZES = [
    ("copa", (267, 133, 100)),         # 400 train rows: 2:1, the 100 val rows as test
    ("winogrande", (563, 282, 422)),   # dev only: a third held out as test
    ("boolq", (1000, 500, 1000)),      # val only: 1000 held out as test
    ("wic", (1000, 500, 638)),
    ("sst2", (1000, 500, 872)),
]
FIXTURE_SIZES = [  # the fixtures' few rows: the same rules at a smaller scale
    ("copa", (27, 13, 16)),            # 40 train rows: 2:1, the 16 val rows as test
    ("winogrande", (21, 11, 16)),      # 48 dev rows: a third held out as test
    ("boolq", (16, 8, 12)),
    ("wic", (27, 13, 16)),
    ("sst2", (40, 20, 24)),
]


def check_splits(t, sizes) -> None:
    got = tuple(len(t.split(s)) for s in ("train", "validation", "test"))
    assert got == sizes
    rows = t.source_rows
    assert not set(rows["train"]) & set(rows["validation"])
    if "test" in rows:  # held out of the same file
        assert not set(rows["test"]) & (set(rows["train"]) | set(rows["validation"]))
        assert t.split_info["notes"]
    assert t.split_info["train"] == sizes[0]


@pytest.mark.parametrize("task, sizes", FIXTURE_SIZES)
def test_splits_are_disjoint_and_recorded(task, sizes):
    check_splits(make_task(task, data_dir=DATA), sizes)


@pytest.mark.full_data  # ZO-Bench's sizes come from the whole files
@pytest.mark.parametrize("task, sizes", FULL_SIZES)
def test_splits_of_the_whole_files(task, sizes, full_data_dir):
    check_splits(make_task(task, data_dir=full_data_dir), sizes)


def test_multirc_splits_keep_questions_whole():
    t = make_task("multirc", data_dir=DATA)
    train, val = t.split("train"), t.split("validation")
    assert not {e.group for e in train} & {e.group for e in val}
    assert (len({e.group for e in train}), len({e.group for e in val})) == (23, 11)


@pytest.mark.full_data  # the answer counts of ZO-Bench's 200/100 questions
def test_multirc_whole_file_gives_about_1000_and_500_answers(full_data_dir):
    t = make_task("multirc", data_dir=full_data_dir)
    train, val = t.split("train"), t.split("validation")
    assert not {e.group for e in train} & {e.group for e in val}
    assert 800 < len(train) < 1300 and 350 < len(val) < 700


def byte_tokenizer():
    """Every byte a token: any two different strings tokenize differently."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(["<pad>", "<s>", "</s>", "<unk>", *alphabet])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                   eos_token="</s>", unk_token="<unk>")


def unique_ids(tok, text: str, other: str) -> list[int]:
    ids = tok(text, add_special_tokens=False).input_ids
    others = set(tok(other, add_special_tokens=False).input_ids)
    return [i for i in ids if i not in others]


class Oracle(nn.Module):
    """A fake LM that strongly prefers some tokens, in rows holding all `trigger` tokens."""

    def __init__(self, vocab: int, favoured: list[int], trigger: list[int]):
        super().__init__()
        bias = torch.zeros(vocab)
        bias[favoured] = 10.0
        self.register_buffer("bias", bias)
        self.trigger = trigger

    def forward(self, input_ids, attention_mask=None, logits_to_keep=0, use_cache=False):
        keep = logits_to_keep or input_ids.shape[1]
        on = torch.ones(input_ids.shape[0], dtype=torch.bool)
        for t in self.trigger:
            on &= (input_ids == t).any(1)
        logits = on[:, None, None] * self.bias.expand(input_ids.shape[0], keep, -1)
        return type("Out", (), {"logits": logits})()


@pytest.mark.parametrize("task", [t for t in TASKS if not TASKS[t].generative])
def test_the_loss_ranks_the_gold_answer_first(task):
    """With a model that prefers the gold answer (or, for WinoGrande, continues the gold
    option's prompt), the gold candidate scores highest and the training loss is lower
    than with the label flipped."""
    tok = byte_tokenizer()
    t = make_task(task, data_dir=DATA)
    ex, _ = first(task)
    if task == "winogrande":  # the staged first row names both options before the blank
        ex = t.example({"sentence": "The cat sat on the _ today.", "option1": "dog",
                        "option2": "mat", "answer": "2"})
    g, o = ex.gold, 1 - ex.gold
    if ex.prompts is None:
        model = Oracle(len(tok), unique_ids(tok, ex.candidates[g], ex.candidates[o]), [])
    else:  # same continuation, different prompts: favour it after the gold prompt only
        model = Oracle(len(tok), tok(ex.candidates[g], add_special_tokens=False).input_ids,
                       unique_ids(tok, ex.prompts[g], ex.prompts[o]))
    enc = Encoder(tok, loss=t.loss, max_length=4096)
    batch = enc.encode([ex])
    assert candidate_scores(model, batch).argmax(-1).item() == g
    flipped = Example(ex.prompt, ex.candidates, o, ex.prompts, ex.group)
    assert example_losses(model, batch) < example_losses(model, enc.encode([flipped]))


def test_copa_and_winogrande_train_with_the_gold_answer_lm_loss():
    assert make_task("copa", data_dir=DATA).loss == "lm"
    assert make_task("winogrande", data_dir=DATA).loss == "lm"
    assert make_task("boolq", data_dir=DATA).loss == "classification"


# -- user tasks -----------------------------------------------------------------------------
def write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_user_jsonl_task(tmp_path):
    rows = [{"input": f"text {i}", "candidates": [" no", " yes"], "label": i % 2}
            for i in range(30)]
    rows[3]["label"] = " yes"  # a label may name the candidate
    t = make_task(str(write(tmp_path / "mine.jsonl", rows)))
    ex = t.example(t.train_rows()[3])
    assert ex.prompt == "text 3" and ex.gold == 1
    assert sum(len(t.split(s)) for s in ("train", "validation", "test")) == 30


def test_user_yaml_spec_with_template_and_shared_candidates(tmp_path):
    write(tmp_path / "train.jsonl", [{"review": f"r{i}", "stars": i % 2} for i in range(12)])
    write(tmp_path / "test.jsonl", [{"review": "great", "stars": 1}])
    (tmp_path / "spec.yaml").write_text(
        "name: reviews\ntrain: train.jsonl\ntest: test.jsonl\n"
        'template: "Review: {review}\\nSentiment:"\ncandidates: [" bad", " good"]\n'
        "label_field: stars\n")
    t = make_task(str(tmp_path / "spec.yaml"))
    (ex,) = t.split("test")
    assert t.name == "reviews" and ex.prompt == "Review: great\nSentiment:"
    assert ex.candidates == (" bad", " good") and ex.gold == 1
    empty = make_task(str(tmp_path / "spec.yaml"), template="empty").split("test")[0]
    assert empty.prompt == "great"


@pytest.mark.parametrize("row, needle", [
    ({"candidates": ["a", "b"], "label": 0}, "line 2: missing field 'input'"),
    ({"input": "x", "label": 0}, "line 2: missing field 'candidates'"),
    ({"input": "x", "candidates": ["a"], "label": 0}, "at least two strings"),
    ({"input": "x", "candidates": ["a", "b"]}, "line 2: missing field 'label'"),
    ({"input": "x", "candidates": ["a", "b"], "label": 2}, "candidate index"),
    ({"input": "x", "candidates": ["a", "b"], "label": "c"}, "candidate index"),
    ({"input": "x", "candidates": ["a", "b", "c"], "label": 0}, "line 2: field 'candidates'"),
])
def test_bad_user_rows_name_the_line_and_field(tmp_path, row, needle):
    good = {"input": "ok", "candidates": ["a", "b"], "label": 1}
    t = make_task(str(write(tmp_path / "bad.jsonl", [good, row])))
    with pytest.raises(TaskError, match=needle):
        t.split("train")


def test_bad_task_names_and_specs(tmp_path):
    with pytest.raises(TaskError, match="does not exist"):
        make_task(str(tmp_path / "none.jsonl"))
    (tmp_path / "s.yaml").write_text("train: t.jsonl\nverbalizer: [a, b]\n")
    with pytest.raises(TaskError, match="unknown field"):
        make_task(str(tmp_path / "s.yaml"))
    from edgezo.errors import ConfigError

    with pytest.raises(ConfigError,
                       match="valid templates: aligned, auto, chat, empty, movie, natural"):
        make_task("sst2", template="plain")
    # a template another task defines is refused, naming the ones this task has
    with pytest.raises(TaskError, match="copa has no 'natural' template; it has: auto, "
                                        "aligned, empty"):
        make_task("copa", data_dir=DATA, template="natural")
    assert make_task("copa", data_dir=DATA).template == "aligned"  # auto: its only prompt


def test_multirc_reports_exact_match_per_question(tiny_folder):
    from edgezo.run.session import Session

    sess = Session(model=tiny_folder, task="multirc", data_dir=DATA, eval_batch_size=8)
    try:
        result = sess.evaluate("test", max_examples=12)
        assert result["examples"] == 12 and result["groups"] >= 2
        examples = sess.task.split("test")[:12]
        right: dict[str, list[bool]] = {}
        for p, ex in zip(sess.predict(examples), examples, strict=True):
            right.setdefault(ex.group, []).append(p == ex.gold)
        assert result["groups"] == len(right)
        assert result["exact_match"] == sum(all(v) for v in right.values()) / len(right)
        assert result["accuracy"] == sum(sum(v) for v in right.values()) / 12
        assert sess.report()["splits"]["test"] == 87  # every answer of the 2 passages
    finally:
        sess.close()
