"""The embedding API on a tiny model folder."""

import json
import time

import pytest
import torch
from conftest import on_device_of
from step_checks import assert_step_applied, trainable
from transformers import AutoModelForCausalLM

from edgezo.errors import ConfigError
from edgezo.run.session import OutOfBudgetError, Session
from edgezo.tasks.loss import example_losses


@pytest.fixture()
def session(tiny_folder, data_dir):
    sess = Session(model=tiny_folder, profile="8gb-gpu", lr=1e-2, batch_size=4,
                   data_dir=data_dir, seed=0)
    yield sess
    sess.close()


def test_emulates_a_gpu_profile_without_cuda(session):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert session.emulated and session.device.type == "cpu"
    assert session.plan.emulated and session.plan.fits


def test_step_evaluate_report(session):
    before = trainable(session.engine)
    r = session.step()
    assert r.seed and r.lr == session.lr
    assert_step_applied(session.engine, before, r)  # its seed, g and lr moved the weights
    acc = session.evaluate("validation", max_examples=16)
    examples = session.task.split("validation")[:16]
    hits = [p == ex.gold for p, ex in zip(session.predict(examples), examples, strict=True)]
    assert acc["examples"] == 16 and acc["accuracy"] == sum(hits) / 16
    rep = session.report()
    for key in ("model", "task", "optimizer", "scheme", "profile", "steps", "seed",
                "hyperparameters", "peak_memory_bytes", "predicted_peak_memory_bytes",
                "step_time_s", "forward_passes_per_step", "device"):
        assert key in rep
    assert rep["steps"] == 1 and rep["forward_passes_per_step"] == 1


def test_model_property_reflects_every_completed_step(session):
    before = {n: p.detach().clone() for n, p in session.model.named_parameters()}
    session.step()
    moved = [not torch.equal(p, before[n]) for n, p in session.model.named_parameters()]
    assert all(moved)


def test_step_on_a_user_batch(session):
    ids = session.tokenizer(["a great film", "a very boring movie"], return_tensors="pt",
                            padding=True)
    labels = ids.input_ids.clone()
    labels[ids.attention_mask == 0] = -100
    batch = {"input_ids": ids.input_ids, "attention_mask": ids.attention_mask,
             "labels": labels}
    with torch.no_grad():
        loss = example_losses(session.model, on_device_of(session.model, batch)).mean()
    before = trainable(session.engine)
    r = session.step(batch)
    # r.loss is (L(θ + εz) + L(θ − εz))/2: L(θ) of this batch, plus ε²·zᵀHz/2 (measured
    # 0.008 in bf16, 0.016 in fp32)
    assert r.loss == pytest.approx(loss.item(), abs=0.05)
    assert_step_applied(session.engine, before, r)
    with pytest.raises(ConfigError, match="labels"):
        session.step({"input_ids": ids.input_ids})


def test_save_writes_a_model_transformers_loads(session, tmp_path):
    session.step()
    out = session.save(tmp_path / "saved")
    loaded = AutoModelForCausalLM.from_pretrained(out)
    pairs = zip(session.model.named_parameters(), loaded.named_parameters(), strict=True)
    for (n, p), (_, q) in pairs:
        assert torch.equal(p.cpu(), q), n
    assert json.loads((out / "report.json").read_text())["steps"] == 1


def test_over_budget_refuses_with_advice(tiny_folder, data_dir, tmp_path, monkeypatch):
    profile = tmp_path / "tiny.yaml"
    profile.write_text("name: tiny\ndevice: cpu\ndevice_memory_gb: 0.0001\nhost_memory_gb: 1\n"
                       "host_device_bandwidth_gbps: 0\ndtype: fp32\nheadroom: 0.1\n")
    loads = []
    monkeypatch.setattr("edgezo.run.build.load_weights", lambda *a, **k: loads.append(a))
    with pytest.raises(OutOfBudgetError, match="What would fit: .*--scheme lora -> "
                       ".*MiB .still too big.*--profile cpu-16gb -> "):
        Session(model=tiny_folder, profile=str(profile), data_dir=data_dir)
    assert not loads  # refused from the config, before any weight was loaded


