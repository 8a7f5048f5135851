"""Detached runs on a host: launch, follow, status, cancel, and the host's lock.

A job is started by the job-control script under ``setsid nohup``, so a dropped
link does not stop it. While connected, ``follow`` polls the run folder for new
progress events and log lines and hands them on; when the link drops the job goes
on, and a later ``follow`` (``run --resume``) or a fetch picks it up again.
One lock per host (an atomic ``mkdir``) keeps two runs off one GPU.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from sparsek_remote.errors import RemoteError
from sparsek_remote.remote import jobscript
from sparsek_remote.remote.commands import quote_argv, sh_argv
from sparsek_remote.remote.connection import Connection, disk_full_hint
from sparsek_remote.remote.transfer import upload_bytes

EVENTS_NAME = "events.jsonl"
STDERR_NAME = "runner.stderr"
BUNDLE_FOLDER = "bundle"
JOB_NAME = "job.json"
# Below this much free space under the remote folder a run is not started.
MIN_FREE_BYTES = 64 * 2**20
# The job script touches the heartbeat every few seconds while the job lives.
STALE_HEARTBEAT_S = 30 * jobscript.HEARTBEAT_S
_POLL_CHUNK = 256 * 1024
# A poll waits on the host at most this long for the job to write or end, looking
# every _TICK_S (the job script's step).
LONG_POLL_S = 1.0
_TICK_S = 0.05
_INFO_RE = re.compile(r"(\w+)=(\S+)")
# A launch is two round trips (plus the job script's upload, the first time on a host):
# this one makes the run folder and reports the free space and whether the script is
# there; the next writes the job file and starts the job. Each round trip costs the link's
# round-trip time plus the host starting a session (0.14 s a command on the SSH lab).
_PREPARE = ('mkdir -p "$1/bin" "$2" || exit 1\n'
            'df -Pk "$1" || exit 1\n'
            'if test -f "$3"; then echo "script=present"; fi')
_WRITE_AND_START = ('f=$1; shift\n'
                    'cat > "$f.partial" && mv -f "$f.partial" "$f" && exec sh "$@"')

Event = dict[str, Any]
JobState = Literal["running", "finished", "lost", "missing"]


@dataclass(frozen=True)
class RunnerCommand:
    """How the runner is started on a host, supplied by whoever knows the host kind.

    ``launcher`` goes before the Python interpreter (``docker run ... IMAGE`` on a
    docker host, nothing on a bare host); ``python`` is the interpreter as the runner
    sees it; ``run_dir_inside`` is where the runner sees the run folder (a bind mount
    in a container; None: the host path); ``extra_args`` follow the runner's usual
    arguments (``--image-digest``); ``cancel`` also runs when the job is cancelled
    (``docker rm -f NAME``)."""

    python: str
    launcher: tuple[str, ...] = ()
    run_dir_inside: str | None = None
    extra_args: tuple[str, ...] = ()
    cancel: tuple[str, ...] | None = None


@dataclass(frozen=True)
class RemoteJob:
    """Where one run lives on one host (absolute paths on the host)."""

    alias: str
    run_id: str
    remote_dir: str

    @property
    def run_dir(self) -> str:
        return f"{self.remote_dir}/runs/{self.run_id}"

    @property
    def bundle_dir(self) -> str:
        return f"{self.run_dir}/{BUNDLE_FOLDER}"

    @property
    def script(self) -> str:
        return f"{self.remote_dir}/bin/{jobscript.NAME}"


@dataclass(frozen=True)
class JobStatus:
    """What the run folder on the host says about the job."""

    state: JobState
    exit_code: int | None = None
    pid: int | None = None
    heartbeat_age_s: int | None = None
    has_bundle: bool = False


@dataclass(frozen=True)
class LockState:
    """The host's lock: ``free``, held by a live job (``alive``), being taken
    (``starting``), or left behind by a job whose process is gone (``dead``)."""

    state: Literal["free", "alive", "starting", "dead"]
    run_id: str | None = None
    pid: int | None = None


@dataclass
class _Cursor:
    events: int = 0
    log: int = 0
    partial_event: bytes = b""
    partial_log: bytes = b""
    pending: bool = field(default=False)


def remote_job(conn: Connection, run_id: str) -> RemoteJob:
    """The run's place on the host: under ``~/<remote_dir>`` of its settings."""
    return RemoteJob(conn.alias, run_id, f"{conn.home()}/{conn.host.remote_dir}")


