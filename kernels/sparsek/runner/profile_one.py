"""``python -m sparsek.runner.profile_one``: the process Nsight Compute launches to
profile one implementation on one case of a job.

It gates the case first, as the runner does: a profile, like a timing, only ever
comes from a process whose gate passed. It then warms the call up outside the NVTX
range (compilation, autotuning and first-call set-up are not what is profiled) and
makes exactly one call inside the range, waiting for it before the range closes.

stdout gets one JSON line saying what happened; the exit status is 0 when the call
was made inside the range, 7 when the gate failed, 2 for bad arguments, 4 when the
implementation cannot run here or failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from sparsek.runner.cli import interpret_triton_on_cpu, read_job
from sparsek.runner.execute import resolve_device
from sparsek.runner.gate import check
from sparsek.runner.implementations import BackendUnavailable, prepare
from sparsek.runner.inputs import make_inputs
from sparsek.runner.ncu import NVTX_RANGE, OUTCOME_KEY
from sparsek_remote.errors import ConfigError, GateFailed, RunnerError, SparsekRemoteError
from sparsek_remote.jobspec import Case, JobSpec, SdpaImpl, SparsekImpl

PROG = "python -m sparsek.runner.profile_one"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(levelname)s profile_one: %(message)s")
    log = logging.getLogger("sparsek.runner.profile_one")
    try:
        job = read_job(args.job)
        case, impl = _pick(job, args.case, args.implementation)
        device = resolve_device(args.device)
        interpret_triton_on_cpu(device)
        return _profile(job, case, impl, device, args.range, log)
    except BackendUnavailable as exc:
        _say("unavailable", str(exc))
        return RunnerError.exit_code
    except SparsekRemoteError as exc:
        _say("error", str(exc))
        return exc.exit_code


def _profile(job: JobSpec, case: Case, impl: SparsekImpl | SdpaImpl, device: str,
             range_name: str, log: logging.Logger) -> int:
    inputs = make_inputs(case, device)
    prepared = prepare(impl, case, inputs, device, log)
    gate = check(job.correctness, case, impl, prepared, inputs, log)
    if not gate.passed:
        _say("gate_failed", gate.message)
        return GateFailed.exit_code
    for _ in range(max(1, job.timing.warmup)):
        prepared.call()
    _wait(device)
    with nvtx_range(range_name, device):
        prepared.call()
        _wait(device)
    _say("profiled", f"{case.name}/{impl.label}: one call inside NVTX range {range_name!r}, "
                     f"gate rel_error {gate.rel_error}")
    return 0


@contextmanager
def nvtx_range(name: str, device: str) -> Iterator[None]:
    """A push/pop NVTX range on CUDA (what ``--nvtx-include NAME/`` selects); nothing
    on the CPU, where there are no kernels to profile."""
    if device != "cuda":
        yield
        return
    torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()


def _wait(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _pick(job: JobSpec, case_name: str, label: str) -> tuple[Case, SparsekImpl | SdpaImpl]:
    case = next((c for c in job.cases if c.name == case_name), None)
    impl = next((i for i in job.implementations if i.label == label), None)
    if case is None or impl is None:
        missing = f"case {case_name!r}" if case is None else f"implementation {label!r}"
        raise ConfigError(f"the job has no {missing}",
                          hint="name a case and an implementation label of the job")
    return case, impl


def _say(outcome: str, message: str) -> None:
    print(json.dumps({OUTCOME_KEY: outcome, "message": message}), flush=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Gate, warm up, then make one "
                                     "call inside an NVTX range, for Nsight Compute.")
    parser.add_argument("--job", required=True, type=Path, help="the job as JSON")
    parser.add_argument("--case", required=True)
    parser.add_argument("--implementation", required=True, help="implementation label")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--range", default=NVTX_RANGE, help="NVTX range name")
    return parser


if __name__ == "__main__":
    sys.exit(main())
