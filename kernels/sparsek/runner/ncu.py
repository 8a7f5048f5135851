"""Nsight Compute profiles of timed cases: one process per (case, implementation).

For each pair the job's ncu policy selects and whose gate passed and was timed::

    ncu --nvtx --nvtx-include sparsek-profile/ --clock-control none --cache-control all
        --section SpeedOfLight ... --metrics <KEY_METRICS> --export <bundle>/ncu/<case>/<impl>
        python -m sparsek.runner.profile_one --job J --case C --implementation I --device D

The child gates the case again, warms up outside the range and makes one call inside
it (see profile_one). Then ``ncu --import <report> --csv --page raw --print-units base``
writes the CSV beside the report, and its key metrics go into results.json. A failure
becomes an error on that case and the job goes on; a host where ncu may not read the
counters (ERR_NVGPUCTRPERM) gets the fix named once per case and no further attempts.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import sparsek
import sparsek_remote
from sparsek.runner import events
from sparsek.runner.events import EventSink
from sparsek.runner.ncu_parse import NcuCsvError, parse_export
from sparsek_remote.jobspec import JobSpec, NcuPolicy
from sparsek_remote.schema import CaseResult, NcuResult

NVTX_RANGE = "sparsek-profile"
OUTCOME_KEY = "sparsek_profile_one"
# Collected besides the sections, so the key numbers are there whatever a section
# file of this ncu version holds; all exist on every GPU since Volta.
KEY_METRICS = ("gpu__time_duration.sum", "dram__bytes.sum", "lts__t_sector_hit_rate.pct",
               "sm__warps_active.avg.pct_of_peak_sustained_active",
               "sm__throughput.avg.pct_of_peak_sustained_elapsed",
               "dram__throughput.avg.pct_of_peak_sustained_elapsed")
# A call of one implementation launches a handful of kernels; this only bounds a
# runaway (profiling replays each kernel dozens of times).
LAUNCH_COUNT = 64
INSTALL_GLOBS = ("/usr/local/cuda/bin/ncu", "/opt/nvidia/nsight-compute/*/ncu")
PERMISSION_MARKER = "ERR_NVGPUCTRPERM"
PERMISSION_FIX = (
    "Nsight Compute may not read this GPU's performance counters here (ERR_NVGPUCTRPERM), "
    "so nothing was profiled; the timings are unaffected. To allow it: for a container, "
    "start it with --cap-add SYS_ADMIN; on the host, let all users profile by writing "
    "'options nvidia NVreg_RestrictProfilingToAdminUsers=0' to a file in /etc/modprobe.d/ "
    "and reloading the nvidia driver (or rebooting); "
    "see https://developer.nvidia.com/ERR_NVGPUCTRPERM")
NOT_FOUND = ("Nsight Compute (ncu) was not found (the path given with --ncu, else on PATH, "
             "in /usr/local/cuda/bin or in /opt/nvidia/nsight-compute/*/); install it or pass "
             "the runner --ncu PATH")
_TAIL_CHARS = 1500


@dataclass(frozen=True)
class _Ran:
    """What one ncu process did: exit status (None if killed at the timeout), its
    output (stdout, with stderr unless kept apart in ``errors``) and whether it ran
    out of time."""

    returncode: int | None
    output: str
    timed_out: bool = False
    errors: str = ""


def find_ncu(explicit: str | None = None) -> str | None:
    """``explicit`` if given (None when it is not an executable file), else ncu on
    PATH, else the newest usual install."""
    if explicit:
        return explicit if os.path.isfile(explicit) and os.access(explicit, os.X_OK) else None
    found = shutil.which("ncu")
    if found:
        return found
    installed = sorted(p for pattern in INSTALL_GLOBS for p in glob.glob(pattern)
                       if os.access(p, os.X_OK))
    return installed[-1] if installed else None


def selected(policy: NcuPolicy, results: list[CaseResult]) -> list[int]:
    """Indices of the results to profile: timed ones the policy names (empty lists
    name all). A case whose gate failed was never timed and is never profiled."""
    return [i for i, r in enumerate(results) if r.status == "ok"
            and (not policy.cases or r.case in policy.cases)
            and (not policy.implementations or r.implementation in policy.implementations)]


def profile_results(job: JobSpec, results: list[CaseResult], folder: Path, device: str,
                    log: logging.Logger, emit: EventSink, *,
                    ncu_path: str | None = None) -> list[CaseResult]:
    """``results`` with an ``ncu`` entry on every selected pair (a profile or an error)."""
    chosen = selected(job.ncu, results)
    out = list(results)
    if not chosen:
        log.info("ncu: no timed pair is selected by the job's ncu policy")
        return out
    tool = find_ncu(ncu_path)
    blocked = None if tool else NOT_FOUND
    base = {"clock_control": job.ncu.clock_control, "sections": list(job.ncu.sections),
            "tool_version": tool_version(tool, log) if tool else None}
    with tempfile.TemporaryDirectory(prefix="sparsek-ncu-") as scratch:
        job_file = Path(scratch) / "job.json"
        job_file.write_text(job.to_json(), encoding="utf-8")
        for n, index in enumerate(chosen):
            result = out[index]
            emit(events.profile_start(result.case, result.implementation, n, len(chosen)))
            profile = (NcuResult(error=blocked, **base) if blocked else
                       _profile_pair(tool, job, result, folder, job_file, device, base, log))
            if profile.error and PERMISSION_MARKER in profile.error:
                blocked = profile.error  # every later attempt would fail the same way
            if profile.error:
                log.error("ncu %s/%s: %s", result.case, result.implementation, profile.error)
            out[index] = result.model_copy(update={"ncu": profile})
            emit(events.profile_done(out[index], n, len(chosen)))
    return out


def _profile_pair(tool: str, job: JobSpec, result: CaseResult, folder: Path, job_file: Path,
                  device: str, base: dict, log: logging.Logger) -> NcuResult:
    rel = f"ncu/{result.case}/{result.implementation}"
    stem = folder / rel
    stem.parent.mkdir(parents=True, exist_ok=True)
    report = stem.parent / f"{stem.name}.ncu-rep"
    timeout = float(job.timeouts.case_s)
    child = _child(job_file, result, device)
    ran = _run(profile_command(tool, job.ncu, report, child, KEY_METRICS), timeout, log)
    if _metric_refused(ran):
        log.warning("ncu refused an extra metric; profiling with the sections alone")
        ran = _run(profile_command(tool, job.ncu, report, child, ()), timeout, log)
    error = diagnose(ran, report, timeout)
    kept = f"{rel}.ncu-rep" if report.is_file() else None
    if error:
        return NcuResult(error=error[:4000], report_path=kept, **base)
    text, export_error = export_csv(tool, report, timeout, log)
    if export_error:
        return NcuResult(error=export_error[:4000], report_path=kept, **base)
    (stem.parent / f"{stem.name}.csv").write_text(text, encoding="utf-8")
    try:
        metrics, kernels = parse_export(text)
    except NcuCsvError as exc:
        return NcuResult(error=f"the CSV export could not be read: {exc}", report_path=kept,
                         csv_path=f"{rel}.csv", **base)
    return NcuResult(report_path=kept, csv_path=f"{rel}.csv", metrics=metrics, kernels=kernels,
                     **base)


def profile_command(tool: str, policy: NcuPolicy, report: Path, child: list[str],
                    metrics: tuple[str, ...]) -> list[str]:
    """The ncu command line; ``report`` ends in .ncu-rep, so ncu adds no extension of
    its own (an implementation label such as "v1.2" holds a dot)."""
    sections = [arg for name in policy.sections for arg in ("--section", name)]
    extra = ["--metrics", ",".join(metrics)] if metrics else []
    return [tool, "--nvtx", "--nvtx-include", f"{NVTX_RANGE}/",
            "--clock-control", policy.clock_control, "--cache-control", "all",
            "--target-processes", "all", "--launch-count", str(LAUNCH_COUNT),
            *sections, *extra, "--export", str(report), "--force-overwrite", *child]


def _child(job_file: Path, result: CaseResult, device: str) -> list[str]:
    return [sys.executable, "-m", "sparsek.runner.profile_one", "--job", str(job_file),
            "--case", result.case, "--implementation", result.implementation,
            "--device", device, "--range", NVTX_RANGE]


def diagnose(ran: _Ran, report: Path, timeout_s: float) -> str | None:
    """Why a profile failed, in words a user can act on; None when it worked."""
    tail = _tail(ran.output)
    if ran.timed_out:
        return (f"ncu did not finish within {timeout_s:g} s (the job's timeouts.case_s) and "
                f"was stopped; its last output: {tail}")
    if PERMISSION_MARKER in ran.output:
        return PERMISSION_FIX
    if f'"{OUTCOME_KEY}": "gate_failed"' in ran.output:
        return f"the case failed its gate in the profiling process, so it was not profiled: {tail}"
    if "No kernels were profiled" in ran.output:
        return (f"ncu profiled no kernel inside the NVTX range {NVTX_RANGE!r} (does this "
                f"implementation launch GPU kernels on this device?): {tail}")
    if ran.returncode != 0:
        return f"ncu exited with status {ran.returncode}: {tail}"
    if not report.is_file():
        return f"ncu exited normally but wrote no report {report.name}: {tail}"
    return None


def _metric_refused(ran: _Ran) -> bool:
    text = ran.output
    return (ran.returncode != 0 and PERMISSION_MARKER not in text and "==ERROR==" in text
            and "metric" in text.lower())


def export_csv(tool: str, report: Path, timeout_s: float, log: logging.Logger
               ) -> tuple[str, str | None]:
    """(the raw-page CSV, None) or ("", why not). Base units are asked for; an ncu
    that does not know that option is asked again without it (the parser converts)."""
    base = [tool, "--import", str(report), "--csv", "--page", "raw"]
    for args in ([*base, "--print-units", "base"], base):
        # The C locale keeps numbers in the one format the parser reads.
        ran = _run(args, timeout_s, log, merge_stderr=False, env={"LC_ALL": "C"})
        if ran.returncode == 0 and ran.output.strip():
            return ran.output, None
    said = _tail(ran.errors + " " + ran.output)
    return "", f"ncu --import could not export {report.name} as CSV: {said}"


def tool_version(tool: str, log: logging.Logger) -> str | None:
    """The "Version ..." line of ``ncu --version``, for the record."""
    ran = _run([tool, "--version"], 60, log)
    lines = [line.strip() for line in ran.output.splitlines() if line.strip()]
    found = next((line for line in lines if line.lower().startswith("version")), None)
    return (found or (lines[-1] if lines else ""))[:200] or None


def _run(argv: list[str], timeout_s: float, log: logging.Logger, *,
         merge_stderr: bool = True, env: dict[str, str] | None = None) -> _Ran:
    """Run ``argv`` in its own process group, so that at the timeout the profiled
    child goes with ncu rather than living on and holding the GPU."""
    log.info("running: %s", " ".join(argv))
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
                                text=True, errors="replace", env={**_child_env(), **(env or {})},
                                start_new_session=True)
    except OSError as exc:
        return _Ran(None, f"could not start {argv[0]}: {exc}")
    try:
        output, errors = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, errors = proc.communicate()
        return _Ran(None, output or "", timed_out=True, errors=errors or "")
    return _Ran(proc.returncode, output or "", errors=errors or "")


def _child_env() -> dict[str, str]:
    """This environment, with the folders this runner's packages were imported from
    first on PYTHONPATH, so the child imports the very same code."""
    roots = [str(Path(module.__file__).resolve().parents[1])
             for module in (sparsek, sparsek_remote)]
    previous = os.environ.get("PYTHONPATH", "")
    path = os.pathsep.join(dict.fromkeys([*roots, *filter(None, previous.split(os.pathsep))]))
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


def _tail(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= _TAIL_CHARS else "... " + flat[-_TAIL_CHARS:]