@pytest.mark.parametrize("kwargs, needle", [
    ({"scheme": "adapter"}, "valid schemes: full, head, lora, prefix, prompt"),
    ({"lora_r": 4}, "lora_r applies to the lora scheme, not full"),
    ({"scheme": "lora", "prompt_tokens": 4}, "prompt_tokens applies to the prompt scheme"),
    ({"scheme": "lora", "lora_targets": ["nonexistent_proj"]}, "LoRA cannot target"),
    ({"optimizer": "adamw"}, "valid optimizers: fo-adam"),
    ({"momentum": 0.5}, "zo-sgd has no momentum option; it applies to zo-sgd-mmt"),
    ({"optimizer": "zo-adam", "momentum": 0.5}, "zo-adam has no momentum"),
    ({"optimizer": "zo-sgd-mmt", "betas": (0.9, 0.99)}, "has no betas option"),
    ({"optimizer": "zo-sgd-cons", "weight_decay": 0.1}, "takes no weight_decay"),
    ({"optimizer": "fo-adam", "q": 4}, "q does not apply to fo-adam"),
    ({"optimizer": "fo-sgd", "sparsity": 0.5}, "sparsity does not apply"),
    ({"optimizer": "forward-grad", "estimate": "one-sided"}, "estimate does not apply"),
    ({"optimizer": "fo-adam", "objective": "accuracy"}, "needs a ZO optimizer"),
    ({"objective": "bleu"}, "valid objectives: accuracy, ce, f1"),
    ({"q": 0}, "q must be >= 1"),
    ({"estimate": "central"}, "valid estimates: one-sided, two-sided"),
    ({"directions": "uniform"},
     "valid directions: coordinate, gaussian, lowrank, rademacher, subspace"),
    ({"sparsity": 1.0}, "sparsity must be < 1, got 1.0"),
    ({"sparsity": 0.5, "sparsity_mask": "topk"}, "valid sparsity masks: magnitude, random"),
    ({"block_wise": True, "granularity": "row"}, "valid block granularities: half, layer"),
    ({"fo_blocks": ["neck"]}, "unknown FO block 'neck'"),
    ({"fo_blocks": [7]}, "FO block 7 is out of range: the model has 2 layers"),
    ({"fo_blocks": ["pre", "0", "1", "head"]}, "nothing is left for ZO"),
    ({"schedule": "constant", "total_steps": 10}, "constant schedule has no such point"),
    ({"optimizer": "fo-adam", "eps": 1e-3}, "eps does not apply to fo-adam"),
    ({"optimizer": "forward-grad", "eps": 1e-3}, "eps does not apply to forward-grad"),
    ({"estimate": "one-sided", "pair": True}, "one-sided estimate has no L"),
    ({"save_model": False}, "--save-model set what goes into a run folder; add --output"),
    ({"eval_every": 5, "checkpoint_every": 5}, "--checkpoint-every set what goes"),
    ({"lr": float("inf")}, "lr must be a finite number"),
    ({"lr": float("nan")}, "lr must be a finite number"),
    ({"dtype": "int4"}, "unknown dtype 'int4'"),
    ({"momentum": 1.0, "optimizer": "zo-sgd-mmt"}, "momentum must be < 1"),
    ({"optimizer": "fo-sgd", "distributed": True}, "data-parallel training runs ZO"),
    ({"granularity": "half"}, "add --block-wise"),
    ({"sparsity_mask": "magnitude"}, "set --sparsity S"),
    ({"sparsity_every": 10}, "set --sparsity S"),
    ({"optimizer": "fo-sgd", "pair": True}, "makes no such pair"),
    ({"optimizer": "forward-grad", "pair": False}, "makes no such pair"),
    ({"schedule": "step", "total_steps": 3}, "valid lr schedules"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"eps": 0.0}, "eps must be > 0"),
])
def test_bad_options_are_rejected(tiny_folder, data_dir, kwargs, needle):
    from edgezo.errors import EdgezoError

    with pytest.raises(EdgezoError, match=needle):
        Session(model=tiny_folder, data_dir=data_dir, **kwargs)


