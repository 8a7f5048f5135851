"""Command line of the runner: ``python -m sparsek.runner --job JOB.json --out DIR ...``.

stdout carries only progress events (JSON lines); people read stderr and runner.log.
Exit status 0 means the bundle was written, whatever the verdicts inside it; any
other status means there is no complete bundle, and stderr says why.

``--gpus all`` (or a count, or indices) spreads the job over that many GPUs, one
runner per GPU, into one merged bundle (see ``multi``); ``--workers N`` does the same
with N CPU stand-ins. Where there is nothing to spread over (``all`` on a CPU run or a
host with one GPU, or one GPU chosen), the job runs in this process as with the
default ``--gpus 1``. Items a failed GPU lost are errors in the bundle, listed in the
``done`` event and on stderr with the ``--only`` that runs them again; the exit
status stays 0, since the other GPUs' results are in the bundle.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import TextIO

from sparsek.runner import gpus
from sparsek.runner.events import EventSink, json_lines
from sparsek.runner.execute import LOGGER_NAME, resolve_device, run_job
from sparsek.runner.merge import LostItem
from sparsek.runner.multi import MultiRun, run_multi
from sparsek_remote.errors import ConfigError, RunnerError, SparsekRemoteError
from sparsek_remote.gpuspec import ALL, gpu_spec_text
from sparsek_remote.jobspec import JobSpec, parse_job

PROG = "python -m sparsek.runner"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    events_stream = _claim_stdout()
    _log_to_stderr()
    try:
        job = read_job(args.job)
        requested = job.device if args.device == "auto" else args.device
        chosen = _choose_gpus(args, requested)
        device = resolve_device(requested)
        interpret_triton_on_cpu(device)
        if _spreads(args, device, chosen):
            _run_spread(args, job, device, chosen, json_lines(events_stream))
        else:
            run_job(job, args.out, run_id=args.run_id, host_alias=args.host_alias,
                    device=device, git_commit=args.git_commit,
                    git_dirty=None if args.git_dirty is None else args.git_dirty == "1",
                    image_digest=args.image_digest, on_event=json_lines(events_stream),
                    ncu_path=args.ncu, only=args.only)
    except SparsekRemoteError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        print(f"{PROG}: error: the runner failed: {type(exc).__name__}: {exc}\n"
              "  hint: no complete bundle was written; the traceback above says where",
              file=sys.stderr)
        return RunnerError.exit_code
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Run a sparsek-remote job: "
                                     "correctness gate, then timing, into a result bundle.")
    parser.add_argument("--job", required=True, type=Path, help="the job as JSON")
    parser.add_argument("--out", required=True, type=Path,
                        help="bundle folder; must not exist or be empty")
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--host-alias", required=True,
                        help="the host's name in results (never its address)")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                        help="auto (default) follows the job's device field")
    parser.add_argument("--git-commit", default=None)
    parser.add_argument("--git-dirty", choices=["0", "1"], default=None)
    parser.add_argument("--image-digest", default=None)
    parser.add_argument("--ncu", default=None, metavar="PATH",
                        help="the Nsight Compute CLI, when the job's ncu policy is on "
                             "(default: ncu on PATH, then the usual install folders)")
    parser.add_argument("--only", action="append", default=None, metavar="CASE/IMPL",
                        help="run only this item (repeatable), e.g. one a failed GPU lost")
    parser.add_argument("--gpus", type=gpus.parse_spec, default=1, metavar="all|N|I,J,...",
                        help="spread the items over all GPUs, the first N, or those "
                             "indices (as nvidia-smi numbers them; '3,' is GPU 3 alone), "
                             "one runner per GPU; one GPU chosen runs in this process, "
                             "pinned to it, and 'all' on a CPU run runs in this process; "
                             "default 1: this process, its default GPU")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="spread the items over N CPU stand-in runners (no GPU)")
    return parser


def _choose_gpus(args: argparse.Namespace, requested: str) -> list[gpus.Worker]:
    """The GPUs ``--gpus`` chose, found before PyTorch starts CUDA (``resolve_device``
    does). One chosen GPU is used by this process itself, pinned the way a worker is:
    CUDA reads CUDA_VISIBLE_DEVICES once, when it starts, so the pin must come first,
    and this saves the subprocess and the merge that a worker would cost."""
    if args.workers is not None:
        return []
    log = logging.getLogger(LOGGER_NAME)
    chosen, why_none = gpus.place(args.gpus, requested)
    if why_none is not None:
        log.info("--gpus all: no GPU listed (%s); the job runs in this process on its "
                 "default device", why_none)
    if len(chosen) == 1:
        os.environ.update(chosen[0].env)
        log.info("--gpus %s chose %s alone; the job runs in this process, pinned to it "
                 "(%s)", gpu_spec_text(args.gpus), chosen[0].label,
                 " ".join(f"{k}={os.environ[k]}" for k in sorted(chosen[0].env)))
    return chosen


def _spreads(args: argparse.Namespace, device: str, chosen: list[gpus.Worker]) -> bool:
    """Whether the job goes to worker processes. ``--gpus all`` stays in this process
    where there is nothing to spread it over: a CPU run, or a host with one GPU; any
    other choice of GPUs on a CPU run goes on to be refused by ``_run_spread``."""
    if args.workers is not None:
        return True
    if device == "cpu":
        return args.gpus not in (1, ALL)
    return len(chosen) > 1


def _run_spread(args: argparse.Namespace, job: JobSpec, device: str,
                chosen: list[gpus.Worker], emit: EventSink) -> None:
    """The job over several runners (GPUs, or CPU stand-ins), into one bundle."""
    if args.workers is not None and args.gpus != 1:
        raise ConfigError("--gpus and --workers exclude each other",
                          hint="--gpus on a GPU host, --workers for CPU stand-ins")
    if args.workers is not None and device != "cpu":
        raise ConfigError("--workers starts CPU stand-ins, but this run's device is "
                          f"{device}", hint="use --gpus on a GPU host, or --device cpu")
    if args.workers is None and device != "cuda":
        raise ConfigError(f"--gpus spreads a job over GPUs, but this run's device is {device}",
                          hint="use --workers N for CPU stand-ins")
    workers = gpus.cpu_workers(args.workers) if args.workers is not None else chosen
    passed = ["--device", device]
    for flag, value in (("--git-commit", args.git_commit), ("--git-dirty", args.git_dirty),
                        ("--image-digest", args.image_digest), ("--ncu", args.ncu)):
        passed += [flag, value] if value is not None else []
    merged = run_multi(MultiRun(job=job, job_file=args.job, out=args.out, run_id=args.run_id,
                                host_alias=args.host_alias, device=device,
                                workers=tuple(workers), worker_args=tuple(passed),
                                only=None if args.only is None else tuple(args.only)), emit)
    if merged.lost:
        _report_lost(merged.lost)


def _report_lost(lost: tuple[LostItem, ...]) -> None:
    by_worker: dict[str, list[str]] = {}
    for item in lost:
        by_worker.setdefault(item.worker, []).append(item.item)
    for worker, items in by_worker.items():
        reason = next(x.reason for x in lost if x.worker == worker)
        print(f"{PROG}: {worker} lost {len(items)} item(s): {reason}\n  they are errors in "
              f"the bundle; re-run them alone with: "
              + " ".join(f"--only {item}" for item in items), file=sys.stderr)


def _claim_stdout() -> TextIO:
    """Keep the real stdout for events alone and send file descriptor 1 to stderr, so
    whatever a library prints cannot break the event stream."""
    sys.stdout.flush()
    events_fd = os.dup(1)
    os.dup2(2, 1)
    return os.fdopen(events_fd, "w", encoding="utf-8", buffering=1)


def _log_to_stderr() -> None:
    handler = logging.StreamHandler(sys.stderr)
    formatter = logging.Formatter("%(asctime)sZ %(levelname)-7s %(message)s",
                                  datefmt="%Y-%m-%dT%H:%M:%S")
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    log = logging.getLogger(LOGGER_NAME)
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def read_job(path: Path) -> JobSpec:
    """The job from its JSON form (as the orchestrator writes it); ConfigError or
    JobSpecError naming the file when it cannot be read or is not a valid job."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read the job file {path}: {exc.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"the job file {path} is not JSON: {exc}",
                          hint="the runner reads the JSON form of a job "
                               "(JobSpec.model_dump_json)") from None
    return parse_job(data, source=str(path))


def interpret_triton_on_cpu(device: str) -> None:
    # Triton kernels run on the CPU only through its interpreter, chosen when the
    # kernels are defined; set it before they are imported, unless the caller chose.
    if device == "cpu" and "TRITON_INTERPRET" not in os.environ:
        os.environ["TRITON_INTERPRET"] = "1"
        logging.getLogger(LOGGER_NAME).info("device cpu: Triton kernels run in its "
                                            "interpreter (TRITON_INTERPRET=1)")
