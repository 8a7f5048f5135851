"""Run a job, or one case of it, and write the result bundle.

``run_case`` is the single code path for a measurement: the job runner and the
kernels' benchmark script both call it, so a number printed on a developer's screen
and a number in a bundle are made the same way, gate first.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import time
import traceback
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError

from sparsek.runner import cardstate, events
from sparsek.runner.bundle import prepare_out_dir, write_manifest, write_results
from sparsek.runner.cardstate import CardReader
from sparsek.runner.ceilings import measure_ceilings
from sparsek.runner.events import EventSink
from sparsek.runner.gate import check
from sparsek.runner.implementations import BackendUnavailable, prepare
from sparsek.runner.inputs import make_inputs
from sparsek.runner.metrics import case_bytes, case_flops, rates
from sparsek.runner.ncu import profile_results
from sparsek.runner.provenance import collect
from sparsek.runner.rotation import rotation_calls
from sparsek.runner.shard import WorkItem, select_items
from sparsek.runner.timing import measure, peak_extra_memory
from sparsek_remote.errors import ConfigError, RunnerError
from sparsek_remote.jobspec import Case, JobSpec, SdpaImpl, SparsekImpl
from sparsek_remote.schema import (
    LOG_NAME,
    RUN_ID_PATTERN,
    SCHEMA_VERSION,
    CaseResult,
    Gate,
    Provenance,
    Results,
)

LOGGER_NAME = "sparsek.runner"
_ERROR_TEXT_LIMIT = 2000
_LOG_FORMAT = "%(asctime)sZ %(levelname)-7s %(message)s"


def resolve_device(requested: str) -> str:
    """"auto" -> cuda when PyTorch sees a GPU, else cpu; an explicit "cuda" must exist."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RunnerError(
            f"device cuda was asked for, but PyTorch {torch.__version__} sees no CUDA device",
            hint="check the driver (nvidia-smi), the container's GPU access (--gpus all) and "
                 "that torch is a CUDA build; or ask for device cpu",
        )
    if requested not in ("cuda", "cpu"):
        raise ConfigError(f"unknown device {requested!r}", hint="use auto, cuda or cpu")
    return requested


@dataclass
class _Progress:
    """How far a case got: an error names its stage and keeps a gate that passed."""

    stage: str = "making the inputs"
    gate: Gate | None = None


def run_case(job: JobSpec, case: Case, impl: SparsekImpl | SdpaImpl, device: str,
             log: logging.Logger, *, card: CardReader | None = None) -> CaseResult:
    """Gate, then time, one implementation on one case, on ``device`` ("cuda" or "cpu",
    as ``resolve_device`` gives). Never raises for a failure of the case itself (it
    becomes status "error", a backend absent here "skipped"), so one bad case never
    loses a job; ``log`` gets the verdict and any traceback. ``card`` reads the card's
    state around the timing (default: a reader opened for this case alone)."""
    base = {"case": case.name, "implementation": impl.label, "input_seed": case.seed,
            "flops": float(case_flops(case, impl)), "bytes": float(case_bytes(case, impl))}
    progress = _Progress()
    own_card = card is None
    reader = cardstate.open_reader(device, _nvml_index(device)) if own_card else card
    try:
        result = _gate_then_time(job, case, impl, device, log, base, progress, reader)
    except BackendUnavailable as exc:
        result = CaseResult(status="skipped", error=str(exc), **base)
    except Exception as exc:
        log.error("%s/%s failed during %s:\n%s", case.name, impl.label, progress.stage,
                  traceback.format_exc().rstrip())
        result = CaseResult(status="error", gate=progress.gate,
                            error=_error_text(exc, progress.stage), **base)
    finally:
        if own_card:
            reader.close()
    _log_verdict(log, result)
    return result


def _gate_then_time(job: JobSpec, case: Case, impl: SparsekImpl | SdpaImpl, device: str,
                    log: logging.Logger, base: dict, progress: _Progress,
                    card: CardReader) -> CaseResult:
    inputs = make_inputs(case, device)
    progress.stage = "preparing the implementation"
    prepared = prepare(impl, case, inputs, device, log)
    progress.stage = "the correctness gate"
    gate = check(job.correctness, case, impl, prepared, inputs, log)
    progress.gate = gate
    if not gate.passed:
        return CaseResult(status="gate_failed", gate=gate, **base)
    progress.stage = "copying the inputs for rotation"
    rotation = rotation_calls(impl, case, inputs, device, job.timing)
    progress.stage = "timing"
    before = card.read()
    timing = measure(prepared.call, job.timing, device, rotation=rotation)
    after = card.read()
    del rotation
    throttled, why = cardstate.throttle_verdict(before, after)
    progress.stage = "measuring memory"
    peak = peak_extra_memory(prepared.call, device)
    tflops, gbps = rates(int(base["flops"]), int(base["bytes"]), timing.stats.median_ms)
    return CaseResult(status="ok", gate=gate, timing=timing, tflops=tflops, gbps=gbps,
                      peak_extra_memory_bytes=peak, card_before=before, card_after=after,
                      throttled=throttled, throttle_detail=why, **base)


