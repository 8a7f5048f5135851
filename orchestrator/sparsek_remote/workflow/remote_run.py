"""Runs on remote hosts: start a job on one or many hosts, re-attach, fetch, cancel.

Each host runs its job detached (a dropped link does not stop it) and is followed
in its own thread; the progress events of all hosts reach one ``on_event`` sink,
each tagged with ``"host"``. What was started where is recorded under
``<state_dir>/runs/<run_id>.json``, so ``resume_run`` and ``fetch_runs`` find it
again from a new process. Results land in ``results/<run_id>/<host>/`` through the
same validation as local runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sparsek_remote import artifacts, remote, report
from sparsek_remote.errors import ConfigError, RemoteError, SparsekRemoteError
from sparsek_remote.jobspec import LOCAL_TARGET, JobSpec
from sparsek_remote.settings import Settings
from sparsek_remote.workflow._remote_host import (
    DockerRunner,
    EventSink,
    HostOutcome,
    Links,
    RunContext,
    attach_on_host,
    fan_out,
    known_hosts_path,
    launch_on_host,
)
from sparsek_remote.workflow._wheels import WheelCache, build_wheels
from sparsek_remote.workflow.local import git_state, make_report

__all__ = ["DockerRunner", "HostOutcome", "RemoteOutcome", "build_wheels", "cancel_run",
           "fetch_runs", "resume_run", "run_on_hosts", "trust_hosts"]


@dataclass(frozen=True)
class RemoteOutcome:
    """One run on hosts: each host's outcome; ``interrupted`` when the user pressed
    Ctrl-C (the jobs go on); ``recorded_keys``: host keys newly trusted."""

    run_id: str
    hosts: dict[str, HostOutcome]
    interrupted: bool = False
    recorded_keys: dict[str, str] = field(default_factory=dict)
    report: report.Report | None = None
    report_error: str | None = None

    @property
    def failed(self) -> list[str]:
        return [a for a, h in self.hosts.items() if h.state == "failed"]

    @property
    def succeeded(self) -> list[str]:
        return [a for a, h in self.hosts.items() if h.ok]

    @property
    def running(self) -> list[str]:
        return [a for a, h in self.hosts.items() if h.state == "running"]

    @property
    def gate_failures(self) -> list[str]:
        return [f"{a}: {case}" for a, h in self.hosts.items() for case in h.gate_failures]

    def error(self) -> SparsekRemoteError | None:
        """None when no host failed; the host's own error when the run had one host;
        else a ``RemoteError`` (exit code 5) listing which hosts failed and which did not."""
        failed = self.failed
        if not failed:
            return None
        if len(self.hosts) == 1:
            return self.hosts[failed[0]].error
        details = "\n".join(f"  - {a}: {_indent(str(self.hosts[a].error))}" for a in failed)
        others = ", ".join(self.succeeded) or "none"
        running = f"; still running: {', '.join(self.running)}" if self.running else ""
        return RemoteError(
            f"run {self.run_id} failed on {len(failed)} of {len(self.hosts)} hosts "
            f"({', '.join(failed)}); succeeded on: {others}{running}\n{details}",
            hint=f"bundles of jobs that still run on a host are collected by "
                 f"`sparsek-remote fetch`; `sparsek-remote run --resume {self.run_id}` "
                 "re-attaches")


def run_on_hosts(job: JobSpec, settings: Settings, *, targets: list[str], project_root: Path,
                 on_event: EventSink | None = None, device: str | None = None,
                 trust_new_host_key: bool = False, clear_stale_lock: bool = False,
                 detach: bool = False, wheels_dir: Path | None = None,
                 docker_runner: DockerRunner | None = None,
                 with_report: bool = True) -> RemoteOutcome:
    """Start ``job`` on every host in ``targets`` in parallel, follow and fetch.

    Bare hosts get the project's wheels (``wheels_dir``, else built from
    ``project_root``); docker hosts need ``docker_runner``. With ``detach`` the call
    returns once every job is started; ``fetch_runs`` collects them later."""
    _check_targets(targets, settings)
    run_id = artifacts.new_run_id(job.name)
    book = remote.RunBook.new(
        settings.state_dir, run_id=run_id, job_name=job.name,
        connect_timeout_s=float(job.timeouts.connect_s),
        hosts={a: remote.HostRecord(kind=_kind(settings, a), remote_dir=settings.host(a).remote_dir)
               for a in targets})
    ctx = RunContext(settings, run_id, book, float(job.timeouts.connect_s), on_event,
                     trust_new_host_key, job=job, device=device or job.device,
                     git=git_state(project_root),
                     wheels=WheelCache(project_root, settings.state_dir / "wheels", wheels_dir),
                     docker_runner=docker_runner, clear_stale_lock=clear_stale_lock)
    hosts, interrupted = fan_out(targets, lambda a: launch_on_host(ctx, a, detach=detach),
                                 ctx.stop)
    return _finish(ctx, hosts, interrupted, with_report)


def resume_run(run_id: str, settings: Settings, *, on_event: EventSink | None = None,
               trust_new_host_key: bool = False, with_report: bool = True) -> RemoteOutcome:
    """Re-attach to a run's jobs: follow each until it ends, then fetch its bundle."""
    ctx = _context(run_id, settings, on_event, trust_new_host_key)
    aliases = _unfinished(ctx)
    hosts, interrupted = fan_out(aliases, lambda a: attach_on_host(ctx, a, follow=True),
                                 ctx.stop)
    return _finish(ctx, hosts, interrupted, with_report)


