"""A job over every GPU of a host: one runner subprocess per GPU, one bundle merged.

The parent plans which items each GPU runs (``shard.plan``), starts one
``python -m sparsek.runner --only ...`` per GPU, pinned to it (``gpus.Worker.env``),
with its sub-bundle in ``<out>/.shards/gpu<k>/``, relays their progress, and merges
what they wrote into ``<out>`` (``merge.merge_into``). The parent itself never uses a
GPU. A worker that dies, is killed, overruns the job's time or leaves a bundle that
does not validate loses its own items only: they are recorded as errors naming the
GPU and the ``--only`` that runs them again, and listed in the ``done`` event.

Workers stay in the parent's process group, so whatever stops the parent's group
(the host's job script, a local timeout) stops them too; a TERM to the parent alone
stops them before it exits.

Events, on top of the runner's (``case_*`` renumbered over the whole run, every
worker event tagged with ``"gpu"``; workers' own start and done are not relayed)::

    {"event": "start", "run_id": ..., "device": ..., "total": N, "gpus": [k, ...]}
    {"event": "worker_start", "gpu": k, "pid": int, "items": ["case/impl", ...],
     "estimated_s": float}
    {"event": "worker_done", "gpu": k, "ok": bool, "seconds": float, "error": str | null}
    {"event": "done", "failed": [...], "counts": {...}, "lost": ["case/impl", ...]}
"""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sparsek.runner import events
from sparsek.runner.bundle import prepare_out_dir
from sparsek.runner.events import EventSink
from sparsek.runner.execute import close_log, open_log
from sparsek.runner.gpus import Worker
from sparsek.runner.merge import SHARDS_FOLDER, Merged, ShardOutcome, merge_into
from sparsek.runner.relay import Relay, WorkerProcess, child_env
from sparsek.runner.shard import Shard, estimate_seconds, plan, select_items
from sparsek_remote.artifacts import validate_bundle
from sparsek_remote.errors import BundleError, ConfigError
from sparsek_remote.jobspec import JobSpec
from sparsek_remote.schema import RUN_ID_PATTERN

_POLL_S = 0.1
_STOP_GRACE_S = 10.0
# The job's time budget also covers merging and, on a host, fetching: workers get
# most of it but not all.
_MERGE_SHARE = 0.05
_MERGE_MIN_S = 30.0


@dataclass(frozen=True)
class MultiRun:
    """One job over several workers. ``worker_args`` go to every worker's command
    line (device, git commit, image digest, ncu path); ``only`` limits the items."""

    job: JobSpec
    job_file: Path
    out: Path
    run_id: str
    host_alias: str
    device: str
    workers: tuple[Worker, ...]
    worker_args: tuple[str, ...] = ()
    only: tuple[str, ...] | None = None


def run_multi(run: MultiRun, on_event: EventSink | None = None) -> Merged:
    """Run ``run.job`` over ``run.workers`` and write the merged bundle to ``run.out``.
    ConfigError for bad arguments (before anything is written), RunnerError when no
    worker left a bundle; lost items otherwise end up in the result."""
    _check_arguments(run)
    shards = _plan(run)
    out = prepare_out_dir(run.out).resolve()
    (out / SHARDS_FOLDER).mkdir()
    relay = Relay(on_event or (lambda event: None))
    log, handler, previous_level = open_log(out)
    try:
        _log_plan(log, run, shards)
        relay.emit(events.start(run.run_id, run.device, sum(len(s.items) for s in shards))
                   | {"gpus": [run.workers[s.worker].number for s in shards]})
        started = time.monotonic()
        outcomes = _run_workers(run, shards, out, relay, log)
        _log_outcomes(log, outcomes, time.monotonic() - started)
    finally:
        close_log(log, handler, previous_level)
    merged = merge_into(out, run.job, run.run_id, outcomes)
    relay.emit(events.done(list(merged.results.results)) | {"lost": [x.item for x in merged.lost]})
    return merged


def _check_arguments(run: MultiRun) -> None:
    if not re.fullmatch(RUN_ID_PATTERN, run.run_id):
        raise ConfigError(f"run id {run.run_id!r} does not have the form of a run id",
                          hint="expected YYYYMMDDTHHMMSSZ-<job name>-<6 hex digits>")
    if not run.workers:
        raise ConfigError("a multi-GPU run needs at least one worker")


def _plan(run: MultiRun) -> list[Shard]:
    """Shards of the items (``--only`` applied first); workers left idle get none."""
    items = select_items(run.job, run.only)
    shards = plan(items, len(run.workers),
                  lambda item: estimate_seconds(run.job, item, run.device))
    return [s for s in shards if s.items]