def launch(conn: Connection, job: RemoteJob, *, job_json: str, argv: Sequence[str],
           limit_s: float, cancel: Sequence[str] | None = None) -> int:
    """Start ``argv`` detached in the run folder; returns the job's process id.

    Refused with ``RemoteError`` when the host is locked by another run (the
    message names it) or has less than ``MIN_FREE_BYTES`` free."""
    prepared = conn.run(sh_argv(_PREPARE, job.remote_dir, job.run_dir, job.script),
                        what="making the run folder")
    report = prepared.text.strip().splitlines()
    has_script = "script=present" in report
    _enough_space(conn, job.remote_dir, [line for line in report if line != "script=present"])
    if not has_script:
        _install_script(conn, job.script)
    if cancel:
        upload_bytes(conn, (quote_argv(cancel) + "\n").encode("utf-8"),
                     f"{job.run_dir}/cancel.sh", what="sending the cancel command")
    start = [job.script, "start", job.remote_dir, job.run_dir, job.run_id,
             str(max(1, int(limit_s))), *argv]  # the job script's words, after its sh
    result = conn.run(sh_argv(_WRITE_AND_START, f"{job.run_dir}/{JOB_NAME}", *start),
                      stdin=job_json.encode("utf-8"), what="starting the job", check=False)
    if result.exit_code == jobscript.LOCKED_EXIT:
        conn.run(["rm", "-rf", job.run_dir], what="removing the unused run folder",
                 check=False)
        raise _locked_error(conn, _lock_state(result.text))
    if not result.ok:
        raise conn.failure("starting the job", result)
    return int(_info(result.text).get("pid", "0"))


def _enough_space(conn: Connection, remote_dir: str, df_lines: list[str],
                  min_bytes: int = MIN_FREE_BYTES) -> int:
    """Free bytes from ``df -Pk``'s lines; ``RemoteError`` when fewer than min_bytes."""
    try:
        free = int(df_lines[-1].split()[3]) * 1024
    except (IndexError, ValueError):
        printed = "\n".join(df_lines)
        raise RemoteError(f"host {conn.alias!r}: df printed something unexpected: "
                          f"{printed[:200]!r}") from None
    if free < min_bytes:
        raise RemoteError(
            f"host {conn.alias!r}: only {free / 2**20:.1f} MiB are free under "
            f"~/{conn.host.remote_dir}; a run needs at least {min_bytes / 2**20:.0f} MiB, "
            "so none was started", hint=disk_full_hint(conn.host.remote_dir))
    return free


def lock_state(conn: Connection, remote_dir: str) -> LockState:
    """Who holds the host's lock, if anyone."""
    _ensure_script(conn, RemoteJob(conn.alias, "-", remote_dir))
    result = conn.run(["sh", f"{remote_dir}/bin/{jobscript.NAME}", "lock-status",
                       remote_dir], what="reading the host's lock")
    return _lock_state(result.text)


def clear_stale_lock(conn: Connection, remote_dir: str) -> LockState:
    """Remove a lock whose job process is gone; a live lock is never touched.

    Returns the lock as it was; ``RemoteError`` if it is held by a live job."""
    held = lock_state(conn, remote_dir)
    if held.state in ("free",):
        return held
    if held.state != "dead":
        raise _locked_error(conn, held)
    result = conn.run(["sh", f"{remote_dir}/bin/{jobscript.NAME}", "clear-stale", remote_dir,
                       held.run_id or "-"], what="clearing a stale lock", check=False)
    if result.exit_code == jobscript.LOCKED_EXIT:
        raise _locked_error(conn, _lock_state(result.text))
    if not result.ok:
        raise conn.failure("clearing a stale lock", result)
    return held


def status(conn: Connection, job: RemoteJob) -> JobStatus:
    """The job's state as its run folder tells it (no events are read)."""
    return _poll(conn, job, _Cursor(), most=0)[0]


def follow(conn: Connection, job: RemoteJob, *, on_event: Callable[[Event], None],
           on_log: Callable[[str], None] | None = None, stop: threading.Event | None = None,
           poll_s: float = 0.3) -> JobStatus:
    """Hand on the job's events (and log lines) until it ends or ``stop`` is set.

    Each poll waits on the host (up to ``LONG_POLL_S``) until the job writes or ends, so
    both reach the client within a twentieth of a second; a host that answered at once
    with nothing new (it could not wait) is asked again after ``poll_s``. Returns the
    last status: ``running`` when stopped early. A dropped link raises ``RemoteError``;
    the job itself goes on."""
    cursor = _Cursor()
    waiter = stop if stop is not None else threading.Event()
    while True:
        asked = time.monotonic()
        current, events, log = _poll(conn, job, cursor, most=_POLL_CHUNK, wait_s=LONG_POLL_S)
        for event in _lines(cursor, "partial_event", events):
            _deliver(event, on_event)
        for line in _lines(cursor, "partial_log", log):
            if on_log is not None:
                on_log(line.decode("utf-8", errors="replace"))
        if cursor.pending:
            continue
        quiet = not events and not log and time.monotonic() - asked < LONG_POLL_S / 2
        if current.state != "running" or waiter.wait(poll_s if quiet else 0):
            return current


