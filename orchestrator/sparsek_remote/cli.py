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
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from sparsek_remote import workflow
from sparsek_remote.errors import (
    ConfigError,
    GateFailed,
    ImageError,
    RemoteError,
    SparsekRemoteError,
)
from sparsek_remote.jobspec import LOCAL_TARGET, JobSpec, job_json_schema, load_job
from sparsek_remote.schema import Results, bundle_json_schemas
from sparsek_remote.settings import Settings, load_settings

EXAMPLES = """
Examples:

\b
  sparsek-remote run jobs/local_smoke.yaml            # on this machine, no .env needed
  sparsek-remote run jobs/h100_gpt4.yaml --json       # machine-readable summary
  sparsek-remote deploy                               # build, ship, preflight every host
  sparsek-remote run jobs/h100_gpt4.yaml --target lab # detached on a host in .env
  sparsek-remote fetch                                # collect and verify host bundles
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


@app.command(epilog="Exit code 7 means a case failed its correctness gate (stored, untimed); "
             "5 that a host failed (the message lists which failed and which did not).")
def run(
    job_file: Annotated[Optional[Path], typer.Argument(  # noqa: UP045
        help="The job, e.g. jobs/local_smoke.yaml.")] = None,
    target: Annotated[Optional[str], typer.Option(help="Host alias or 'local'.")] = None,  # noqa: UP045
    device: Annotated[Optional[str], typer.Option(help="auto, cuda or cpu.")] = None,  # noqa: UP045
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary.")] = False,
    report: Annotated[bool, typer.Option(help="Write the report after the run.")] = True,
    resume: Annotated[Optional[str], typer.Option(  # noqa: UP045
        metavar="RUN", help="Re-attach to a run on hosts: follow it, then fetch.")] = None,
    trust_new_host_key: Annotated[bool, typer.Option(
        "--trust-new-host-key",
        help="Record the key of a host never seen before (compare its fingerprint first).")
    ] = False,
    detach: Annotated[bool, typer.Option(
        "--detach", help="On hosts: start the jobs and return; `fetch` collects them.")
    ] = False,
    clear_stale_lock: Annotated[bool, typer.Option(
        "--clear-stale-lock", help="Remove a host's lock left by a job whose process is gone.")
    ] = False,
    wheels: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        help="Wheels for bare hosts (default: built from this checkout).")] = None,
    log: Annotated[bool, typer.Option(help="On hosts: show the runner's log live.")] = True,
) -> None:
    """Run a job: correctness gate, then timing, then a validated bundle in results/.

    On hosts the job runs detached: a dropped link does not stop it, `run --resume RUN`
    re-attaches, `fetch` collects. Ctrl-C asks whether to cancel the remote jobs."""
    with _handled(as_json):
        if device not in (None, "auto", "cuda", "cpu"):
            raise ConfigError(f"--device must be auto, cuda or cpu, not {device!r}")
        settings = _settings()
        options = _RemoteOptions(as_json, report, trust_new_host_key, detach,
                                 clear_stale_lock, wheels, log)
        if resume is not None:
            if job_file is not None:
                raise ConfigError("give either a job file or --resume RUN, not both")
            _resume_remote(resume, settings, options)
            return
        if job_file is None:
            raise ConfigError("no job file given", hint="sparsek-remote run JOB_FILE "
                              "(or --resume RUN to re-attach to a run on hosts)")
        job = load_job(job_file)
        targets = workflow.resolve_targets(job, settings, target)
        if targets != [LOCAL_TARGET]:
            _run_remote(job, settings, targets, device, options)
            return
        with _progress(disabled=as_json) as on_event:
            outcome = workflow.run_job(job, settings, project_root=Path.cwd(), target=target,
                                       on_event=on_event, with_report=report, device=device)
        _print_outcome(outcome, as_json)
        if outcome.gate_failures:
            raise GateFailed(outcome.gate_failures)


# --- runs on hosts: run (remote part), fetch, trust -----------------------------------


@dataclass(frozen=True)
class _RemoteOptions:
    as_json: bool
    report: bool
    trust_new_host_key: bool
    detach: bool
    clear_stale_lock: bool
    wheels: Path | None
    log: bool


def _run_remote(job: JobSpec, settings: Settings, targets: list[str], device: str | None,
                options: _RemoteOptions) -> None:
    with _host_progress(disabled=options.as_json, show_log=options.log) as on_event:
        outcome = workflow.run_on_hosts(
            job, settings, targets=targets, project_root=Path.cwd(), on_event=on_event,
            device=device, trust_new_host_key=options.trust_new_host_key,
            clear_stale_lock=options.clear_stale_lock, detach=options.detach,
            wheels_dir=options.wheels, docker_runner=workflow.docker_runner(settings),
            with_report=options.report)
    _conclude_remote(outcome, settings, options.as_json)


def _resume_remote(run_id: str, settings: Settings, options: _RemoteOptions) -> None:
    with _host_progress(disabled=options.as_json, show_log=options.log) as on_event:
        outcome = workflow.resume_run(run_id, settings, on_event=on_event,
                                      trust_new_host_key=options.trust_new_host_key,
                                      with_report=options.report)
    _conclude_remote(outcome, settings, options.as_json)


def _conclude_remote(outcome: workflow.RemoteOutcome, settings: Settings,
                     as_json: bool) -> None:
    """Print what happened on each host, then exit with the family's code."""
    for alias, fingerprint in outcome.recorded_keys.items():
        err.print(f"recorded the host key of {alias}: {fingerprint}", markup=False)
    if outcome.interrupted:
        _offer_cancel(outcome, settings, as_json)
    error = outcome.error()
    _print_remote(outcome, as_json, error)
    if error is not None:
        if as_json:
            raise typer.Exit(error.exit_code)
        raise error
    if outcome.gate_failures:
        raise GateFailed(outcome.gate_failures)


