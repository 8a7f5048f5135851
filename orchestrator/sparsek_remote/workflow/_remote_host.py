"""The steps of a remote run on one host, and the fan-out over many.

Each host's work runs in its own thread and ends in a ``HostOutcome``: one host's
failure is captured there and never touches another's. The bundle of a finished
job is downloaded as a tar stream, extracted by ``artifacts.safe_extract_tar`` into
a staging folder and stored by ``artifacts.store_bundle``: the same validation as
the local path, the same quarantine for what fails it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sparsek_remote import artifacts, localhost, remote
from sparsek_remote.errors import (
    BundleError,
    ConfigError,
    RemoteError,
    RunnerError,
    SparsekRemoteError,
    host_internal_error,
)
from sparsek_remote.jobspec import JobSpec
from sparsek_remote.schema import Results
from sparsek_remote.settings import Settings
from sparsek_remote.workflow import preflight

EventSink = Callable[[dict[str, Any]], None]
# (host alias, absolute run folder on the host) -> how to start the runner in the image.
DockerRunner = Callable[[str, str], remote.RunnerCommand]
HostState = Literal["stored", "already_stored", "running", "failed"]


@dataclass(frozen=True)
class HostOutcome:
    """How one host's part of a run ended: its bundle stored (or stored before), its
    job still running there, or failed with ``error``."""

    alias: str
    state: HostState
    bundle_path: Path | None = None
    results: Results | None = None
    error: SparsekRemoteError | None = None
    gate_failures: tuple[str, ...] = ()
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.state in ("stored", "already_stored")


class Links:
    """Connections kept open across the runs of one command (a fetch of several runs):
    one login a host instead of one a run and host. A link that went down is dropped,
    so the next run on that host connects afresh."""

    def __init__(self) -> None:
        self._open: dict[str, remote.Connection] = {}
        self._lock = threading.Lock()

    def get(self, alias: str, connect: Callable[[str], remote.Connection]) -> remote.Connection:
        with self._lock:
            conn = self._open.get(alias)
        if conn is None:
            conn = connect(alias)
            with self._lock:
                self._open[alias] = conn
        return conn

    def drop(self, alias: str) -> None:
        with self._lock:
            conn = self._open.pop(alias, None)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        with self._lock:
            conns, self._open = list(self._open.values()), {}
        for conn in conns:
            conn.close()


@dataclass
class RunContext:
    """What every host's thread of one run shares."""

    settings: Settings
    run_id: str
    book: remote.RunBook
    connect_s: float
    on_event: EventSink | None = None
    trust_new_host_key: bool = False
    stop: threading.Event = field(default_factory=threading.Event)
    job: JobSpec | None = None
    device: str = "auto"
    git: tuple[str | None, bool | None] = (None, None)
    wheels: Callable[[], list[Path]] | None = None
    docker_runner: DockerRunner | None = None
    clear_stale_lock: bool = False
    recorded_keys: dict[str, str] = field(default_factory=dict)
    links: Links | None = None

    def emit(self, alias: str, event: dict[str, Any]) -> None:
        if self.on_event is not None:
            self.on_event({**event, "host": alias})

    def stage(self, alias: str, state: str, detail: str = "") -> None:
        self.emit(alias, {"event": "host", "state": state, "detail": detail})

    def connect(self, alias: str) -> remote.Connection:
        options = remote.ConnectOptions(known_hosts=known_hosts_path(self.settings),
                                        timeout_s=self.connect_s,
                                        trust_new_host_key=self.trust_new_host_key)
        self.stage(alias, "connecting")
        conn = remote.Connection(alias, self.settings.host(alias), options).open()
        if conn.host_key is not None and conn.host_key.source == "recorded":
            self.recorded_keys[alias] = conn.host_key.fingerprint
        return conn

    @contextmanager
    def connection(self, alias: str) -> Iterator[remote.Connection]:
        """A connection to ``alias`` for one step: its own, closed after it, or the
        shared one of ``links``, left open for the next run."""
        if self.links is None:
            with self.connect(alias) as conn:
                yield conn
            return
        conn = self.links.get(alias, self.connect)
        try:
            yield conn
        except BaseException:
            # A step that failed on a link still up (a refused bundle, a failed runner)
            # keeps it for the next run; a link that is down is dropped, so the next run
            # connects afresh.
            if not conn.is_open():
                self.links.drop(alias)
            raise


def known_hosts_path(settings: Settings) -> Path:
    return settings.state_dir / remote.KNOWN_HOSTS_NAME


