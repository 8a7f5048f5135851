"""Command line of the runner: ``python -m sparsek.runner --job JOB.json --out DIR ...``.

stdout carries only progress events (JSON lines); people read stderr and runner.log.
Exit status 0 means the bundle was written, whatever the verdicts inside it; any
other status means there is no complete bundle, and stderr says why.
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

from sparsek.runner.events import json_lines
from sparsek.runner.execute import LOGGER_NAME, resolve_device, run_job
from sparsek_remote.errors import ConfigError, RunnerError, SparsekRemoteError
from sparsek_remote.jobspec import JobSpec, parse_job

PROG = "python -m sparsek.runner"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    events_stream = _claim_stdout()
    _log_to_stderr()
    try:
        job = read_job(args.job)
        device = resolve_device(job.device if args.device == "auto" else args.device)
        interpret_triton_on_cpu(device)
        run_job(job, args.out, run_id=args.run_id, host_alias=args.host_alias, device=device,
                git_commit=args.git_commit,
                git_dirty=None if args.git_dirty is None else args.git_dirty == "1",
                image_digest=args.image_digest, on_event=json_lines(events_stream),
                ncu_path=args.ncu)
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
    return parser


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