def _nvml_index(device: str) -> int:
    """NVML's number for the current GPU, which differs from CUDA's under
    CUDA_VISIBLE_DEVICES; 0 when PyTorch cannot say."""
    if device != "cuda":
        return 0
    try:
        return int(torch.cuda._get_nvml_device_index(torch.cuda.current_device()))
    except (AttributeError, RuntimeError, ValueError):
        return 0


def _error_text(exc: BaseException, stage: str) -> str:
    text = f"during {stage}: {type(exc).__name__}: {exc}"
    if len(text) > _ERROR_TEXT_LIMIT:
        text = text[:_ERROR_TEXT_LIMIT] + " ... (truncated; runner.log has all of it)"
    return text


def _log_verdict(log: logging.Logger, result: CaseResult) -> None:
    name = f"{result.case}/{result.implementation}"
    if result.status == "ok" and result.timing is not None and result.gate is not None:
        timing, stats = result.timing, result.timing.stats
        log.info("%s: ok, median %.4f ms [95%% CI %.4f, %.4f] over %d samples (%s, stop: %s, "
                 "%d input set(s)), rel_error %.2e", name, stats.median_ms, stats.ci95_low_ms,
                 stats.ci95_high_ms, stats.n, timing.method, timing.stop_reason,
                 timing.rotation_sets, result.gate.rel_error)
        if timing.graph_fallback:
            log.warning("%s: %s", name, timing.graph_fallback)
        if result.throttled:
            log.warning("%s: THROTTLED during the timing: %s", name, result.throttle_detail)
    elif result.status == "gate_failed" and result.gate is not None:
        log.warning("%s: GATE FAILED, not timed: %s", name, result.gate.message)
    elif result.status == "skipped":
        log.info("%s: skipped: %s", name, result.error)
    else:
        log.error("%s: error: %s", name, result.error)


def run_job(job: JobSpec, out_dir: Path | str, *, run_id: str, host_alias: str,
            device: str = "auto", git_commit: str | None = None, git_dirty: bool | None = None,
            image_digest: str | None = None, on_event: EventSink | None = None,
            ncu_path: str | None = None, only: Collection[str] | None = None) -> Results:
    """Run every (case, implementation) pair of ``job`` and write the bundle to ``out_dir``.

    ``device`` "auto" defers to the job's own ``device`` field (itself "auto" by
    default: the GPU when there is one). Raises ConfigError for bad arguments or a
    non-empty ``out_dir`` and RunnerError when the job cannot run at all; a failure of
    one case is recorded in its result instead. After every pair is timed, the pairs
    the job's ncu policy names are profiled with Nsight Compute (``ncu_path``, or
    found on PATH). ``only`` (``CASE/IMPL`` names) runs just those pairs, in job
    order. The manifest is written last.
    """
    emit = on_event or (lambda event: None)
    _check_run_id(run_id)
    items = select_items(job, only)
    resolved = resolve_device(job.device if device == "auto" else device)
    provenance = _provenance(resolved, host_alias, git_commit, git_dirty, image_digest)
    folder = prepare_out_dir(Path(out_dir))
    log, handler, previous_level = open_log(folder)
    try:
        card = cardstate.open_reader(resolved, _nvml_index(resolved))
        try:
            provenance = provenance.model_copy(update={"card": card.read()})
            _log_start(log, run_id, job, provenance)
            ceilings = (measure_ceilings(resolved, {c.dtype for c in job.cases}, log)
                        if job.timing.measure_ceilings else None)
            pairs = _run_pairs(job, items, resolved, log, emit, run_id, card)
        finally:
            card.close()
        if job.ncu.enabled:
            _release_memory(resolved)
            pairs = profile_results(job, pairs, folder, resolved, log, emit, ncu_path=ncu_path)
        results = Results(schema_version=SCHEMA_VERSION, run_id=run_id, results=pairs,
                          ceilings=ceilings)
        write_results(folder, results)
        log.info("results written; %s", events.done(results.results)["counts"])
    finally:
        close_log(log, handler, previous_level)
    write_manifest(folder, run_id=run_id, job=job, provenance=provenance)
    emit(events.done(results.results))
    return results