def fetch_runs(settings: Settings, runs: list[str] | None = None, *,
               on_event: EventSink | None = None,
               with_report: bool = False) -> list[RemoteOutcome]:
    """Collect the bundles of finished jobs that are not in ``results/`` yet.

    With no ``runs``, every run recorded here with a host still to fetch. Stored
    bundles are skipped, so an interrupted fetch is simply run again."""
    if runs:
        ids = list(dict.fromkeys(runs))
    else:
        ids = [r for r in remote.list_run_ids(settings.state_dir)
               if remote.RunBook.open(settings.state_dir, r).record.pending()]
    outcomes = []
    links = Links()  # one login a host for all the runs
    try:
        for run_id in ids:
            ctx = _context(run_id, settings, on_event, False)
            ctx.links = links
            hosts, interrupted = fan_out(_unfinished(ctx),
                                         lambda a, c=ctx: attach_on_host(c, a, follow=False),
                                         ctx.stop)
            outcomes.append(_finish(ctx, hosts, interrupted, with_report))
            if interrupted:
                break
    finally:
        links.close()
    return outcomes


def cancel_run(run_id: str, settings: Settings,
               aliases: list[str] | None = None) -> dict[str, str]:
    """Stop a run's jobs on its hosts (all of them, or ``aliases``): per host what
    happened (``cancelled``, ``killed``, ``not-running``) or why it could not."""
    ctx = _context(run_id, settings, None, False)
    chosen = aliases or [a for a, h in ctx.book.record.hosts.items() if h.stage == "launched"]
    done: dict[str, str] = {}
    for alias in chosen:
        try:
            with ctx.connection(alias) as conn:
                record = ctx.book.record.hosts[alias]
                job = remote.RemoteJob(alias, run_id, f"{conn.home()}/{record.remote_dir}")
                done[alias] = remote.cancel(conn, job)
            ctx.book.set_stage(alias, "failed", "cancelled by the user")
        except SparsekRemoteError as exc:
            done[alias] = f"not cancelled: {exc.message}"
    return done


def trust_hosts(settings: Settings, aliases: list[str], *, forget: bool = False,
                timeout_s: float = 15.0) -> dict[str, str]:
    """Record each host's key in the known-hosts file after connecting (or, with
    ``forget``, remove what is recorded). Per host, what was done."""
    path = known_hosts_path(settings)
    done: dict[str, str] = {}
    for alias in aliases:
        host = settings.host(alias)
        if forget:
            count = remote.forget_host_key(path, host)
            done[alias] = f"forgot {count} recorded key(s)"
            continue
        options = remote.ConnectOptions(known_hosts=path, timeout_s=timeout_s,
                                        trust_new_host_key=True)
        with remote.Connection(alias, host, options) as conn:
            check = conn.host_key
        assert check is not None  # set by every successful open()
        done[alias] = {"pinned": "matches the fingerprint pinned in .env",
                       "known": "already recorded",
                       "recorded": f"recorded in {path}"}[check.source] + (
            f": {check.key_type} {check.fingerprint}")
    return done


def _check_targets(targets: list[str], settings: Settings) -> None:
    if not targets:
        raise ConfigError("no hosts to run on", hint="name them in the job's targets")
    if LOCAL_TARGET in targets:
        raise ConfigError("the local target cannot be mixed with remote hosts in one run",
                          hint="run the local target on its own (--target local)")
    for alias in targets:
        settings.host(alias)


def _kind(settings: Settings, alias: str) -> str:
    kind = settings.host(alias).kind
    return kind if kind in ("bare", "docker") else "bare"


def _context(run_id: str, settings: Settings, on_event: EventSink | None,
             trust_new_host_key: bool) -> RunContext:
    book = remote.RunBook.open(settings.state_dir, run_id)
    return RunContext(settings, run_id, book, book.record.connect_timeout_s, on_event,
                      trust_new_host_key)


def _unfinished(ctx: RunContext) -> list[str]:
    return [a for a, h in sorted(ctx.book.record.hosts.items())
            if h.stage in ("launched", "stored")]


def _finish(ctx: RunContext, hosts: dict[str, HostOutcome], interrupted: bool,
            with_report: bool) -> RemoteOutcome:
    written, problem = None, None
    if with_report and any(h.state == "stored" for h in hosts.values()):
        try:
            written = make_report([ctx.run_id], ctx.settings)
        except SparsekRemoteError as exc:
            problem = str(exc)
    return RemoteOutcome(ctx.run_id, hosts, interrupted, dict(ctx.recorded_keys), written,
                         problem)


def _indent(text: str) -> str:
    return text.replace("\n", "\n    ")