def fan_out(aliases: Iterable[str], work: Callable[[str], HostOutcome],
            stop: threading.Event) -> tuple[dict[str, HostOutcome], bool]:
    """Run ``work`` for every host in parallel. Ctrl-C sets ``stop`` (each host then
    detaches at its next poll) and is reported as ``interrupted``."""
    aliases = list(aliases)
    outcomes: dict[str, HostOutcome] = {}
    interrupted = False
    with ThreadPoolExecutor(max_workers=max(1, len(aliases))) as pool:
        futures = {pool.submit(_guarded, work, alias): alias for alias in aliases}
        pending = set(futures)
        while pending:
            try:
                done, pending = wait(pending, timeout=0.5)
            except KeyboardInterrupt:
                stop.set()
                interrupted = True
                continue
            for future in done:
                outcomes[futures[future]] = future.result()
    return {a: outcomes[a] for a in aliases}, interrupted


def _guarded(work: Callable[[str], HostOutcome], alias: str) -> HostOutcome:
    try:
        return work(alias)
    except SparsekRemoteError as exc:
        return HostOutcome(alias, "failed", error=exc)
    except Exception as exc:  # a bug on one host must not lose the others' results
        return HostOutcome(alias, "failed", error=host_internal_error(alias, exc))


def launch_on_host(ctx: RunContext, alias: str, *, detach: bool) -> HostOutcome:
    """Connect, prepare the runner, start the job detached, then follow and fetch."""
    try:
        with ctx.connection(alias) as conn:
            kind = host_kind(ctx, conn, alias)
            # On a bare host the venv's marker comes with the home folder, in one command.
            installed = remote.installed_tag(conn) if kind == "bare" else None
            job = remote.remote_job(conn, ctx.run_id)
            if ctx.clear_stale_lock:
                remote.clear_stale_lock(conn, job.remote_dir)
            runner = _runner_for(ctx, conn, alias, job, kind, installed)
            ctx.stage(alias, "starting")
            assert ctx.job is not None  # set by the run flow, never by fetch
            remote.launch(conn, job, job_json=ctx.job.to_json(),
                          argv=_runner_argv(ctx, alias, runner, job),
                          limit_s=float(ctx.job.timeouts.job_s), cancel=runner.cancel)
            ctx.book.set_stage(alias, "launched")
            ctx.stage(alias, "launched")
            if detach:
                return HostOutcome(alias, "running", detail="started, detached")
            return follow_and_collect(ctx, conn, alias, job)
    except SparsekRemoteError as exc:
        if ctx.book.record.hosts[alias].stage == "starting":
            ctx.book.set_stage(alias, "not_started", exc.message)
        raise


def attach_on_host(ctx: RunContext, alias: str, *, follow: bool) -> HostOutcome:
    """For a job launched earlier: follow it (``run --resume``) or look once (fetch)."""
    stored = _already_stored(ctx, alias)
    if stored is not None:
        return stored
    with ctx.connection(alias) as conn:
        job = remote.RemoteJob(alias, ctx.run_id,
                               f"{conn.home()}/{ctx.book.record.hosts[alias].remote_dir}")
        if follow:
            ctx.stage(alias, "following")
            return follow_and_collect(ctx, conn, alias, job)
        return collect(ctx, conn, alias, job, remote.status(conn, job))


def follow_and_collect(ctx: RunContext, conn: remote.Connection, alias: str,
                       job: remote.RemoteJob) -> HostOutcome:
    try:
        status = remote.follow(
            conn, job, on_event=lambda e: ctx.emit(alias, e),
            on_log=lambda line: ctx.emit(alias, {"event": "log", "line": line}), stop=ctx.stop)
    except RemoteError as exc:
        raise RemoteError(exc.message, hint=(
            f"the job goes on on the host: `sparsek-remote run --resume {ctx.run_id}` "
            "re-attaches once the host answers again, `sparsek-remote fetch` collects the "
            "bundle when it is done")) from None
    return collect(ctx, conn, alias, job, status)


def collect(ctx: RunContext, conn: remote.Connection, alias: str, job: remote.RemoteJob,
            status: remote.JobStatus) -> HostOutcome:
    """Store the bundle of a finished job; say why there is none otherwise."""
    stored = _already_stored(ctx, alias)
    if stored is not None:
        return stored
    if status.state == "running":
        age = f", heartbeat {status.heartbeat_age_s} s ago" if status.heartbeat_age_s else ""
        return HostOutcome(alias, "running", detail=f"still running on the host{age}")
    try:
        _check_finished(conn, job, status)
        ctx.stage(alias, "fetching")
        path = _download_and_store(ctx, conn, alias, job)
    except (RunnerError, BundleError) as exc:
        ctx.book.set_stage(alias, "failed", exc.message)
        raise
    ctx.book.set_stage(alias, "stored")
    ctx.stage(alias, "stored")
    return _stored_outcome(alias, "stored", path, ctx.run_id)


