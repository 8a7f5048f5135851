"""The parent's side of its workers: each worker process, its two output streams, and
one event stream made of all of theirs.

A worker's stdout carries its events (JSON lines); they are relayed tagged with the
worker's GPU, with ``case_*`` indices renumbered over the whole run so that a
progress bar reading them sees one job. Its stderr is passed on line by line, each
prefixed with the worker's label, and its last lines are kept for the error of a
worker that fails.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import sparsek
import sparsek_remote
from sparsek.runner import events
from sparsek.runner.events import Event, EventSink
from sparsek.runner.gpus import Worker
from sparsek.runner.shard import Shard

_TAIL_LINES = 40
_JOIN_S = 5.0
_stderr_lock = threading.Lock()


class Relay:
    """One thread-safe event stream for the parent and all its workers."""

    def __init__(self, sink: EventSink) -> None:
        self._sink = sink
        self._lock = threading.Lock()
        self._total = 0
        self._next = 0
        self._index: dict[tuple[int, str], int] = {}
        self._done: set[tuple[int, str]] = set()

    def emit(self, event: Event) -> None:
        with self._lock:
            if event.get("event") == "start":
                self._total = int(event.get("total", 0))
            self._sink(event)

    def worker_event(self, number: int, event: Event) -> None:
        """Relay one event of worker ``number``; its own start and done are the
        parent's to tell."""
        kind = event.get("event")
        if kind in ("start", "done"):
            return
        event = {**event, "gpu": number}
        item = f"{event.get('case')}/{event.get('implementation')}"
        with self._lock:
            if kind in ("case_start", "case_done"):
                event["index"] = self._global_index(number, item)
                event["total"] = self._total
            if kind == "case_done":
                self._done.add((number, item))
            self._sink(event)

    def finish_worker(self, number: int, items: list[str], ok: bool) -> None:
        """For a worker that failed, a ``case_done`` with status "error" for each of its
        items it never reported, so that the run's count of finished items adds up."""
        if ok:
            return
        with self._lock:
            for item in items:
                if (number, item) in self._done:
                    continue
                case, _, implementation = item.partition("/")
                lost = events.case_lost(case, implementation,
                                        self._global_index(number, item), self._total)
                self._sink({**lost, "gpu": number})
                self._done.add((number, item))

    def _global_index(self, number: int, item: str) -> int:
        key = (number, item)
        if key not in self._index:
            self._index[key] = self._next
            self._next += 1
        return self._index[key]


@dataclass
class WorkerProcess:
    """One running worker and what it has said so far."""

    worker: Worker
    shard: Shard
    folder: Path
    popen: subprocess.Popen
    started: float
    ended: float | None = None
    stop_sent: float | None = None
    timed_out: bool = False
    limit_s: float = 0.0
    threads: list[threading.Thread] = field(default_factory=list)
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=_TAIL_LINES))

    @classmethod
    def start(cls, worker: Worker, shard: Shard, folder: Path, argv: list[str],
              env: dict[str, str], relay: Relay) -> WorkerProcess:
        popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, env=env)
        proc = cls(worker, shard, folder, popen, time.monotonic())
        proc.threads = [
            threading.Thread(target=proc._read_events, args=(popen.stdout, relay), daemon=True),
            threading.Thread(target=proc._read_log, args=(popen.stderr,), daemon=True)]
        for thread in proc.threads:
            thread.start()
        return proc

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        code = self.popen.poll()
        if code is not None and self.ended is None:
            self.ended = time.monotonic()
        return code

    @property
    def seconds(self) -> float:
        return (self.ended or time.monotonic()) - self.started

    def request_stop(self, *, timed_out: bool = False, limit_s: float = 0.0) -> None:
        """Send TERM (once); ``kill_if_late`` follows up. Returns at once, so that many
        workers can be stopped together."""
        if self.stop_sent is not None or self.returncode is not None:
            return
        self.timed_out, self.limit_s = timed_out, limit_s
        self.popen.terminate()
        self.stop_sent = time.monotonic()

    def kill_if_late(self, grace_s: float) -> None:
        """KILL a worker that is still running ``grace_s`` after its TERM."""
        if (self.stop_sent is not None and self.returncode is None
                and time.monotonic() - self.stop_sent > grace_s):
            self.popen.kill()

    def join_streams(self) -> None:
        # A child of the worker (an ncu run) may hold its stderr open a while longer.
        for thread in self.threads:
            thread.join(_JOIN_S)

    def failure(self) -> str | None:
        """Why this worker left no bundle, or None when it says it wrote one."""
        code = self.returncode
        if self.timed_out:
            return (f"it was still running after {self.limit_s:.0f} s (the job's "
                    "timeouts.job_s, less time kept for merging) and was stopped")
        if code == 0:
            return None
        if code is not None and code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else "?"
            return f"its runner was killed by {name} (signal {-code}) after {self.seconds:.0f} s"
        said = next((line for line in reversed(self.tail) if ": error: " in line), "")
        return f"its runner exited with status {code}" + (f" ({said.strip()})" if said else "")

    def stderr_tail(self) -> str:
        return "\n".join(self.tail)

    def _read_events(self, stream: IO[bytes], relay: Relay) -> None:
        for raw in stream:
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            if isinstance(event, dict) and isinstance(event.get("event"), str):
                relay.worker_event(self.worker.number, event)
            elif line:
                self._say(line)

    def _read_log(self, stream: IO[bytes]) -> None:
        for raw in stream:
            self._say(raw.decode("utf-8", errors="replace").rstrip("\n"))

    def _say(self, line: str) -> None:
        self.tail.append(line)
        with _stderr_lock:
            print(f"[{self.worker.label}] {line}", file=sys.stderr, flush=True)


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """This environment plus ``extra``, with the folders this runner's packages were
    imported from first on PYTHONPATH, so a worker imports the same code."""
    env = dict(os.environ)
    roots = [str(Path(pkg.__file__).resolve().parents[1]) for pkg in (sparsek, sparsek_remote)]
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([*roots, *paths]))
    env.update(extra)
    return env