def _offer_cancel(outcome: workflow.RemoteOutcome, settings: Settings, as_json: bool) -> None:
    running = outcome.running
    if running and not as_json and _confirm(
            f"\ninterrupted: cancel the job of run {outcome.run_id} on "
            f"{', '.join(running)}? (no: it goes on there)"):
        for alias, result in workflow.cancel_run(outcome.run_id, settings, running).items():
            err.print(f"{alias}: {result}", markup=False)
    elif running:
        err.print(f"the job goes on on {', '.join(running)}; `sparsek-remote run --resume "
                  f"{outcome.run_id}` re-attaches, `sparsek-remote fetch` collects",
                  markup=False)
    raise typer.Exit(130)


def _confirm(question: str) -> bool:
    try:
        return typer.confirm(question, default=False, err=True)
    except (typer.Abort, EOFError):
        return False


def _print_remote(outcome: workflow.RemoteOutcome, as_json: bool,
                  error: SparsekRemoteError | None) -> None:
    if as_json:
        out.print_json(data=_remote_json(outcome, error))
        return
    for alias, host in outcome.hosts.items():
        if host.results is not None and host.state == "stored":
            out.print(_summary_table(host.results))
        out.print(f"{alias}: {_host_line(host)}", markup=False)
    if outcome.report is not None:
        out.print(f"report: {outcome.report.markdown_path}", markup=False)
    if outcome.report_error:
        err.print(f"the report was not written: {outcome.report_error}", markup=False)
    out.print(f"run {outcome.run_id}", markup=False)


def _host_line(host: workflow.HostOutcome) -> str:
    if host.state == "stored":
        return f"stored {host.bundle_path}"
    if host.state == "already_stored":
        return f"already stored {host.bundle_path}"
    if host.state == "running":
        return host.detail or "running"
    return f"failed: {host.error.message if host.error else 'unknown'}"