def test_a_session_without_a_task_trains_on_given_batches(tiny_folder):
    sess = Session(model=tiny_folder, task=None, lr=1e-2)
    try:
        enc = sess.tokenizer(["a great film"], return_tensors="pt")
        batch = {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask,
                 "labels": enc.input_ids}
        with torch.no_grad():
            loss = example_losses(sess.model, on_device_of(sess.model, batch)).mean()
        before = trainable(sess.engine)
        r = sess.step(batch)
        assert r.loss == pytest.approx(loss.item(), abs=0.05)  # L(θ) + ε²·zᵀHz/2
        assert_step_applied(sess.engine, before, r)
        with pytest.raises(ConfigError, match="no task"):
            sess.evaluate()
    finally:
        sess.close()


def test_the_guard_stops_an_over_budget_run_and_keeps_the_model(tiny_folder, data_dir,
                                                               tmp_path, monkeypatch):
    """A step whose measured memory crosses the budget ends the run with a clear error,
    after the model and the report are written. On the CPU the measured peak crosses it
    after the step; on a GPU the capped allocator refuses the step itself."""
    from edgezo.run.train import finetune

    task = tmp_path / "small.jsonl"  # a 30-row task keeps the evaluations short
    task.write_text("\n".join(json.dumps({"input": f"a great film {i}", "label": i % 2,
                                          "candidates": [" terrible", " great"]})
                              for i in range(30)))
    sess = Session(model=tiny_folder, task=str(task), batch_size=4, lr=0.05)
    real_step = sess.engine.step
    calls = []

    def step(batch, lr):
        calls.append(1)
        if len(calls) == 3 and sess.on_cuda:
            raise torch.cuda.OutOfMemoryError("the cap")
        if len(calls) == 3:  # the third step "uses" twice the budget
            sess.monitor.peaks["train"] = 2 * sess.profile.budget_bytes
        return real_step(batch, lr)

    monkeypatch.setattr(sess.engine, "step", step)
    out = tmp_path / "run"
    kept = 2 if sess.on_cuda else 3  # the refused step never ran; the measured one did
    message = ("step 3 ran out of device memory under profile 8gb-gpu" if sess.on_cuda
               else "step 3 used .* over profile 8gb-gpu")
    try:
        with pytest.raises(OutOfBudgetError, match=message):
            finetune(sess, 10, output=out)
    finally:
        sess.close()
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == kept and report["stopped"].startswith("over budget")
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "model")  # the checkpoint is intact
    from edgezo.run.snapshots import snapshots

    assert snapshots(out)[-1].name == f"step-{kept:08d}"  # and resumable from there


def test_the_ledger_prices_a_batch_bigger_than_the_plan_before_it_runs(tiny_folder, tmp_path):
    """An app's learn()/predict() may pass more or longer examples than the plan assumed:
    such a batch is priced first and refused when it cannot fit, with nothing changed."""
    from edgezo.tasks.base import Example

    def session(budget_bytes=None):
        profile = "cpu-16gb"
        if budget_bytes is not None:
            profile = str(tmp_path / "tight.yaml")
            (tmp_path / "tight.yaml").write_text(
                f"name: tight\ndevice: cpu\ndevice_memory_gb: {budget_bytes / 2**30}\n"
                "host_memory_gb: 1\nhost_device_bandwidth_gbps: 10\ndtype: fp32\n"
                "headroom: 0\n")
        return Session(tiny_folder, task=None, batch_size=2, max_length=16, profile=profile,
                       eval_batch_size=2, offload="off", dtype="fp32")

    probe = session()  # fp32 as the tight profile: on a CPU with native bf16, cpu-16gb
    # would plan bf16 and its table's bf16 twin
    need = max(probe.plan.phases.values())
    probe.close()
    s = session(need + 256 * 1024)  # the plan fits, with 256 KiB to spare
    ex = Example("a good film and a fine cast", (" bad", " good"), 1)
    s.learn([ex, ex])  # the planned shape: admitted without pricing
    before = {n: p.detach().clone() for n, p in s.model.named_parameters()}
    with pytest.raises(OutOfBudgetError, match="Pass fewer examples at once"):
        s.learn([ex] * 64)
    with pytest.raises(OutOfBudgetError, match="eval batch"):
        s.eval_batch_size = 64
        s.predict([ex] * 64)
    for n, p in s.model.named_parameters():
        assert torch.equal(p, before[n]), n
    s.eval_batch_size = 2
    assert len(s.predict([ex] * 5)) == 5  # still usable at the planned size
    s.close()


