"""The ``sparsek-remote`` command. The only module that prints or exits.

Exit codes, one per failure family (scripts can tell them apart):
0 ok, 1 internal error, 2 bad input (job file, .env, options), 3 bundle refused,
4 runner failed, 5 remote host error, 6 image error, 7 correctness gate failed.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from sparsek_remote import workflow
from sparsek_remote.errors import ConfigError, GateFailed, SparsekRemoteError
from sparsek_remote.jobspec import job_json_schema, load_job
from sparsek_remote.schema import Results, bundle_json_schemas
from sparsek_remote.settings import Settings, load_settings

EXAMPLES = """
Examples:

  sparsek-remote run jobs/local_smoke.yaml            # on this machine, no .env needed
  sparsek-remote run jobs/h100_gpt4.yaml --json       # machine-readable summary
  sparsek-remote report 20261125T101500Z-smoke-1a2b3c # markdown + PNG plots
  sparsek-remote report OLD_RUN NEW_RUN               # compare two runs, flag regressions
  sparsek-remote schema > job.schema.json             # JSON Schema for editors
"""

app = typer.Typer(
    help="Benchmark SparseK attention kernels on rented GPUs, locally or over SSH.\n" + EXAMPLES,
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
out = Console(highlight=False, soft_wrap=True)
if not out.is_terminal:
    out.width = max(out.width, 120)  # piped output: a log file, not an 80-column screen
err = Console(stderr=True, highlight=False, soft_wrap=True)


class _State:
    env_file: Path = Path(".env")
    debug: bool = False


state = _State()


@app.callback()
def _options(
    env_file: Annotated[Path, typer.Option(help="Where host settings are read from.")] = Path(
        ".env"),
    debug: Annotated[bool, typer.Option(help="Show tracebacks of internal errors.")] = False,
) -> None:
    state.env_file, state.debug = env_file, debug


@contextmanager
def _handled(as_json: bool = False) -> Iterator[None]:
    """Turn the library's errors into a message and the family's exit code."""
    try:
        yield
    except SparsekRemoteError as exc:
        _report_error(exc, as_json)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err.print("interrupted", markup=False)
        raise typer.Exit(130) from None


def _report_error(exc: SparsekRemoteError, as_json: bool) -> None:
    if as_json:
        payload = {"error": {"type": type(exc).__name__, "message": exc.message,
                             "hint": exc.hint, "exit_code": exc.exit_code}}
        out.print_json(data=payload)
    else:
        err.print(f"error: {exc}", markup=False)


def _settings() -> Settings:
    return load_settings(state.env_file)


@app.command(epilog="Exit code 7 means a case failed its correctness gate (stored, untimed).")
def run(
    job_file: Annotated[Path, typer.Argument(help="The job, e.g. jobs/local_smoke.yaml.")],
    target: Annotated[Optional[str], typer.Option(help="Host alias or 'local'.")] = None,  # noqa: UP045
    device: Annotated[Optional[str], typer.Option(help="auto, cuda or cpu.")] = None,  # noqa: UP045
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary.")] = False,
    report: Annotated[bool, typer.Option(help="Write the report after the run.")] = True,
) -> None:
    """Run a job: correctness gate, then timing, then a validated bundle in results/."""
    with _handled(as_json):
        if device not in (None, "auto", "cuda", "cpu"):
            raise ConfigError(f"--device must be auto, cuda or cpu, not {device!r}")
        settings = _settings()
        job = load_job(job_file)
        with _progress(disabled=as_json) as on_event:
            outcome = workflow.run_job(job, settings, project_root=Path.cwd(), target=target,
                                       on_event=on_event, with_report=report, device=device)
        _print_outcome(outcome, as_json)
        if outcome.gate_failures:
            raise GateFailed(outcome.gate_failures)


@app.command()
def report(
    runs: Annotated[list[str], typer.Argument(help="Run ids (or run folders); two compare.")],
    baseline: Annotated[Optional[str], typer.Option(help="Implementation to compare against.")] = None,  # noqa: E501, UP045
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Where to write.")] = None,  # noqa: UP045
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary.")] = False,
) -> None:
    """Write a markdown summary and PNG plots for stored runs; two runs are compared."""
    with _handled(as_json):
        written = workflow.make_report(runs, _settings(), baseline=baseline, out_dir=out_dir)
        regressions = [vars(c) for c in written.regressions]
        if as_json:
            out.print_json(data={"report": str(written.markdown_path),
                                 "plots": [str(p) for p in written.plot_paths],
                                 "regressions": regressions})
            return
        out.print(f"report: {written.markdown_path}", markup=False)
        for plot in written.plot_paths:
            out.print(f"plot:   {plot}", markup=False)
        for change in written.regressions:
            out.print(f"regression: {change.case}/{change.implementation} "
                      f"{change.old_ms:.4g} ms -> {change.new_ms:.4g} ms "
                      f"({change.change:+.1%}, noise {change.noise:.1%})", markup=False)


@app.command()
def schema(
    bundle: Annotated[bool, typer.Option(help="Print the bundle's schemas instead.")] = False,
) -> None:
    """Print the JSON Schema of job files (or of result bundles)."""
    data = bundle_json_schemas() if bundle else job_json_schema()
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


@app.command()
def hosts(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List the hosts configured in .env (secrets are never shown)."""
    with _handled(as_json):
        settings = _settings()
        rows = {alias: h.public_view() for alias, h in sorted(settings.hosts.items())}
        if as_json:
            out.print_json(data={"default_target": settings.default_target, "hosts": rows})
            return
        table = Table("alias", "user", "port", "key", "passphrase", "host key", "kind")
        table.add_row("local", "-", "-", "-", "-", "-", "this machine")
        for alias, view in rows.items():
            table.add_row(alias, *(str(view[k]) for k in (
                "user", "port", "key_path", "key_passphrase", "host_key_fingerprint", "kind")))
        out.print(table)
        out.print(f"default target: {settings.default_target}", markup=False)


