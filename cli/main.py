"""`edgezo` commands. They only parse options and wire library calls; user errors become
one clear line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgezo.config.options import FIELDS, SECTION_OF
from edgezo.config.rules import resume_problem
from edgezo.errors import EdgezoError, RunInterrupted, check_writable_folder
from edgezo.models.catalog import DEFAULT_MODEL

# cli/ installs as edgezo.cli (pyproject.toml's package-dir), so its own modules are named
# relatively: the import reads the same in the source tree and in site-packages.
from .app import app, err_console, profiles_app, user_errors
from .options import build_config, cli_fields, config_command
from .talk import chat, evaluate

ConfigOpt = typer.Option(None, "--config", help="A run recipe (YAML, or a run.json); "
                         "options given on the command line override it")
FINETUNE_EXTRA = {
    "config": (str | None, ConfigOpt),
    "print_config": (bool, typer.Option(False, "--print-config", help="Print the complete "
                                        "configuration (with --config and the options "
                                        "given) as a commented recipe file, and exit")),
    "resume": (Path | None, typer.Option(None, "--resume", help="Continue the run in this "
                                         "--output folder from its last snapshot and seed log "
                                         "(its settings are kept; --steps sets where it "
                                         "stops)")),
}


@app.command()
@user_errors
@config_command(cli_fields(), FINETUNE_EXTRA)
def finetune(ctx: typer.Context, given: dict, config: str | None, print_config: bool,
             resume: Path | None) -> None:
    """Fine-tune a model on a task with ZO under a device profile's memory budget."""
    from edgezo.run.session import Session
    from edgezo.run.train import finetune as run

    if resume is not None:
        problem = resume_problem([*given, *(["config"] if config else [])])
        if problem:
            raise EdgezoError(problem)
        check_writable_folder(resume, "--resume")
        train = {k: v for k, v in given.items() if SECTION_OF[k] == "train"}
        session = Session.resume(resume, **{k: v for k, v in given.items() if k not in train})
        train["output"] = str(resume)
    else:
        cfg = build_config(given, config)
        if print_config:
            print(cfg.to_yaml())
            return
        if cfg.train.output is not None:  # before the data and the model load, not after
            check_writable_folder(cfg.train.output, "--output")
        session, train = Session(cfg), {}
    try:
        report = run(session, **train)
    finally:
        session.close()
    if report.get("interrupted"):
        raise RunInterrupted  # the run said where it stopped


app.command("eval")(evaluate)
app.command()(chat)


PLAN_FIELDS = ("model", "dtype", "quantize", "trust_remote_code", "batch_size",
               "eval_batch_size", "max_length", "optimizer", "pair", "block_wise", "sparsity",
               "fo_blocks", "offload", "stream_layers", "stream_masters", "profile",
               *cli_fields(("scheme",)))


@app.command()
@user_errors
@config_command(cli_fields(names=PLAN_FIELDS), {
    "config": (str | None, ConfigOpt),
    "seq_len": (int | None, typer.Option(None, min=1, help="Tokens per example (default: "
                                         "--max-length)")),
    "as_json": (bool, typer.Option(False, "--json", help="Print the plan as JSON")),
})
def plan(ctx: typer.Context, given: dict, config: str | None, seq_len: int | None,
         as_json: bool) -> None:
    """Predict a run's peak memory from the model's config alone, before any download."""
    from edgezo.memory.planner import Shapes, plan_run
    from edgezo.zo.batch import Shape

    cfg = build_config(given, config).validate()
    width = seq_len or cfg.resolved("bf16").data.max_length
    result = plan_run(cfg, Shapes(Shape(cfg.data.batch_size, width),
                                  Shape(cfg.data.eval_batch_size, width)))
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        Console().print(_plan_table(result, seq_len is not None))
    if not result.plan.fits:
        raise typer.Exit(1)