def _remote_json(outcome: workflow.RemoteOutcome,
                 error: SparsekRemoteError | None) -> dict[str, Any]:
    hosts = {}
    for alias, host in outcome.hosts.items():
        hosts[alias] = {
            "state": host.state, "bundle": str(host.bundle_path) if host.bundle_path else None,
            "detail": host.detail, "gate_failures": list(host.gate_failures),
            "error": host.error.message if host.error else None,
            "results": (json.loads(host.results.model_dump_json())["results"]
                        if host.results is not None else None)}
    data: dict[str, Any] = {"run_id": outcome.run_id, "hosts": hosts,
                            "recorded_host_keys": outcome.recorded_keys,
                            "report": str(outcome.report.markdown_path)
                            if outcome.report else None}
    if error is not None:
        data["error"] = {"type": type(error).__name__, "message": error.message,
                         "hint": error.hint, "exit_code": error.exit_code}
    return data


@app.command()
def fetch(
    runs: Annotated[Optional[list[str]], typer.Argument(  # noqa: UP045
        help="Run ids; none: every run started here with bundles still to fetch.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary.")] = False,
    report: Annotated[bool, typer.Option(help="Write the report of runs fetched.")] = False,
) -> None:
    """Collect the bundles of jobs on hosts: verified, then stored in results/<run_id>/.

    Resumable: bundles already stored are skipped, jobs still running are reported."""
    with _handled(as_json):
        outcomes = workflow.fetch_runs(_settings(), runs or None, with_report=report)
        errors = [e for e in (o.error() for o in outcomes) if e is not None]
        if as_json:
            out.print_json(data={"runs": [_remote_json(o, o.error()) for o in outcomes]})
        elif not outcomes:
            out.print("nothing to fetch: no run started here has a bundle waiting on a host",
                      markup=False)
        for outcome in outcomes if not as_json else []:
            for alias, host in outcome.hosts.items():
                out.print(f"{outcome.run_id} {alias}: {_host_line(host)}", markup=False)
        if errors:
            if as_json:
                raise typer.Exit(errors[0].exit_code if len(errors) == 1 else 5)
            raise errors[0] if len(errors) == 1 else RemoteError(
                "fetching failed for several runs:\n" + "\n".join(f"  - {e}" for e in errors))


@app.command()
def trust(
    aliases: Annotated[list[str], typer.Argument(help="Host aliases from .env.")],
    forget: Annotated[bool, typer.Option(help="Remove the recorded key instead.")] = False,
    timeout: Annotated[float, typer.Option(help="Connect timeout in seconds.")] = 15.0,
) -> None:
    """Record a host's SSH key after you have compared its fingerprint (or forget it)."""
    with _handled():
        for alias, result in workflow.trust_hosts(_settings(), aliases, forget=forget,
                                                   timeout_s=timeout).items():
            out.print(f"{alias}: {result}", markup=False)


# --- deploy: build the image, ship it, probe every host ---------------------------------


@app.command(epilog="Exit code 6: the image could not be built or loaded; 5: a host failed "
             "(the table and the message say which).")
def deploy(
    aliases: Annotated[Optional[list[str]], typer.Argument(  # noqa: UP045
        help="Host aliases from .env; none: every configured host.")] = None,
    ca_bundle: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        help="CA bundle (PEM) of a TLS-intercepting proxy; pip uses it during the build.")
    ] = None,
    wheels: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        help="Folder of wheels pip takes before any index (offline builds).")] = None,
    builder_image: Annotated[str, typer.Option(help="Base of the build stage.")] = (
        workflow.BuildOptions.builder_image),
    runtime_image: Annotated[str, typer.Option(help="Base of the shipped image.")] = (
        workflow.BuildOptions.runtime_image),
    torch_index_url: Annotated[str, typer.Option(help="Where pip finds PyTorch.")] = (
        workflow.BuildOptions.torch_index_url),
    torch_spec: Annotated[str, typer.Option(help="Which PyTorch.")] = (
        workflow.BuildOptions.torch_spec),
    compression: Annotated[str, typer.Option(
        help="auto (each block gzipped or stored, whichever has lately moved the image "
             "faster), gzip (every block) or none.")] = "auto",
    trust_new_host_key: Annotated[bool, typer.Option(
        "--trust-new-host-key",
        help="Record the key of a host never seen before (compare its fingerprint first).")
    ] = False,
    timeout: Annotated[float, typer.Option(help="Connect timeout in seconds.")] = 15.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary.")] = False,
) -> None:
    """Build the image (skipped when the tree is unchanged), send every docker host only
    the layers it lacks, install bare hosts, and show what each host offers."""
    with _handled(as_json):
        if compression not in workflow.CODECS:
            raise ConfigError(f"--compression must be one of {', '.join(workflow.CODECS)}, "
                              f"not {compression!r}")
        options = workflow.BuildOptions(
            builder_image=builder_image, runtime_image=runtime_image,
            torch_index_url=torch_index_url, torch_spec=torch_spec, wheel_dir=wheels,
            ca_bundle=ca_bundle)
        settings = _settings()
        try:
            with _deploy_progress(disabled=as_json) as on_event:
                outcome = workflow.deploy(
                    settings, project_root=Path.cwd(), aliases=aliases or None,
                    options=options, codec=compression,  # type: ignore[arg-type]
                    trust_new_host_key=trust_new_host_key, connect_timeout_s=timeout,
                    on_event=on_event)
        except ImageError as exc:
            if exc.build_log and not as_json:
                err.print("last lines of the build:\n" + exc.build_log, markup=False)
            raise
        error = outcome.error()
        if as_json:
            out.print_json(data=_deploy_json(outcome, error))
            if error is not None:
                raise typer.Exit(error.exit_code)
            return
        out.print(_deploy_table(outcome))
        if error is not None:
            raise error