def _log_plan(log: logging.Logger, run: MultiRun, shards: list[Shard]) -> None:
    log.info("run %s: job %s on host %s over %d workers (%s)", run.run_id, run.job.name,
             run.host_alias, len(shards),
             ", ".join(run.workers[s.worker].label for s in shards))
    for shard in shards:
        log.info("%s: %d items, estimated %.1f s: %s", run.workers[shard.worker].label,
                 len(shard.items), shard.estimated_s,
                 ", ".join(i.label for i in shard.items))


def _log_outcomes(log: logging.Logger, outcomes: list[ShardOutcome], wall_s: float) -> None:
    for outcome in outcomes:
        if outcome.failure:
            log.error("%s lost %s: %s", outcome.worker.label,
                      ", ".join(i.label for i in outcome.shard.items), outcome.failure)
        else:
            log.info("%s: done in %.1f s (estimated %.1f s)", outcome.worker.label,
                     outcome.seconds, outcome.shard.estimated_s)
    slowest = max(outcomes, key=lambda o: o.seconds)
    log.info("all workers ended after %.1f s; the slowest was %s", wall_s,
             slowest.worker.label)


def _run_workers(run: MultiRun, shards: list[Shard], out: Path, relay: Relay,
                 log: logging.Logger) -> list[ShardOutcome]:
    limit_s = max(1.0, run.job.timeouts.job_s
                  - max(_MERGE_MIN_S, _MERGE_SHARE * run.job.timeouts.job_s))
    procs: list[WorkerProcess] = []
    with _stopped_on_exit(procs):
        for shard in shards:
            procs.append(_start(run, shard, out, relay))
            log.info("%s: started, pid %d", procs[-1].worker.label, procs[-1].pid)
        _wait(procs, time.monotonic() + limit_s, limit_s, log)
    return [_outcome(run, proc, relay) for proc in procs]


def _start(run: MultiRun, shard: Shard, out: Path, relay: Relay) -> WorkerProcess:
    worker = run.workers[shard.worker]
    folder = out / SHARDS_FOLDER / worker.folder
    only = [arg for item in shard.items for arg in ("--only", item.label)]
    argv = [sys.executable, "-m", "sparsek.runner", "--job", str(run.job_file.resolve()),
            "--out", str(folder), "--run-id", run.run_id, "--host-alias", run.host_alias,
            *run.worker_args, *only]
    proc = WorkerProcess.start(worker, shard, folder, argv, child_env(worker.env), relay)
    relay.emit({"event": "worker_start", "gpu": worker.number, "pid": proc.pid,
                "items": [i.label for i in shard.items],
                "estimated_s": round(shard.estimated_s, 3)})
    return proc


def _wait(procs: list[WorkerProcess], deadline: float, limit_s: float,
          log: logging.Logger) -> None:
    """Until every worker has ended; one still running at ``deadline`` is stopped."""
    while any(p.returncode is None for p in procs):
        for proc in procs:
            if proc.returncode is None and proc.stop_sent is None and time.monotonic() > deadline:
                log.error("%s: still running after %.0f s; stopping it", proc.worker.label,
                          limit_s)
                proc.request_stop(timed_out=True, limit_s=limit_s)
            proc.kill_if_late(_STOP_GRACE_S)
        time.sleep(_POLL_S)
    for proc in procs:
        proc.join_streams()


@contextlib.contextmanager
def _stopped_on_exit(procs: list[WorkerProcess]) -> Iterator[None]:
    """Stop every worker still running when the parent leaves early: an error, an
    interrupt, or a TERM (turned into SystemExit here, so that this cleanup runs)."""
    previous = None
    with contextlib.suppress(ValueError):  # not the main thread: leave TERM alone
        previous = signal.signal(signal.SIGTERM, _exit_on_term)
    try:
        yield
    except BaseException:
        _restore(previous)
        previous = None
        _stop_all(procs)
        raise
    finally:
        _restore(previous)


def _restore(handler: object) -> None:
    if handler is not None:
        signal.signal(signal.SIGTERM, handler)  # type: ignore[arg-type]


def _stop_all(procs: list[WorkerProcess]) -> None:
    for proc in procs:
        proc.request_stop()
    while any(p.returncode is None for p in procs):
        for proc in procs:
            proc.kill_if_late(_STOP_GRACE_S)
        time.sleep(_POLL_S)


def _exit_on_term(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _outcome(run: MultiRun, proc: WorkerProcess, relay: Relay) -> ShardOutcome:
    failure, bundle = proc.failure(), None
    if failure is None:
        try:
            bundle = validate_bundle(proc.folder, expected_run_id=run.run_id,
                                     expected_host=run.host_alias)
        except BundleError as err:
            failure = f"its bundle was refused: {err.reason}"
    relay.finish_worker(proc.worker.number, [i.label for i in proc.shard.items],
                        failure is None)
    relay.emit({"event": "worker_done", "gpu": proc.worker.number, "ok": failure is None,
                "seconds": round(proc.seconds, 3), "error": failure})
    return ShardOutcome(proc.worker, proc.shard, proc.folder, bundle, failure, proc.seconds,
                        proc.stderr_tail())