def cancel(conn: Connection, job: RemoteJob) -> str:
    """Stop the job (TERM, then KILL after 10 s): ``cancelled``, ``killed`` or
    ``not-running``."""
    result = conn.run(["sh", job.script, "cancel", job.remote_dir, job.run_dir, job.run_id],
                      what="cancelling the job", limit=60)
    return result.text.strip() or "cancelled"


def log_tail(conn: Connection, job: RemoteJob, lines: int = 40) -> str:
    """The last lines the runner wrote to stderr."""
    result = conn.run(["tail", "-n", str(lines), f"{job.run_dir}/{STDERR_NAME}"],
                      what="reading the runner's log", check=False)
    return result.text.rstrip()


def _ensure_script(conn: Connection, job: RemoteJob) -> None:
    present = conn.run(["test", "-f", job.script], what="looking for the job script",
                       check=False)
    if not present.ok:
        _install_script(conn, job.script)


def _install_script(conn: Connection, path: str) -> None:
    upload_bytes(conn, jobscript.SCRIPT.encode("utf-8"), path, what="installing the job script")


def _poll(conn: Connection, job: RemoteJob, cursor: _Cursor, *, most: int,
          wait_s: float = 0.0) -> tuple[JobStatus, bytes, bytes]:
    ticks = round(wait_s / _TICK_S)
    result = conn.run(["sh", job.script, "poll", job.run_dir, str(cursor.events),
                       str(cursor.log), str(most), str(ticks)], what="following the job")
    head, _, rest = result.stdout.partition(b"\n")
    info = _info(head.decode("ascii", errors="replace"))
    if info.get("state") == "missing":
        return JobStatus("missing"), b"", b""
    events, rest = _section(rest)
    log, _ = _section(rest)
    cursor.events += len(events)
    cursor.log += len(log)
    cursor.pending = len(events) >= most > 0 or len(log) >= most > 0
    return _status_from(info), events, log


def _section(data: bytes) -> tuple[bytes, bytes]:
    head, _, rest = data.partition(b"\n")
    try:
        size = int(head.split()[1])
    except (IndexError, ValueError):
        return b"", b""
    return rest[:size], rest[size:]


def _status_from(info: dict[str, str]) -> JobStatus:
    exit_text = info.get("exit", "-")
    exit_code = int(exit_text) if exit_text.lstrip("-").isdigit() and exit_text != "-" else None
    age_text = info.get("heartbeat_age", "")
    age = int(age_text) if age_text.lstrip("-").isdigit() else None
    # A live pid with a long-silent heartbeat is some other process that got the pid
    # after the host restarted: the job itself is gone.
    alive = info.get("alive") == "1" and (age is None or age < STALE_HEARTBEAT_S)
    state: JobState = ("finished" if exit_code is not None
                       else "running" if alive else "lost")
    pid = info.get("pid", "-")
    return JobStatus(state, exit_code, int(pid) if pid.isdigit() else None, age,
                     info.get("bundle") == "1")


def _lines(cursor: _Cursor, attr: str, data: bytes) -> list[bytes]:
    buffered = getattr(cursor, attr) + data
    *complete, rest = buffered.split(b"\n")
    setattr(cursor, attr, rest)
    return [line for line in complete if line.strip()]


def _deliver(line: bytes, on_event: Callable[[Event], None]) -> None:
    try:
        event = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return  # stray output; the runner's log keeps it
    if isinstance(event, dict) and isinstance(event.get("event"), str):
        on_event(event)


def _info(text: str) -> dict[str, str]:
    return dict(_INFO_RE.findall(text))


def _lock_state(text: str) -> LockState:
    info = _info(text)
    state = info.get("state", "alive")
    pid = info.get("pid", "-")
    run_id = info.get("run_id", "-")
    return LockState(state if state in ("free", "alive", "starting", "dead") else "alive",
                     None if run_id == "-" else run_id, int(pid) if pid.isdigit() else None)


def _locked_error(conn: Connection, held: LockState) -> RemoteError:
    holder = held.run_id or "an unknown run"
    if held.state == "dead":
        return RemoteError(
            f"host {conn.alias!r} is locked by run {holder}, whose process "
            f"{held.pid or '?'} is no longer running (a stale lock: the job was killed or "
            "the host restarted)",
            hint="if no job of yours is running there, clear it with --clear-stale-lock")
    return RemoteError(
        f"host {conn.alias!r} is busy: run {holder} holds its lock (process "
        f"{held.pid or '?'}, {held.state}); two runs never share a host",
        hint=f"wait for it (`sparsek-remote run --resume {holder}`), or cancel it")