@contextmanager
def _deploy_progress(disabled: bool) -> Iterator[Callable[[dict[str, Any]], None]]:
    """A line for the build (its latest log line) and one per host (stage, bytes sent)."""
    progress = Progress(SpinnerColumn(), TextColumn("{task.fields[name]:<10}"),
                        TextColumn("{task.description}"), TimeElapsedColumn(), console=err,
                        disable=disabled, transient=True)
    tasks: dict[str, Any] = {}
    sent: dict[str, int] = {}

    def task(name: str) -> Any:
        if name not in tasks:
            tasks[name] = progress.add_task("", total=None, name=name)
        return tasks[name]

    def on_event(event: dict[str, Any]) -> None:
        kind, host = event.get("event"), str(event.get("host", ""))
        if kind == "build_log":
            progress.update(task("image"), description=str(event.get("line", ""))[:70])
        elif kind == "build":
            progress.update(task("image"), description=f"{event.get('state')} "
                            f"{event.get('tag')}")
        elif kind == "host":
            progress.update(task(host), description=f"{event.get('state')} "
                            f"{event.get('detail', '')}")
        elif kind == "ship":
            sent[host] = sent.get(host, 0) + int(event.get("bytes", 0))
            progress.update(task(host), description=f"shipping {_size(sent[host])}")

    with progress:
        yield on_event


def _deploy_table(outcome: workflow.DeployOutcome) -> Table:
    image = outcome.image
    title = (f"image {image.tag} ({'built' if image.built else 'unchanged'}, "
             f"{image.image_id[:19]})")
    table = Table("host", "kind", "GPU", "CC", "driver", "docker", "free disk", "ncu counters",
                  "image", "status", title=title, box=box.SIMPLE_HEAD)
    for alias, host in outcome.hosts.items():
        checks = host.preflight
        gpus = checks.gpus if checks else ()
        table.add_row(
            alias, host.kind or "-",
            f"{len(gpus)}x {gpus[0].name}" if gpus else "none",
            gpus[0].compute_capability if gpus else "-",
            (gpus[0].driver + ("" if checks and checks.driver_ok else " (too old)"))
            if gpus else "-",
            (checks.docker_version or "no") if checks else "-",
            _size(checks.free_disk_bytes) if checks and checks.free_disk_bytes else "-",
            checks.ncu_counters(host.kind) if checks and host.kind else "-",
            _shipped(host), _status(host))
    return table


def _shipped(host: workflow.HostDeployment) -> str:
    if host.kind == "bare":
        return f"wheels {host.wheels_tag}" if host.wheels_tag else "-"
    if host.ship is None:
        return "-"
    if host.ship.wire_bytes == 0:
        return "already there"
    return (f"{host.ship.layers_sent}/{host.ship.layers_total} layers, "
            f"{_size(host.ship.wire_bytes)}")


