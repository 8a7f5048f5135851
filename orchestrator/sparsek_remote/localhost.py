"""The built-in ``local`` target: the benchmark runner as a subprocess of this machine.

The runner is the same program that runs inside the image on a docker host or in a
virtualenv on a bare host; here it runs with this interpreter. Its progress events
arrive as JSON lines on stdout; its log goes to stderr and into the bundle.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparsek_remote.errors import ConfigError, RunnerError
from sparsek_remote.gpuspec import ALL, canonical_gpu_spec

Event = dict[str, Any]
EventSink = Callable[[Event], None]

LOG_TAIL_LINES = 40
# Variables never passed to the runner: it needs none of the orchestrator's settings,
# and credentials must not reach a process that writes logs into a bundle.
_WITHHELD_PREFIXES = ("SPARSEK_",)


@dataclass(frozen=True)
class RunnerInvocation:
    """What the runner is told: the job (as JSON on disk), where to write, and which
    GPUs to spread it over (``gpuspec``; every GPU unless the settings say otherwise)."""

    job_file: Path
    out_dir: Path
    run_id: str
    host_alias: str
    device: str = "auto"
    git_commit: str | None = None
    git_dirty: bool | None = None
    gpus: str = ALL

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "gpus", canonical_gpu_spec(self.gpus))
        except ValueError as exc:
            raise ConfigError(f"gpus: {exc}") from None

    def argv(self, python: str = sys.executable) -> list[str]:
        args = [python, "-m", "sparsek.runner", "--job", str(self.job_file),
                "--out", str(self.out_dir), "--run-id", self.run_id,
                "--host-alias", self.host_alias, "--device", self.device]
        # A CPU run has no GPU to choose, and the runner refuses a count or list there.
        if self.device != "cpu":
            args += ["--gpus", self.gpus]
        if self.git_commit:
            args += ["--git-commit", self.git_commit]
        if self.git_dirty is not None:
            args += ["--git-dirty", "1" if self.git_dirty else "0"]
        return args


@dataclass(frozen=True)
class LocalRunResult:
    bundle_dir: Path
    returncode: int
    log_tail: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def run_local(invocation: RunnerInvocation, *, timeout_s: float,
              on_event: EventSink | None = None) -> LocalRunResult:
    """Run the runner to completion; raise RunnerError if it fails or overruns."""
    proc = subprocess.Popen(
        invocation.argv(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=_runner_environment(), start_new_session=True, bufsize=1,
    )
    tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
    stderr_reader = threading.Thread(target=_drain, args=(proc.stderr, tail), daemon=True)
    stderr_reader.start()
    timer = threading.Timer(timeout_s, _kill_group, args=(proc,))
    timer.start()
    try:
        _read_events(proc, on_event or (lambda _e: None))
        returncode = proc.wait()
    except BaseException:
        _kill_group(proc)
        raise
    finally:
        timer.cancel()
        stderr_reader.join(timeout=5)
    log_tail = "\n".join(tail)
    if returncode != 0:
        overran = returncode in (-signal.SIGKILL, 128 + signal.SIGKILL)
        raise RunnerError(
            "the runner overran the job's timeout and was stopped" if overran
            else "the runner failed", returncode=returncode, log_tail=log_tail,
            hint="raise timeouts.job_s in the job file" if overran else None,
        )
    return LocalRunResult(invocation.out_dir, returncode, log_tail)


def _runner_environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_WITHHELD_PREFIXES)}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _read_events(proc: subprocess.Popen, on_event: EventSink) -> None:
    assert proc.stdout is not None  # set by Popen(stdout=PIPE)
    for line in proc.stdout:
        line = line.strip()
        if not line:
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue  # stray output from a library; the log keeps it
        if isinstance(event, dict) and isinstance(event.get("event"), str):
            on_event(event)


def _drain(stream: Any, tail: collections.deque[str]) -> None:
    for line in stream:
        tail.append(line.rstrip("\n"))


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
            os.killpg(proc.pid, signal.SIGKILL)