def test_cpu_monitor_returns_freed_heap_when_the_phase_changes_only(monkeypatch):
    """The CPU's counterpart of resetting CUDA's peak counters: eval must not count the
    heap the train steps freed, and a trim per step would fault every page back in."""
    from edgezo.memory import measure

    trims = []
    monkeypatch.setattr(measure, "release_freed_memory", lambda: trims.append(1))
    monitor = measure.MemoryMonitor("cpu")
    try:
        for phase in ("train", "train", "train", "eval", "eval", "train"):
            with monitor.phase(phase):
                pass
    finally:
        monitor.close()
    assert len(trims) == 3  # idle -> train, train -> eval, eval -> train
    assert set(monitor.peaks) == {"train", "eval"}


def test_cpu_monitor_returns_freed_heap_when_a_phase_goes_over_its_plan(monkeypatch):
    """glibc keeps freed heap resident after batches of changing shapes (an FO run on
    SQuAD read 1.3x its live bytes); above the phase's planned bytes the sampler
    trims, at most every TRIM_EVERY_S, and never below the plan or in an unplanned phase."""
    from edgezo.memory import measure

    trims = []
    monkeypatch.setattr(measure, "release_freed_memory", lambda: trims.append(1))
    monkeypatch.setattr(measure, "TRIM_EVERY_S", 60.0)
    resident = {"bytes": 100}
    monkeypatch.setattr(measure.MemoryMonitor, "current", lambda self: resident["bytes"])
    monitor = measure.MemoryMonitor("cpu", interval_s=0.001)
    monitor.limits = {"train": 150}
    try:
        with monitor.phase("eval"):  # no limit: never trimmed
            resident["bytes"] = 500
            time.sleep(0.05)
        with monitor.phase("train"):
            deadline = time.monotonic() + 5  # 500 > 150: one trim, then none within 60 s
            while monitor.trims == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.05)
        phase_changes = 2  # idle -> eval -> train
        assert len(trims) == phase_changes + 1 and monitor.trims == 1
    finally:
        monitor.close()
    monitor = measure.MemoryMonitor("cpu", interval_s=0.001)
    monitor.limits = {"train": 1000}
    trims.clear()
    try:
        with monitor.phase("train"):
            time.sleep(0.05)
    finally:
        monitor.close()
    assert len(trims) == 1 and monitor.trims == 0  # the phase change's only


def test_trims_that_free_little_come_less_often():
    from edgezo.memory.measure import TRIM_EVERY_S, TRIM_MAX_WAIT_S, next_trim_wait

    wait, waits = TRIM_EVERY_S, []
    for _ in range(8):  # 500 against a plan of 150; each trim frees 10
        wait = next_trim_wait(wait, 500, 490, 150)
        waits.append(wait)
    assert waits[0] == 2 * TRIM_EVERY_S and waits[-1] == TRIM_MAX_WAIT_S
    assert waits == sorted(waits)
    assert next_trim_wait(TRIM_MAX_WAIT_S, 500, 300, 150) == TRIM_EVERY_S  # freed 200


