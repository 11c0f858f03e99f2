"""Command line: hessdiag run | status | validate | report | submit. Parses and calls; no logic here."""

from __future__ import annotations

import json
import sys
import traceback
from typing import List, Optional

import click
import typer
from rich.console import Console
from rich.table import Table

from pipeline.errors import BadInputError, HessdiagError, Interrupted
from pipeline.logs import import_tensorflow, quiet_start, verbose
from pipeline.ray_auth import use_available_token
from pipeline.stop_signals import install_stop_handlers, restore_handlers

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Exact gradients and Hessian diagonals of a Keras model's weight tensors.")
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)
SET_HELP = "override a config key, e.g. --set compute.shard_size=16 (repeatable)"
OPTIONS_HELP = "fsspec storage options as JSON, e.g. '{\"endpoint_url\": \"http://127.0.0.1:9000\"}'"
VERBOSE_HELP = "also print TensorFlow's and Ray's own log lines, and the traceback of an unexpected error (= HESSDIAG_DEBUG=1)"


def _storage_options(raw: Optional[str]) -> dict:
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise BadInputError(f"--storage-options is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise BadInputError("--storage-options must be a JSON object")
    return value


OUTCOME_CELLS = {"passed": "[green]yes", "unresolved": "[yellow]unresolved", "FAILED": "[red]NO"}


def _outcome_cell(check: dict) -> str:
    from pipeline.results import validation_outcome

    return OUTCOME_CELLS[validation_outcome(check)]


def _validation_table(validation: dict) -> Table:
    """One row per tensor: samples (unresolved ones noted), worst relative errors, whether it passed."""
    table = Table(title="validation against float64 references from loss values")
    for column in ("tensor", "reference", "samples", "max rel error (gradient)", "max rel error (diagonal)", "passed"):
        table.add_column(column)
    for name, result in (validation.get("tensors") or {}).items():
        kinks = result.get("nonsmooth_samples", 0)
        spot = result.get("spot_check")
        table.add_row(
            name, result.get("reference", ""),
            f"{result.get('samples')}" + (f" ({kinks} unresolved)" if kinks else "") + (f" + {spot['entries']} exact" if spot else ""),
            f"{result.get('max_rel_error_gradient', float('nan')):.2e}",
            f"{result.get('max_rel_error_hessian_diagonal', float('nan')):.2e}",
            _outcome_cell(result),
        )
    unresolved = validation.get("unresolved") or []
    outcome = "FAILED" if validation.get("failed") else ("passed" if validation.get("passed") else "")
    if unresolved:
        outcome = (f"{outcome}; " if outcome else "") + (
            f"{len(unresolved)} tensor(s) unresolved (most of their samples sit at kinks; not checked):"
            f" {', '.join(unresolved)}; `hessdiag validate STORE --samples N` samples more entries")
    table.caption = f"{validation.get('samples')} samples in all, rtol {validation.get('rtol')}: {outcome}"
    return table


def _gib(count: int | None) -> str:
    return "-" if count is None else f"{count / 2**30:.3g}"


def _dry_run(cfg) -> None:
    """Print the plan: each tensor's engine and predicted cost, the units, the predicted wall time for 1 to 64 workers."""
    from pipeline.coordinator import resolve_example_block
    from pipeline.job import Job
    from pipeline.plan import predicted_wall_seconds, unit_seconds
    from pipeline.progress import RunProgress

    job = Job.load(cfg)
    block, calibration = resolve_example_block(cfg, job, RunProgress.plain_log)
    calibration = calibration or job.calibrate()
    plan = job.plan(block)
    per_example, tracing = calibration["seconds_per_example"], calibration.get("tracing_seconds", {})
    compute = sum(unit_seconds(plan, unit, per_example) for unit in plan.units)
    console.print(f"plan: {job.model.name}, {len(plan.tensors)} tensor(s), {plan.entries:,} entries; {len(plan.units)} units"
                  f" of at most {plan.example_block} examples ({plan.examples} examples, batches of {cfg.data.batch_size});"
                  f" stored in shards of {plan.shard_size} channels")
    tensors = Table(title="tensors")
    batch = min(cfg.data.batch_size, plan.examples)
    for column in ("tensor", "shape", "entries", "engine", "why", "predicted compute s", "tracing s (per worker)",
                   "memory GiB (per call)"):
        tensors.add_column(column)
    for index, tensor in enumerate(plan.tensors):
        choice = job.curvature.choices[tensor.name]
        cost = "shared pass" if tensor.shared else f"{per_example[tensor.name] * plan.examples:,.1f}"
        traced = "shared pass" if tensor.shared else f"{tracing.get(tensor.name, float('nan')):,.1f}"
        memory = "shared pass" if tensor.shared else _gib(job.curvature.separate[tensor.name].predicted_bytes(batch))
        tensors.add_row(tensor.name, str(tensor.shape), f"{tensor.entries:,}", choice.name, choice.reason, cost, traced, memory)
    console.print(tensors)
    if plan.shared:
        console.print(f"shared pass ({len(plan.shared)} tensors, {job.curvature.shared.column_method}):"
                      f" {per_example['shared'] * plan.examples:,.1f} s predicted, {tracing.get('shared', float('nan')):,.1f} s"
                      f" of tracing per worker, {_gib(job.curvature.shared.predicted_bytes(batch))} GiB per batch")
    console.print(f"partial sums {max(plan.unit_result_bytes(u) for u in plan.units) / 2**20:.2f} MiB per unit in flight at most;"
                  f" calibration timed on {calibration['examples_timed']} example; predicted compute: {compute:,.0f} s in all")
    table = Table(title="predicted wall time (units and each worker's tracing; validation not included)")
    table.add_column("workers")
    table.add_column("wall seconds")
    table.add_column("speed-up")
    alone = predicted_wall_seconds(plan, per_example, 1, tracing)
    for workers in (1, 2, 4, 8, 16, 64):
        wall = predicted_wall_seconds(plan, per_example, workers, tracing)
        table.add_row(str(workers), f"{wall:,.0f}", f"{alone / wall:.2f}x" if wall else "-")
    console.print(table)


@app.command()
def run(
    config: str = typer.Argument(..., help="YAML config file"),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
    overwrite: bool = typer.Option(False, help="replace a store written for another config"),
    dry_run: bool = typer.Option(False, "--dry-run", help="check inputs and print the plan; write nothing"),
    verbose_: bool = typer.Option(False, "--verbose", help=VERBOSE_HELP),
):
    """Start or resume a run; exit 0 when complete and validated, 3 when validation failed, 2 on bad input."""
    quiet_start(verbose_)
    from pipeline.config import load_config

    cfg = load_config(config, set_)
    import_tensorflow()
    if dry_run:
        _dry_run(cfg)
        return
    from pipeline.coordinator import run as run_config

    result = run_config(cfg, overwrite=overwrite)
    engines = ", ".join(f"{e} x{list(result.engines.values()).count(e)}" for e in dict.fromkeys(result.engines.values()))
    console.print(
        f"result: {result.output}  {len(result.engines)} tensor(s), engines: {engines}  units computed: {len(result.computed)}, "
        f"skipped (already done): {len(result.skipped)}, retries: {result.retries}, {result.seconds:.1f} s"
    )
    console.print(_validation_table(result.validation))
    _print_advice(result.validation, result.engines, cfg.compute.precision)
    if result.failed:
        raise typer.Exit(3)


def _print_advice(validation: dict, engines: dict[str, str], precision: str) -> None:
    """The validation's advice, if any, for tensors whose engine names are ``engines``."""
    from pipeline.curvature.engines import ENGINES
    from pipeline.validate import precision_advice

    advice = precision_advice(validation, {name: ENGINES[engine] for name, engine in engines.items()}, precision)
    if advice:
        console.print(f"[yellow]hint[/yellow]: {advice}")


@app.command()
def status(
    store: str = typer.Argument(..., help="path or URL of a hessdiag store, or a Ray job id with --address"),
    as_json: bool = typer.Option(False, "--json", help="print JSON for scripts"),
    storage_options: Optional[str] = typer.Option(None, help=OPTIONS_HELP),
    address: Optional[str] = typer.Option(None, help="Ray dashboard address: STORE is then a job id from `submit`"),
    verbose_: bool = typer.Option(False, "--verbose", help=VERBOSE_HELP),
):
    """Units done/total, missing or corrupt shards, timing, engine, validation state."""
    quiet_start(verbose_)
    if address:
        from pipeline.submit import job_status

        job = job_status(store, address)
        if as_json:
            print(json.dumps(job, indent=2))
        else:
            console.print(f"job {job['job_id']}: {job['status']} {job['message'] or ''}")
            console.print("\n".join(job["log_tail"]))
        return
    from pipeline.status import store_status
    from pipeline.store import ResultStore

    info = store_status(ResultStore.open(store, _storage_options(storage_options), mode="r"))
    if as_json:
        print(json.dumps(info, indent=2))
        return
    state = "complete" if info["complete"] else ("running" if info["running"] else "incomplete")
    console.print(f"[bold]{info['store']}[/bold]: {state}, {info['units_done']}/{info['units_total']} units done"
                  f" (blocks of {info['example_block']} examples), {info['shards_done']}/{info['shards_total']} shards written")
    tensors = Table(title=f"{info['model']}: {len(info['tensors'])} tensor(s)")
    for column in ("tensor", "shape", "engine", "shards", "trace", "validated"):
        tensors.add_column(column)
    for tensor in info["tensors"]:
        checked = tensor["validation"]
        tensors.add_row(tensor["name"], str(tuple(tensor["shape"])), tensor["engine"] or "",
                        f"{tensor['shards_done']}/{tensor['shards_total']}", "" if tensor["trace"] is None else f"{tensor['trace']:.4e}",
                        "" if not checked.get("samples") else _outcome_cell(checked))
    console.print(tensors)
    if info["missing"] or info["corrupt"]:
        console.print(f"missing shards: {info['missing']}  corrupt shards: {info['corrupt']}")
    eta = f"{info['eta_seconds']:.0f} s" if info["eta_seconds"] is not None else "unknown"
    console.print(f"compute time {info['compute_seconds']:.1f} s, elapsed {info['elapsed_seconds']:.1f} s, remaining ~{eta}")
    validation = info["validation"]
    if validation.get("samples"):
        console.print(_validation_table(validation))
    else:
        console.print("validation: not run yet")


@app.command()
def validate(
    store: str = typer.Argument(..., help="path or URL of a hessdiag store"),
    samples: Optional[int] = typer.Option(None, help="entries to check (default: the config's validation.samples)"),
    storage_options: Optional[str] = typer.Option(None, help=OPTIONS_HELP),
    verbose_: bool = typer.Option(False, "--verbose", help=VERBOSE_HELP),
):
    """Re-check an existing store: chunk checksums, then sampled finite differences. Exit 3 on failure."""
    quiet_start(verbose_)
    import_tensorflow()
    from pipeline.config import parse_config
    from pipeline.job import Job
    from pipeline.store import ResultStore
    from pipeline.validate import validate_store

    options = _storage_options(storage_options)
    opened = ResultStore.open(store, options)
    job = Job.load(parse_config({**opened.attrs["config"], "output": store, "storage_options": options}))
    plan = opened.plan
    _, corrupt, missing = opened.verify(plan)
    if corrupt or missing:
        console.print(f"[red]store is incomplete or corrupt[/red]: missing shards {[s.name for s in missing]}, corrupt shards {[s.name for s in corrupt]}; rerun `hessdiag run` to recompute them")
        raise typer.Exit(3)
    result = validate_store(job, opened, plan, job.config.validation, samples)
    console.print(_validation_table(result))
    _print_advice(result, {name: choice.name for name, choice in job.curvature.choices.items()}, job.config.compute.precision)
    if result["failed"]:
        raise typer.Exit(3)


@app.command()
def report(
    store: str = typer.Argument(..., help="path or URL of a hessdiag store"),
    out: str = typer.Option("report", help="directory for the PNG plots and report.md"),
    storage_options: Optional[str] = typer.Option(None, help=OPTIONS_HELP),
    verbose_: bool = typer.Option(False, "--verbose", help=VERBOSE_HELP),
):
    """Plots (PNG) and a Markdown summary of a store."""
    quiet_start(verbose_)
    from pipeline.report import write_report
    from pipeline.store import ResultStore

    files = write_report(ResultStore.open(store, _storage_options(storage_options), mode="r"), out)
    for path in files:
        console.print(f"wrote {path}")


@app.command()
def submit(
    config: str = typer.Argument(..., help="YAML config file"),
    address: str = typer.Option(..., help="Ray dashboard address, e.g. http://HEAD:8265"),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
    follow: bool = typer.Option(False, help="stream the job's logs and exit with its status"),
    pip: bool = typer.Option(False, help="have Ray install the project's dependencies on the cluster (runtime_env pip)"),
    verbose_: bool = typer.Option(False, "--verbose", help=VERBOSE_HELP + "; the job runs verbose too"),
):
    """Submit `hessdiag run CONFIG` as a Ray job that ships this package and the config."""
    quiet_start(verbose_)
    from pipeline.submit import submit_job

    code = submit_job(config, address, set_, follow, print_=print, pip=pip)
    if code:
        raise typer.Exit(code)


def main(argv: Optional[list[str]] = None) -> None:
    """Console entry point: maps errors to exit codes (2 bad input, 3 validation failed, 1 other;
    SIGTERM 143 and Ctrl-C 130, wherever they land)."""
    saved_handlers = install_stop_handlers()
    try:
        _main(argv)
    finally:
        restore_handlers(saved_handlers)


def _main(argv: Optional[list[str]]) -> None:
    try:
        use_available_token()  # before Ray is imported: Ray reads its auth mode once
        code = app(args=argv, standalone_mode=False)
    except Interrupted as exc:
        print(exc, file=sys.stderr)
        sys.exit(exc.exit_code)
    except HessdiagError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(2)
    except click.exceptions.Abort:
        sys.exit(1)
    except Exception as exc:  # noqa: BLE001 - anything unexpected: one line, exit 1 (HESSDIAG_DEBUG=1 shows the traceback)
        if verbose():
            traceback.print_exc()
        first = (str(exc).strip().splitlines() or [""])[0][:500]
        print(f"error: {type(exc).__name__}: {first} (--verbose or HESSDIAG_DEBUG=1 shows the traceback)", file=sys.stderr)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