def _plan_table(result, seq_len_given: bool = True) -> Table:
    from edgezo.memory.peak import peak_summary

    gib = 1024**3
    p = result.plan
    name = result.config.model.model or DEFAULT_MODEL
    # finetune prints the peak of the tensors alone (what it measures); the total adds
    # the CUDA context, which an emulating CPU counts but has not got
    table = Table("component", "GiB", title=f"edgezo plan: {escape(name)} on {p.profile}",
                  caption=escape(f"predicted peak {peak_summary(p)}"),
                  show_footer=False)
    evals = p.eval_components or {}
    for name, size in p.components.items():
        ev = f" (eval {evals[name] / gib:.3f})" if evals.get(name, size) != size else ""
        table.add_row(name.replace("_", " "), f"{size / gib:.3f}{ev}")
    if evals:
        table.add_row("peak by phase", ", ".join(f"{k} {v / gib:.3f}"
                                                 for k, v in p.phases.items()))
    table.add_row("tensors' peak", f"{p.peak_bytes / gib:.3f} (finetune's 'predicted "
                  "peak', what it measures)")
    if p.runtime_overhead_bytes:
        where = ("; not measured on this CPU, which emulates the profile" if p.emulated
                 else "")
        table.add_row("runtime (CUDA context)", f"{p.runtime_overhead_bytes / gib:.3f} "
                      f"(counted on a GPU profile{where})")
    verdict = "[green]fits[/]" if p.fits else "[red]does not fit[/]"
    table.add_row("[bold]total[/]", f"[bold]{p.total_bytes / gib:.3f}[/] of "
                  f"{p.budget_bytes / gib:.3f} budget: {verdict}")
    table.add_row("tokens per example", f"{p.seq_len} (--seq-len)" if seq_len_given else
                  f"{p.seq_len} (--max-length; finetune measures its task's longest rows, "
                  "often far fewer tokens: --seq-len N prices those)")
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
                            "(a plain transformers model), gguf (one file for llama.cpp), "
                            "onnx (an fp32 graph for onnxruntime) or seedlog (settings + "
                            "seed log, for edgezo replay)"),
    output: Path = typer.Option(..., "--output", help="Folder to write"),
    gguf_type: str | None = typer.Option(
        None, "--gguf-type", help="gguf: f16, bf16, f32, q8_0, q5_1, q5_0, q4_1 or q4_0 "
        "(default: the base GGUF's own types, q4_1 for SmolLM2; else f16)"),
) -> None:
    """Write a fine-tuned run as a PEFT adapter, a merged transformers model, a GGUF file
    or an ONNX graph."""
    from edgezo.export.run import export_run

    started = time.perf_counter()
    out = export_run(run_dir, fmt, output, gguf_type=gguf_type,
                     progress=lambda line: print(line, flush=True))
    print(f"wrote {fmt} export of {run_dir} to {out} in "
          f"{time.perf_counter() - started:.1f} s")


@app.command()
@user_errors
def replay(
    run_dir: Path = typer.Argument(..., help="A finetune --output folder or a seedlog export"),
    output: Path = typer.Option(..., "--output", help="Folder for the rebuilt model"),
) -> None:
    """Rebuild a run's weights from the base model and its seed log alone."""
    from edgezo.run.session import Session

    check_writable_folder(output, "--output")  # before the replay, not after it
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
    from edgezo.zo.methods import OPTIMIZERS
    from edgezo.zo.optimizers import RULES

    table = Table("name", "gradient", "state bytes/param", "forwards/step (pair)",
                  "update")
    for name, m in OPTIMIZERS.items():
        rule = RULES[m.rule]
        state = ("4 per matrix row" if rule.state_bytes([(2, 2)]) == 8
                 else str(rule.state_bytes_per_param))
        n = m.forwards_per_step(q=m.q, one_sided=m.estimate == "one-sided", pair=True)
        forwards = (f"{n} + backward" if m.backprops else f"{n} (jvp)"
                    if m.forward_gradient else f"{n}")
        table.add_row(name, m.estimator, state, forwards, m.description)
    Console().print(table)