def test_an_empty_split_plans_no_evaluation_width(tiny_folder, data_dir):
    """A small user task can leave a split empty: planning must not fail on it."""
    from edgezo.tasks.shape import measure_shape
    from edgezo.zo.batch import Shape

    s = Session(tiny_folder, data_dir=data_dir, batch_size=2)
    try:
        assert measure_shape(s.task.split("validation"), s.encoder, 4).seq_len > 0
        assert measure_shape([], s.encoder, 4) == Shape(4, 0)
    finally:
        s.close()


def test_strict_memory_sets_the_heap_once_and_is_refused_where_it_cannot_work(
        tiny_folder, monkeypatch):
    from edgezo.device import heap

    calls = []
    monkeypatch.setattr(heap, "_mallopt", lambda p, v: calls.append((p, v)) or True)
    cpu = dict(task=None, check_budget=False, profile="cpu-16gb")  # the CPU's heap, also
    s = Session(tiny_folder, strict_memory=True, **cpu)  # where a GPU is visible
    assert calls == [(heap.M_MMAP_THRESHOLD, 256 << 10)]
    assert s.config.runtime.strict_memory and s.report()["hyperparameters"]["strict_memory"]
    s.close()
    Session(tiny_folder, **cpu).close()
    assert len(calls) == 1  # off unless asked
    monkeypatch.setattr(heap, "_mallopt", lambda p, v: False)  # not glibc
    with pytest.raises(ConfigError, match="needs glibc"):
        Session(tiny_folder, strict_memory=True, **cpu)


def test_strict_memory_hands_freed_activations_back_at_once():
    """Real glibc: after a 16 MiB block is freed (which raises the default threshold),
    blocks of 4 MiB come from the heap and stay resident when freed; strict, they go."""
    import subprocess
    import sys

    code = """
import ctypes, sys, psutil, torch
from edgezo.device.heap import strict_heap
if sys.argv[1] == "strict":
    assert strict_heap()
rss = lambda: psutil.Process().memory_info().rss
big = torch.ones(16 << 20, dtype=torch.uint8)
del big  # freed: glibc's default threshold rises to 16 MiB
keep = [torch.ones(1 << 20, dtype=torch.uint8)]
base = rss()
blocks = [torch.ones(4 << 20, dtype=torch.uint8) for _ in range(8)]
top = max(b.data_ptr() for b in blocks)
for _ in range(64):  # pin the heap's top above them: a block that lands higher (a free
    keep.append(torch.ones(1 << 16, dtype=torch.uint8))  # chunk lower down may take one)
    if keep[-1].data_ptr() > top:
        break
del blocks
print((rss() - base - sum(k.numel() for k in keep[1:])) >> 20)  # pins aside
"""
    held = {mode: int(subprocess.run([sys.executable, "-c", code, mode], check=True,
                                     capture_output=True, text=True).stdout)
            for mode in ("default", "strict")}
    assert held["strict"] <= 2 < held["default"]


@pytest.mark.slow
def test_strict_memory_keeps_a_backwards_small_tensors_out_of_later_large_ones():
    """Real glibc: freed blocks under the mmap threshold coalesce into heap chunks that
    serve later large requests before mmap is considered; with a live block pinning the
    heap's top, a large tensor freed there stays resident. At a 1 MiB threshold the
    384 KiB tensors a backward saves form such chunks; at the strict 256 KiB they are
    mapped themselves and leave none."""
    import subprocess
    import sys

    code = """
import ctypes, sys, psutil, torch
from edgezo.device.heap import M_MMAP_THRESHOLD, strict_heap
libc = ctypes.CDLL("libc.so.6")
if sys.argv[1] == "strict":
    assert strict_heap()
else:
    assert libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
rss = lambda: psutil.Process().memory_info().rss
saved = [torch.ones(384 << 10, dtype=torch.uint8) for _ in range(64)]  # 24 MiB
top = max(t.data_ptr() for t in saved)
pins = []
for _ in range(64):  # under both thresholds: pin the heap's top above them (a free chunk
    pins.append(torch.ones(200 << 10, dtype=torch.uint8))  # lower down may take one)
    if pins[-1].data_ptr() > top:
        break
del saved
libc.malloc_trim(0)  # the free chunks' pages go back, their address range stays
base = rss()
big = torch.ones(8 << 20, dtype=torch.uint8)
del big
print((rss() - base) >> 20)
"""
    held = {mode: int(subprocess.run([sys.executable, "-c", code, mode], check=True,
                                     capture_output=True, text=True).stdout)
            for mode in ("1mib", "strict")}
    assert held["strict"] <= 1 < 6 <= held["1mib"]


