"""Nsight Compute in a job: which pairs are profiled, the profiling child, and every
way a profile can fail without losing the job.

There is no GPU here, so ``ncu`` on PATH is a stand-in (tests/fixtures/fake_ncu.py)
that prints what the real one prints; the runner, the profiling child it starts
(real gate, real call) and the bundle checks are all the real ones.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from sparsek.runner import ncu, profile_one, run_job
from sparsek_remote.artifacts import validate_bundle
from sparsek_remote.schema import LOG_NAME, NcuResult
from tests.kernels.runner_jobs import RUN_ID, SDPA_MATH, SPARSEK_REFERENCE, case, make_job

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SYNTHETIC = FIXTURES / "ncu_raw_synthetic.csv"
QUICK = {"warmup": 1, "repetitions": 5, "max_seconds": 0.2, "measure_ceilings": False}


@pytest.fixture
def fake_ncu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Put the stand-in first on PATH as ``ncu``; returns a function setting its mode
    and a function reading its invocation log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "ncu"
    tool.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FIXTURES / "fake_ncu.py"}" "$@"\n',
                    encoding="utf-8")
    tool.chmod(0o755)
    log = tmp_path / "ncu-calls.log"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_NCU_LOG", str(log))
    monkeypatch.setenv("FAKE_NCU_CSV", str(SYNTHETIC))
    monkeypatch.setenv("TRITON_INTERPRET", "1")

    def calls() -> list[str]:
        lines = log.read_text(encoding="utf-8").splitlines() if log.exists() else []
        return [line for line in lines if "--export" in line]

    return (lambda mode: monkeypatch.setenv("FAKE_NCU_MODE", mode)), calls


def ncu_job(cases=None, impls=None, ncu_policy=None, **policies):
    return make_job(cases or [case("c", dtype="bfloat16")], impls or [SDPA_MATH, SPARSEK_REFERENCE],
                    timing=QUICK, ncu={"enabled": True, **(ncu_policy or {})}, **policies)


def test_permission_error_names_the_fix_and_the_job_goes_on(tmp_path, fake_ncu):
    set_mode, calls = fake_ncu
    set_mode("permission")
    seen: list[dict] = []
    results = run_job(ncu_job(), tmp_path / "b", run_id=RUN_ID, host_alias="test-host",
                      on_event=seen.append).results
    assert [r.status for r in results] == ["ok", "ok"]  # timings are kept
    for result in results:
        error = result.ncu.error
        assert "ERR_NVGPUCTRPERM" in error and "--cap-add SYS_ADMIN" in error
        assert "NVreg_RestrictProfilingToAdminUsers=0" in error and "/etc/modprobe.d" in error
        assert result.ncu.metrics is None and result.ncu.report_path is None
    assert len(calls()) == 1, "after a permission error no further profile is attempted"
    done = [e for e in seen if e["event"] == "profile_done"]
    assert [(e["ok"], e["index"], e["total"]) for e in done] == [(False, 0, 2), (False, 1, 2)]
    valid = validate_bundle(tmp_path / "b")
    assert all(r.ncu.error for r in valid.results.results)
    assert "ERR_NVGPUCTRPERM" in (tmp_path / "b" / LOG_NAME).read_text(encoding="utf-8")


def test_profiles_land_in_the_bundle_and_a_failed_gate_is_never_profiled(tmp_path, fake_ncu):
    set_mode, calls = fake_ncu
    set_mode("profile")
    # float32 against an impossible tolerance fails its gate; bfloat16 passes.
    job = ncu_job([case("f32"), case("b16", dtype="bfloat16")], [SDPA_MATH],
                  correctness={"tolerance_float32": 1e-300})
    results = run_job(job, tmp_path / "b", run_id=RUN_ID, host_alias="test-host").results
    failed, profiled = results
    assert failed.status == "gate_failed" and failed.timing is None and failed.ncu is None
    assert profiled.status == "ok" and profiled.ncu.error is None
    assert [("--case f32" in c, "--case b16" in c) for c in calls()] == [(False, True)]
    command = calls()[0]
    report = tmp_path / "b" / "ncu" / "b16" / "sdpa-math.ncu-rep"
    for part in ("--nvtx --nvtx-include sparsek-profile/", "--clock-control none",
                 f"--export {report}", "--section SpeedOfLight", "--section Occupancy",
                 "--metrics gpu__time_duration",
                 "-m sparsek.runner.profile_one", "--implementation sdpa-math --device cpu"):
        assert part in command, part
    got = profiled.ncu
    assert (got.report_path, got.csv_path) == ("ncu/b16/sdpa-math.ncu-rep", "ncu/b16/sdpa-math.csv")
    assert got.metrics.duration_ns == 41_216 + 212_480 and len(got.kernels) == 2
    assert got.clock_control == "none" and got.tool_version.startswith("Version 2025.3.1")
    bundle = validate_bundle(tmp_path / "b")
    listed = {f.path for f in bundle.manifest.files}
    assert {"ncu/b16/sdpa-math.ncu-rep", "ncu/b16/sdpa-math.csv"} <= listed
    assert (tmp_path / "b" / got.csv_path).read_text(encoding="utf-8") == \
        SYNTHETIC.read_text(encoding="utf-8")


def test_the_policy_picks_cases_and_implementations(tmp_path, fake_ncu):
    set_mode, calls = fake_ncu
    set_mode("permission")
    job = ncu_job([case("a", dtype="bfloat16"), case("b", dtype="bfloat16")],
                  [SDPA_MATH, SPARSEK_REFERENCE],
                  ncu_policy={"cases": ["b"], "implementations": ["sparsek-reference"]})
    results = run_job(job, tmp_path / "b", run_id=RUN_ID, host_alias="test-host").results
    assert [(r.case, r.implementation) for r in results if r.ncu is not None] == \
        [("b", "sparsek-reference")]


def test_a_profile_past_the_timeout_is_stopped_with_its_child(tmp_path, fake_ncu):
    set_mode, calls = fake_ncu
    set_mode("hang")
    job = ncu_job(impls=[SDPA_MATH], timeouts={"case_s": 1})
    begin = time.monotonic()
    (result,) = run_job(job, tmp_path / "b", run_id=RUN_ID, host_alias="test-host").results
    assert time.monotonic() - begin < 60
    assert "did not finish within 1 s" in result.ncu.error and "timeouts.case_s" in result.ncu.error
    pid = int(calls()[0].split()[0])
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_without_ncu_each_selected_case_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing called ncu here
    monkeypatch.setattr(ncu, "INSTALL_GLOBS", ())
    job = ncu_job(impls=[SDPA_MATH])
    (result,) = run_job(job, tmp_path / "b", run_id=RUN_ID, host_alias="test-host").results
    assert result.status == "ok" and "was not found" in result.ncu.error
    assert "--ncu PATH" in result.ncu.error
    (given,) = run_job(job, tmp_path / "c", run_id=RUN_ID, host_alias="test-host",
                       ncu_path=str(tmp_path / "no-such-ncu")).results
    assert "was not found" in given.ncu.error


@pytest.mark.parametrize(("output", "returncode", "report", "words"), [
    (f"==ERROR== {ncu.PERMISSION_MARKER} - The user does not have permission", 0, False,
     ["--cap-add SYS_ADMIN"]),
    ('{"sparsek_profile_one": "gate_failed", "message": "rel_error 1e-2"}', 7, False,
     ["failed its gate in the profiling process", "rel_error 1e-2"]),
    ("==WARNING== No kernels were profiled.", 0, False, ["profiled no kernel", "NVTX range"]),
    ("==ERROR== Failed to initialize the profiler: LibraryNotLoaded", 1, False,
     ["exited with status 1", "LibraryNotLoaded"]),
    ("==PROF== Disconnected", 0, False, ["wrote no report"]),
    ("==PROF== Report: r.ncu-rep", 0, True, []),
])
def test_diagnose_says_what_went_wrong(tmp_path, output, returncode, report, words):
    path = tmp_path / "r.ncu-rep"
    if report:
        path.write_bytes(b"report")
    said = ncu.diagnose(ncu._Ran(returncode, output), path, 60)
    if not words:
        assert said is None
    for word in words:
        assert word in said


def test_the_profiling_child_gates_then_calls_inside_the_range(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    good = tmp_path / "good.json"
    good.write_text(ncu_job().to_json(), encoding="utf-8")
    strict = tmp_path / "strict.json"
    strict.write_text(ncu_job([case("c")], correctness={"tolerance_float32": 1e-300}).to_json(),
                      encoding="utf-8")

    def child(job: Path, case_name: str = "c") -> tuple[int, dict]:
        status = profile_one.main(["--job", str(job), "--case", case_name,
                                   "--implementation", "sdpa-math", "--device", "cpu"])
        lines = capsys.readouterr().out.strip().splitlines()
        return status, json.loads(lines[-1])

    status, said = child(good)
    assert status == 0 and said[ncu.OUTCOME_KEY] == "profiled"
    assert "sparsek-profile" in said["message"]
    status, said = child(strict)
    assert status == 7 and said[ncu.OUTCOME_KEY] == "gate_failed"
    assert "exceeds the tolerance" in said["message"]
    status, said = child(good, "nope")
    assert status == 2 and "no case 'nope'" in said["message"]


def test_a_profile_on_a_case_that_was_not_timed_is_refused_by_the_schema():
    from sparsek_remote.schema import CaseResult

    with pytest.raises(ValueError, match="must not carry an ncu profile"):
        CaseResult(case="c", implementation="i", status="skipped", flops=1.0, bytes=1.0,
                   ncu=NcuResult(clock_control="none", error="x"))