def _already_stored(ctx: RunContext, alias: str) -> HostOutcome | None:
    path = ctx.settings.results_dir / ctx.run_id / alias
    if not os.path.lexists(path):
        return None
    if ctx.book.record.hosts[alias].stage != "stored":
        ctx.book.set_stage(alias, "stored")
    return _stored_outcome(alias, "already_stored", path, ctx.run_id)


def _stored_outcome(alias: str, state: HostState, path: Path, run_id: str) -> HostOutcome:
    bundle = artifacts.validate_bundle(path, expected_run_id=run_id, expected_host=alias)
    failures = tuple(f"{r.case}/{r.implementation}" for r in bundle.results.results
                     if r.status in ("gate_failed", "error"))
    return HostOutcome(alias, state, path, bundle.results, gate_failures=failures)


def _check_finished(conn: remote.Connection, job: remote.RemoteJob,
                    status: remote.JobStatus) -> None:
    if status.state == "missing":
        raise RemoteError(f"host {conn.alias!r}: the run folder {job.run_dir} is gone",
                          hint="it was removed on the host; the run cannot be fetched")
    if status.state == "finished" and status.exit_code == 0 and status.has_bundle:
        return
    tail = remote.log_tail(conn, job)
    hint = remote.disk_full_hint(conn.host.remote_dir) if "No space left" in tail else None
    if status.state == "lost":
        raise RunnerError(f"host {conn.alias!r}: the job ended without recording how "
                          "(killed, or the host restarted)", log_tail=tail, hint=hint)
    if status.exit_code != 0:
        raise RunnerError(f"host {conn.alias!r}: the runner failed",
                          returncode=status.exit_code, log_tail=tail, hint=hint)
    raise RunnerError(f"host {conn.alias!r}: the runner ended but left no complete bundle "
                      "(no manifest.json)", log_tail=tail, hint=hint)


def _download_and_store(ctx: RunContext, conn: remote.Connection, alias: str,
                        job: remote.RemoteJob) -> Path:
    work = ctx.settings.work_dir
    work.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"fetch-{alias}-", dir=work))
    try:
        archive = staging / "bundle.tar.gz"
        with open(archive, "wb") as sink:
            remote.download_tar(conn, job.bundle_dir, sink, what="fetching the bundle")
        artifacts.safe_extract_tar(archive, staging / "bundle")
        return artifacts.store_bundle(
            staging / "bundle", ctx.settings.results_dir,
            quarantine_root=ctx.settings.quarantine_dir, expected_run_id=ctx.run_id,
            expected_host=alias)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def host_kind(ctx: RunContext, conn: remote.Connection, alias: str) -> str:
    """The host's kind as set, or for ``auto`` as its probe says; recorded in the run."""
    kind = conn.host.kind
    if kind == "auto":
        kind = preflight.probe_kind(conn)
    ctx.book.set_kind(alias, kind)
    return kind


def _runner_for(ctx: RunContext, conn: remote.Connection, alias: str,
                job: remote.RemoteJob, kind: str, installed: str | None
                ) -> remote.RunnerCommand:
    if kind == "docker":
        if ctx.docker_runner is None:
            raise RemoteError(f"host {alias!r} is a docker host, and this run has no image "
                              "to start there",
                              hint=f"run `sparsek-remote deploy` first, or set "
                                   f"SPARSEK_HOSTS__{alias.upper()}__KIND=bare")
        return ctx.docker_runner(alias, job.run_dir)
    if ctx.wheels is None:
        raise ConfigError("bare hosts need the project's wheels, and none were given")
    ctx.stage(alias, "installing")
    env = remote.install(conn, job.remote_dir, ctx.wheels(), installed=installed)
    return remote.RunnerCommand(python=env.python)


def _runner_argv(ctx: RunContext, alias: str, runner: remote.RunnerCommand,
                 job: remote.RemoteJob) -> list[str]:
    inside = runner.run_dir_inside or job.run_dir
    commit, dirty = ctx.git
    invocation = localhost.RunnerInvocation(
        job_file=Path(f"{inside}/{remote.JOB_NAME}"),
        out_dir=Path(f"{inside}/{remote.BUNDLE_FOLDER}"), run_id=ctx.run_id,
        host_alias=alias, device=ctx.device, git_commit=commit, git_dirty=dirty,
        gpus=ctx.settings.gpus_for(alias))
    return [*runner.launcher, *invocation.argv(python=runner.python), *runner.extra_args]