def test_cuda_monitor_keeps_allocated_and_reserved_peaks_per_phase(monkeypatch):
    """The CUDA path on a CPU machine, through a fake allocator: each phase resets the
    peaks and records allocated and reserved; the sampler reads the device the phases
    run on (the current device is per thread) and waits for the first phase, so it never
    initialises CUDA itself."""
    import time

    from edgezo.memory.measure import MemoryMonitor

    state = {"allocated": 0, "peak": 0, "reserved": 0, "devices": set()}

    def allocated(device=None):
        state["devices"].add(device)
        return state["allocated"]

    fake = {"synchronize": lambda device=None: None,
            "reset_peak_memory_stats": lambda device=None: state.update(peak=0, reserved=0),
            "max_memory_allocated": lambda device=None: state["peak"],
            "max_memory_reserved": lambda device=None: state["reserved"],
            "memory_allocated": allocated, "current_device": lambda: 3}
    for name, fn in fake.items():
        monkeypatch.setattr(torch.cuda, name, fn)
    monitor = MemoryMonitor(torch.device("cuda"), interval_s=0.001)
    time.sleep(0.02)
    assert state["devices"] == set()  # nothing read before a phase
    for name, peak, reserved in (("train", 100, 160), ("eval", 40, 64), ("train", 90, 200)):
        with monitor.phase(name):
            state.update(allocated=peak, peak=peak, reserved=reserved)
            time.sleep(0.3)
    monitor.close()
    assert monitor.peaks == {"train": 100, "eval": 40}
    assert monitor.reserved_peaks == {"train": 200, "eval": 64}
    assert state["devices"] == {3} and monitor.samples


def test_a_cuda_run_names_its_device_index_where_the_budget_cap_needs_one(monkeypatch):
    """On a GPU every profile run caps the allocator at the budget; torch's per-device
    calls refuse a bare torch.device("cuda") (found on an H200: every GPU-profile Session
    failed to start). Faked here: torch's own index check is what the fake cap applies."""
    from types import SimpleNamespace

    from torch.cuda._utils import _get_device_index

    from edgezo.device.profiles import load_profile
    from edgezo.run import build

    capped = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(
        total_memory=80 * 2**30, index=_get_device_index(d)))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                        lambda f, d=None: capped.update(fraction=f, index=_get_device_index(d)))
    profile = load_profile("8gb-gpu")
    device = build.compute_device(profile, strict_memory=False)
    assert device == torch.device("cuda", 0)
    config = SimpleNamespace(runtime=SimpleNamespace(check_budget=True))
    for d in (device, torch.device("cuda")):  # also a caller's bare device
        build.check_live_plan(config, SimpleNamespace(fits=True), profile, d)
        assert capped == {"fraction": profile.budget_bytes / (80 * 2**30), "index": 0}


def test_train_examples_reaches_the_task_and_the_report(tiny_folder, data_dir):
    """--train-examples is one config entry: the Session's task trains on that many rows
    and the report says so."""
    sess = Session(model=tiny_folder, data_dir=data_dir, train_examples=30, lr=1e-2)
    try:
        assert len(sess.task.split("train")) == 30  # of the fixture's 40
        assert sess.report()["splits"]["train"] == 30
        assert sess.config.data.train_examples == 30
    finally:
        sess.close()