@contextmanager
def _progress(disabled: bool) -> Iterator[Callable[[dict[str, Any]], None]]:
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=err, disable=disabled, transient=True)
    task = progress.add_task("starting the runner", total=None)

    def on_event(event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "start":
            progress.update(task, total=int(event.get("total", 0)), description="running")
        elif kind == "case_start":
            progress.update(task, description=f"{event.get('case')} / "
                            f"{event.get('implementation')}")
        elif kind == "case_done":
            progress.advance(task)

    with progress:
        yield on_event


def _print_outcome(outcome: workflow.RunOutcome, as_json: bool) -> None:
    if as_json:
        out.print_json(data={
            "run_id": outcome.run_id, "target": outcome.target,
            "bundle": str(outcome.bundle_path),
            "report": str(outcome.report.markdown_path) if outcome.report else None,
            "gate_failures": outcome.gate_failures,
            "results": json.loads(outcome.results.model_dump_json())["results"]})
        return
    out.print(_summary_table(outcome.results))
    out.print(f"run {outcome.run_id} on {outcome.target}: bundle {outcome.bundle_path}",
              markup=False)
    if outcome.report:
        out.print(f"report: {outcome.report.markdown_path}", markup=False)


def _summary_table(results: Results) -> Table:
    table = Table(title="results", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    table.add_column("case", no_wrap=True)
    table.add_column("implementation", no_wrap=True)
    for heading in ("status", "rel.err", "median ms", "IQR ms", "TFLOP/s", "GB/s"):
        table.add_column(heading, justify="right")
    for r in results.results:
        gate = f"{r.gate.rel_error:.1e}" if r.gate and r.gate.rel_error is not None else "-"
        stats = r.timing.stats if r.timing else None
        table.add_row(
            r.case, r.implementation, r.status, gate,
            f"{stats.median_ms:.4g}" if stats else "-", f"{stats.iqr_ms:.2g}" if stats else "-",
            f"{r.tflops:.3g}" if r.tflops is not None else "-",
            f"{r.gbps:.3g}" if r.gbps is not None else "-")
    return table


def main() -> None:
    """Console-script entry point; internal errors become exit code 1."""
    try:
        app()
    except SystemExit:
        raise
    except Exception as exc:  # anything not already a SparsekRemoteError is our bug
        if state.debug:
            raise
        err.print(f"internal error: {type(exc).__name__}: {exc}\n"
                  "  hint: rerun with --debug for the traceback, and report it", markup=False)
        sys.exit(1)