@profiles_app.command("list")
@user_errors
def profiles_list() -> None:
    """The shipped device profiles."""
    from edgezo.device.profiles import list_profiles, load_profile

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
    from edgezo.device.profiles import load_profile, profile_path

    p = load_profile(name)
    print(profile_path(name).read_text().rstrip())
    print(f"# budget for a run: {p.budget_bytes / 1024**3:.2f} GiB "
          f"(device memory less {p.headroom:.0%} headroom)")


@app.command()
@user_errors
def bench(
    suite: str = typer.Option(..., "--suite", help="smoke, cpu-standard, paper, or your "
                              "own suite .yaml"),
    output: Path | None = typer.Option(None, "--output", "--results", help="Results folder "
                                       "(default: results/<suite>)"),
    db: Path | None = typer.Option(None, help="SQLite file of the runs (default: "
                                   "<output>/runs.db); re-running resumes from it"),
    shard: str = typer.Option("0/1", help="Run only shard i of n (i/n); merge shards' "
                              "databases with --merge"),
    merge: str | None = typer.Option(None, help="Databases of other shards to merge in "
                                     "first, comma-separated"),
    max_runs: int | None = typer.Option(None, min=0, help="Stop after this many new runs"),
    tables_only: bool = typer.Option(False, "--tables-only", help="Write the tables and "
                                     "plots from the database without running"),
    data_dir: Path | None = typer.Option(None, "--data-dir",
                                         help=FIELDS["data_dir"].metadata["help"]),
) -> None:
    """Run a benchmark suite (resumable, shardable) and write its tables and plots."""
    from edgezo.bench.store import Store
    from edgezo.bench.suite import load_suite
    from edgezo.bench.tables import write_results

    if tables_only and (max_runs is not None or shard != "0/1"):
        raise EdgezoError("--tables-only runs nothing: drop --max-runs and --shard")
    spec = load_suite(suite)
    folder = output or Path("results") / spec.name
    store = Store(db or folder / "runs.db")
    try:
        for other in [m.strip() for m in (merge or "").split(",") if m.strip()]:
            print(f"merged {store.merge(other)} runs from {other}")
        if not tables_only:
            _bench_shard(spec, store, shard, max_runs, data_dir)
        order = {"optimizers": [o for c in spec.cells for o in c["optimizers"]],
                 "schemes": [s for c in spec.cells for s in c["schemes"]]}
        paths = write_results(store.rows(spec.name), folder, order)
    finally:
        store.close()
    print(paths["tables"].read_text().split("\n**Validation")[0])
    print("wrote " + ", ".join(str(p) for p in paths.values()))


def _bench_shard(spec, store, shard: str, max_runs: int | None, data_dir: Path | None) -> None:
    from edgezo.bench.runner import run_suite

    try:
        i, n = (int(x) for x in shard.split("/"))
    except ValueError:
        raise EdgezoError(f"--shard must look like 0/4, got {shard!r}") from None

    def progress(k: int, total: int, row: dict) -> None:
        result = (f"val {row['val_accuracy']:.3f} test {row['test_accuracy']:.3f} "
                  f"peak {row['peak_bytes'] / 2**20:.0f} MiB step {row['step_s']:.2f} s"
                  if row["status"] == "ok" else f"failed: {row['error']}")
        print(f"[{k}/{total}] {row['grp']} {row['cell']} lr={row['lr']:g}: {result}",
              flush=True)

    ran, stored = run_suite(spec, store, shard=(i, n), max_runs=max_runs,
                            data_dir=None if data_dir is None else str(data_dir),
                            on_run=progress)
    print(f"{ran} runs now, {stored} already stored (shard {i}/{n})")



def main() -> None:
    try:
        app()
    except EdgezoError as err:  # raised outside a command body
        err_console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