def _status(host: workflow.HostDeployment) -> str:
    if host.error is not None:
        return "FAILED: " + host.error.message.splitlines()[0]
    problems = host.problems()
    return "ready" if not problems else "ready, but: " + "; ".join(problems)


def _deploy_json(outcome: workflow.DeployOutcome, error: SparsekRemoteError | None
                 ) -> dict[str, Any]:
    hosts = {}
    for alias, host in outcome.hosts.items():
        checks = host.preflight
        hosts[alias] = {
            "ok": host.ok, "kind": host.kind, "image_id": host.image_id,
            "ship": vars(host.ship) if host.ship else None, "wheels_tag": host.wheels_tag,
            "seconds": round(host.seconds, 3), "problems": host.problems(),
            "gpus": [vars(g) for g in checks.gpus] if checks else [],
            "docker": checks.docker_version if checks else None,
            "free_disk_bytes": checks.free_disk_bytes if checks else None,
            "ncu_counters": checks.ncu_counters(host.kind) if checks and host.kind else None,
            "error": host.error.message if host.error else None}
    data: dict[str, Any] = {"image": {"tag": outcome.image.tag, "id": outcome.image.image_id,
                                      "built": outcome.image.built}, "hosts": hosts}
    if error is not None:
        data["error"] = {"type": type(error).__name__, "message": error.message,
                         "hint": error.hint, "exit_code": error.exit_code}
    return data


def _size(count: int | None) -> str:
    value = float(count or 0)
    if value < 1024:
        return f"{value:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024 or unit == "GiB":
            break
    return f"{value:.1f} {unit}"


@contextmanager
def _host_progress(disabled: bool, show_log: bool
                   ) -> Iterator[Callable[[dict[str, Any]], None]]:
    """One progress line per host, fed by events tagged with their host."""
    progress = Progress(TextColumn("{task.fields[host]}"), TextColumn("{task.description}"),
                        BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err,
                        disable=disabled, transient=True)
    tasks: dict[str, Any] = {}

    def on_event(event: dict[str, Any]) -> None:
        host = str(event.get("host", "?"))
        if host not in tasks:
            tasks[host] = progress.add_task("connecting", total=None, host=host)
        kind = event.get("event")
        if kind == "log":
            if show_log and not disabled:
                progress.console.print(f"{host}: {event.get('line', '')}", markup=False,
                                       highlight=False)
        elif kind == "host":
            progress.update(tasks[host], description=str(event.get("state")))
        else:
            _show_event(progress, tasks[host], event)

    with progress:
        yield on_event


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
            out.print_json(data={"default_target": settings.default_target,
                                 "local": {"gpus": settings.local_gpus}, "hosts": rows})
            return
        table = Table("alias", "user", "port", "key", "passphrase", "host key", "kind", "gpus")
        table.add_row("local", "-", "-", "-", "-", "-", "this machine", settings.local_gpus)
        for alias, view in rows.items():
            table.add_row(alias, *(str(view[k]) for k in (
                "user", "port", "key_path", "key_passphrase", "host_key_fingerprint", "kind",
                "gpus")))
        out.print(table)
        out.print(f"default target: {settings.default_target}", markup=False)


@contextmanager
def _progress(disabled: bool) -> Iterator[Callable[[dict[str, Any]], None]]:
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=err, disable=disabled, transient=True)
    task = progress.add_task("starting the runner", total=None)

    def on_event(event: dict[str, Any]) -> None:
        _show_event(progress, task, event)

    with progress:
        yield on_event


def _show_event(progress: Progress, task: Any, event: dict[str, Any]) -> None:
    """Move one progress line along with the runner's events (local or on a host)."""
    kind = event.get("event")
    if kind == "start":
        progress.update(task, total=int(event.get("total", 0)), description="running")
    elif kind == "case_start":
        progress.update(task, description=f"{event.get('case')} / "
                        f"{event.get('implementation')}")
    elif kind == "case_done":
        progress.advance(task)


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
