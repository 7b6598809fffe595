"""SST-2: template, splits, data errors and the encoder's two batch layouts."""

import pytest
import torch

from edgezo.errors import TaskError
from edgezo.models.tiny import tiny_model, tiny_tokenizer
from edgezo.tasks.base import Encoder, Example, batches
from edgezo.tasks.loss import candidate_scores
from edgezo.tasks.make import make_task


def test_template_renders_the_zo_bench_prompt(data_dir):
    task = make_task("sst2", data_dir=data_dir, template="aligned")
    first = task.example(task.test_rows()[0])
    assert first.prompt == "it 's a charming and often affecting journey . It was"
    assert first.candidates == (" terrible", " great")
    assert first.gold == 1


def test_the_default_template_is_the_movie_review_prompt(data_dir):
    """auto resolves to the task's own default, and the task records the resolved name."""
    task = make_task("sst2", data_dir=data_dir)
    first = task.example(task.test_rows()[0])
    assert task.template == "movie"
    assert first.prompt == ("Movie review: it 's a charming and often affecting journey .\n"
                            "The sentiment of this review is")
    assert first.candidates == (" negative", " positive") and first.gold == 1


def test_the_natural_template_asks_for_the_sentiment(data_dir):
    task = make_task("sst2", data_dir=data_dir, template="natural")
    first = task.example(task.test_rows()[0])
    assert first.prompt == "Review: it 's a charming and often affecting journey .\nSentiment:"
    assert first.candidates == (" negative", " positive") and first.gold == 1


def test_the_shipped_sample_is_1000_500_872_without_overlap_and_fixed():
    """With no data folder, SST-2 comes from the sample shipped inside the package."""
    task = make_task("sst2")
    train, val, test = (task.split(s) for s in ("train", "validation", "test"))
    assert (len(train), len(val), len(test)) == (1000, 500, 872)
    # Disjoint rows of the training file (SST-2 repeats some sentences, so compare rows).
    rows = task.source_rows
    assert len(set(rows["train"])) == 1000 and not set(rows["train"]) & set(rows["validation"])
    assert make_task("sst2").split("train")[:5] == train[:5]
    assert make_task("sst2", train_examples=10).split("train") == train[:10]
    assert "shipped with edgezo" in task.split_info["notes"][0]


@pytest.mark.full_data  # the sample must be exactly what the whole train file gives
def test_the_shipped_sample_is_what_the_whole_file_draws(full_data_dir):
    shipped, full = make_task("sst2"), make_task("sst2", data_dir=full_data_dir)
    for split in ("train", "validation", "test"):
        assert shipped.split(split) == full.split(split)
    assert shipped.source_rows == full.source_rows
    other = make_task("sst2", data_dir=full_data_dir, data_seed=1)
    assert other.split("train")[:5] != full.split("train")[:5]


def test_the_shipped_sample_refuses_what_it_does_not_hold(monkeypatch):
    """Another data seed or more rows need the whole file: said, naming the ways to get it
    (the hub is tried first, so hide `datasets` where it is installed)."""
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)
    for kw, why in (({"data_seed": 1}, "data seed 1"), ({"train_examples": 2000}, "2000"),
                    ({"train_examples": 0}, "train_examples 0")):
        with pytest.raises(TaskError, match=f"{why}.*--data-dir.*edgezo\\[hub\\]"):
            make_task("sst2", **kw).split("train")


def test_lookup_order_is_data_dir_then_environment_then_shipped(tmp_path, monkeypatch,
                                                                 data_dir):
    """No walk up the folders: a data folder beside the working directory (where the
    project's own machines keep theirs) is not read."""
    from edgezo.tasks.data import ENV_VAR

    decoy = tmp_path / "shared" / "data" / "sst2"
    decoy.mkdir(parents=True)
    for f in ("train.tsv", "dev.tsv"):
        (decoy / f).write_text("sentence\tlabel\ndecoy \t0\n")
    monkeypatch.chdir(tmp_path / "shared")
    assert len(make_task("sst2").split("test")) == 872  # the shipped sample
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "shared" / "data"))
    assert make_task("sst2").split("test")[0].prompt.startswith("Movie review: decoy")
    # --data-dir beats the environment
    assert len(make_task("sst2", data_dir=data_dir).split("test")) == 24
    # an environment folder without the task is passed over; a partial one is an error
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    assert len(make_task("sst2").split("test")) == 872
    (decoy / "dev.tsv").unlink()
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "shared" / "data"))
    with pytest.raises(TaskError, match="sst2/dev.tsv"):
        make_task("sst2").split("test")