def _log_start(log: logging.Logger, run_id: str, job: JobSpec, where: Provenance) -> None:
    log.info("run %s: job %s on host %s", run_id, job.name, where.host_alias)
    log.info("device %s: %s (count %d, compute capability %s, driver %s, CUDA %s)",
             where.device, where.device_name, where.device_count, where.compute_capability,
             where.driver_version, where.cuda_version)
    log.info("python %s, torch %s, triton %s, sparsek-remote %s, commit %s%s", where.python_version,
             where.torch_version, where.triton_version, where.package_version, where.git_commit,
             " (dirty)" if where.git_dirty else "")
    if where.card is not None:
        c = where.card
        log.info("card (%s): SM %s MHz of %s, memory %s MHz, %s C, %s W of %s W, reasons %s%s",
                 c.source, c.sm_clock_mhz, c.max_sm_clock_mhz, c.memory_clock_mhz,
                 c.temperature_c, c.power_w, c.power_limit_w, c.throttle_reasons or "none",
                 f" ({c.note})" if c.note else "")
    if where.device == "cpu":
        # Timings here are CPU wall-clock times; say how Triton ran, since that decides
        # whether the Triton cases can run at all.
        log.info("CPU run: wall-clock timing; TRITON_INTERPRET=%s",
                 os.environ.get("TRITON_INTERPRET", "(unset)"))


def _run_pairs(job: JobSpec, items: list[WorkItem], device: str, log: logging.Logger,
               emit: EventSink, run_id: str, card: CardReader) -> list[CaseResult]:
    pairs = [(item.case, item.impl) for item in items]
    emit(events.start(run_id, device, len(pairs)))
    results = []
    for index, (case, impl) in enumerate(pairs):
        emit(events.case_start(case.name, impl.label, index, len(pairs)))
        log.info("[%d/%d] %s/%s: B%d Hq%d Hkv%d S%d D%d %s %s K=%d W=%d seed %d", index + 1,
                 len(pairs), case.name, impl.label, case.B, case.Hq, case.Hkv, case.S, case.D,
                 case.dtype, "causal" if case.causal else "non-causal", case.kv_budget,
                 case.window, case.seed)
        result = run_case(job, case, impl, device, log, card=card)
        _release_memory(device)
        results.append(result)
        emit(events.case_done(result, index, len(pairs)))
    return results


def _release_memory(device: str) -> None:
    # Cases differ in shape; handing cached blocks back keeps one large case from
    # fragmenting the allocator for the next, and its peak from inflating the next's.
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _check_run_id(run_id: str) -> None:
    if not re.fullmatch(RUN_ID_PATTERN, run_id):
        raise ConfigError(f"run id {run_id!r} does not have the form of a run id",
                          hint="expected YYYYMMDDTHHMMSSZ-<job name>-<6 hex digits>")


def _provenance(device: str, host_alias: str, git_commit: str | None, git_dirty: bool | None,
                image_digest: str | None) -> Provenance:
    try:
        return collect(device, host_alias=host_alias, git_commit=git_commit,
                       git_dirty=git_dirty, image_digest=image_digest)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
            for err in exc.errors(include_input=False, include_url=False)
        )
        raise ConfigError(f"the run's identity arguments are not valid: {problems}",
                          hint="host alias: lower-case letters, digits, '-' and '_'; git "
                               "commit: 7-40 hex digits; image digest: sha256:<64 hex>") from None


def open_log(folder: Path) -> tuple[logging.Logger, logging.Handler, int]:
    """The runner's logger, writing to ``folder``'s log at INFO; ``close_log`` undoes it."""
    log = logging.getLogger(LOGGER_NAME)
    handler = logging.FileHandler(folder / LOG_NAME, encoding="utf-8")
    formatter = logging.Formatter(_LOG_FORMAT, datefmt="%Y-%m-%dT%H:%M:%S")
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    previous = log.level
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    return log, handler, previous


def close_log(log: logging.Logger, handler: logging.Handler, previous_level: int) -> None:
    log.removeHandler(handler)
    handler.close()
    log.setLevel(previous_level)