@pytest.mark.full_data  # draws beyond the sample, from the whole train file
def test_train_examples_grows_train_and_leaves_validation_where_it_was(full_data_dir):
    """More training rows extend the default sample; fewer take its prefix; 0 takes every
    row. Validation (and test) never move, so runs stay comparable on them."""
    data_dir = full_data_dir
    base = make_task("sst2", data_dir=data_dir)
    base.split("train")
    more = make_task("sst2", data_dir=data_dir, train_examples=3000)
    fewer = make_task("sst2", data_dir=data_dir, train_examples=10)
    every = make_task("sst2", data_dir=data_dir, train_examples=0)
    for task in (more, fewer, every):
        task.split("train")
        assert task.source_rows["validation"] == base.source_rows["validation"]
        assert not set(task.source_rows["train"]) & set(task.source_rows["validation"])
        assert task.split("test") == base.split("test")
    rows = {t: t.source_rows["train"] for t in (more, fewer, every)}
    assert len(rows[more]) == len(set(rows[more])) == 3000
    assert rows[more][:1000] == base.source_rows["train"]
    assert rows[fewer] == base.source_rows["train"][:10]
    n_file = len(base.train_rows())
    assert len(rows[every]) == len(set(rows[every])) == n_file - 500
    assert rows[every][:3000] == rows[more]  # one order of the extra rows, whatever the count
    assert more.split_info["train"] == 3000


def test_train_examples_beyond_the_file_uses_every_row_and_says_so(tmp_path):
    (tmp_path / "t.jsonl").write_text("".join(
        f'{{"input": "x{i}", "candidates": ["a", "b"], "label": {i % 2}}}\n'
        for i in range(30)))
    task = make_task(str(tmp_path / "t.jsonl"), train_examples=100)
    train, val, test = (task.split(s) for s in ("train", "validation", "test"))
    assert len(train) + len(val) + len(test) == 30
    assert any("train_examples 100" in n for n in task.split_info["notes"])
    with pytest.raises(TaskError, match="train_examples"):
        make_task("sst2", train_examples=-1)


def test_missing_data_dir_names_the_expected_files(tmp_path):
    with pytest.raises(TaskError, match="sst2/train.tsv"):
        make_task("sst2", data_dir=str(tmp_path)).split("train")


def test_malformed_row_names_the_line(tmp_path):
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "train.tsv").write_text("sentence\tlabel\ngood film \t1\nbad\tmaybe\n")
    (tmp_path / "sst2" / "dev.tsv").write_text("sentence\tlabel\n")
    with pytest.raises(TaskError, match="line 3"):
        make_task("sst2", data_dir=str(tmp_path)).split("train")


def test_unknown_task_lists_valid_ones():
    from edgezo.errors import ConfigError

    with pytest.raises(ConfigError, match="valid tasks: <file>.jsonl, <spec>.yaml, boolq, copa"):
        make_task("imdb")


def test_batches_are_a_pure_function_of_the_step():
    examples = [Example(str(i), ("a", "b"), 0) for i in range(10)]
    full = batches(examples, 3, seed=0)
    first = [next(full) for _ in range(7)]
    resumed = batches(examples, 3, seed=0, start_step=4)
    assert [next(resumed) for _ in range(3)] == first[4:]


def test_candidates_the_tokenizer_cannot_tell_apart_are_refused():
    """Two answers both unknown to a vocabulary tokenize alike: every score would tie
    and every ZO estimate would be zero, a run that trains nothing."""
    enc = Encoder(tiny_tokenizer())
    with pytest.raises(TaskError, match="tokenize to the same ids"):
        enc.encode([Example("the movie was", (" qwzx", " vbnm"), 0)])


def test_single_token_fast_path_equals_the_general_path():
    tok = tiny_tokenizer()
    enc = Encoder(tok)
    verbalizer = (" terrible", " great")
    examples = [Example("the movie was", verbalizer, 1),
                Example("a charming and often affecting journey . It was", verbalizer, 0)]
    fast = enc.encode(examples)
    assert "candidate_ids" in fast
    enc._single[(" terrible", " great")] = None  # force one row per (example, candidate)
    general = enc.encode(examples)
    assert general["input_ids"].shape[0] == 4 and general["num_candidates"] == 2
    model = tiny_model("llama")
    with torch.no_grad():
        torch.testing.assert_close(candidate_scores(model, fast), candidate_scores(model, general),
                                   rtol=1e-5, atol=1e-5)


def test_encoder_left_pads():
    enc = Encoder(tiny_tokenizer())
    batch = enc.encode([Example("great", (" terrible", " great"), 0),
                        Example("a very long and boring film", (" terrible", " great"), 1)])
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1


def test_encoder_pads_to_a_multiple_of_8_without_changing_scores():
    """Bucketed widths bound the kernel caches' shapes; the scores must not move."""
    tok = tiny_tokenizer()
    examples = [Example("great", (" terrible", " great"), 0),
                Example("a very long and boring film", (" terrible", " great"), 1)]
    exact, padded = Encoder(tok, pad_to_multiple_of=1), Encoder(tok)
    model = tiny_model("llama")
    for general in (False, True):
        if general:  # one row per (example, candidate)
            for enc in (exact, padded):
                enc._single[(" terrible", " great")] = None
        a, b = exact.encode(examples), padded.encode(examples)
        assert b["input_ids"].shape[1] % 8 == 0 and a["input_ids"].shape[1] % 8 != 0
        with torch.no_grad():
            torch.testing.assert_close(candidate_scores(model, a), candidate_scores(model, b),
                                       rtol=1e-5, atol=1e-5)
