"""The runner end to end: the command line in a subprocess, and run_job in-process.

Everything here is real: real kernels (the PyTorch reference and SDPA), a real
float64 oracle, real files checked by the orchestrator's own bundle validator.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
from pathlib import Path

import pytest
import torch

from sparsek.runner import run_job
from sparsek_remote.artifacts import validate_bundle
from sparsek_remote.schema import LOG_NAME, MANIFEST_NAME, RESULTS_NAME
from tests.kernels.runner_jobs import (
    RUN_ID,
    SDPA_CUDNN,
    SDPA_EFFICIENT,
    SDPA_MATH,
    SPARSEK_REFERENCE,
    case,
    events_of,
    make_job,
    run_cli,
)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory):
    """One CLI run shared by the tests below: fp32 and bf16, GQA, causal and not, with
    backends that exist on the CPU and backends that do not."""
    tmp_path = tmp_path_factory.mktemp("cli")
    job = make_job(
        [case("fp32-causal"), case("bf16-noncausal", dtype="bfloat16", causal=False, D=16,
                                   S=37, seed=3)],
        [SPARSEK_REFERENCE, SDPA_MATH, SDPA_CUDNN, SDPA_EFFICIENT],
        correctness={"max_queries": 16},
    )
    done = run_cli(tmp_path, job.model_dump_json(), "--git-commit", "0123abc",
                   "--git-dirty", "1", "--image-digest", "sha256:" + "ab" * 32)
    return job, done, tmp_path / "bundle"


def test_cli_writes_a_bundle_the_orchestrator_accepts(cli_run):
    job, done, bundle = cli_run
    assert done.returncode == 0, done.stderr
    valid = validate_bundle(bundle, expected_run_id=RUN_ID, expected_host="test-host")
    names = sorted(p.name for p in bundle.iterdir())
    assert names == sorted([LOG_NAME, MANIFEST_NAME, RESULTS_NAME])
    status = {(r.case, r.implementation): r.status for r in valid.results.results}
    assert len(status) == len(job.cases) * len(job.implementations)
    for name in ("fp32-causal", "bf16-noncausal"):
        assert status[(name, "sparsek-reference")] == "ok"
        assert status[(name, "sdpa-math")] == "ok"
        assert status[(name, "sdpa-cudnn")] == "skipped"
        assert status[(name, "sdpa-efficient")] == "skipped"
    provenance = valid.manifest.provenance
    assert (provenance.device, provenance.host_alias) == ("cpu", "test-host")
    assert provenance.git_commit == "0123abc" and provenance.git_dirty is True
    assert provenance.torch_version == torch.__version__


def test_cli_results_carry_gate_timing_and_rates(cli_run):
    _, _, bundle = cli_run
    results = validate_bundle(bundle).results.results
    for result in results:
        if result.status != "ok":
            continue
        assert result.gate.passed and result.gate.checked_queries == 16
        assert result.timing.method == "wall-clock" and result.timing.device == "cpu"
        assert 3 <= result.timing.stats.n <= 5 and not result.timing.l2_flushed
        assert result.tflops > 0 and result.gbps > 0 and result.peak_extra_memory_bytes is None
        low_precision = result.case == "bf16-noncausal"
        assert (result.gate.reference_rel_error is not None) == low_precision


def test_cli_skips_backends_missing_on_the_cpu_with_a_reason(cli_run):
    _, _, bundle = cli_run
    for result in validate_bundle(bundle).results.results:
        if result.implementation in ("sdpa-cudnn", "sdpa-efficient"):
            assert result.timing is None and result.gate is None
            backend = result.implementation.removeprefix("sdpa-")
            assert f"sdpa backend '{backend}' is not available on cpu" in result.error


def test_cli_events_are_json_lines_in_order(cli_run):
    job, done, _ = cli_run
    events = events_of(done.stdout)
    total = len(job.cases) * len(job.implementations)
    assert events[0] == {"event": "start", "run_id": RUN_ID, "device": "cpu", "total": total}
    assert events[-1] == {"event": "done", "failed": [], "counts": {"ok": 4, "skipped": 4}}
    starts = [e for e in events if e["event"] == "case_start"]
    finished = [e for e in events if e["event"] == "case_done"]
    assert [e["index"] for e in starts] == [e["index"] for e in finished] == list(range(total))
    assert all(e["total"] == total for e in starts + finished)
    for event in finished:
        assert (event["median_ms"] is not None) == (event["status"] == "ok")


def test_cli_log_has_verdicts_and_no_hostname(cli_run):
    _, done, bundle = cli_run
    log = (bundle / LOG_NAME).read_text(encoding="utf-8")
    assert "fp32-causal/sparsek-reference: ok, median" in log
    assert "bf16-noncausal/sdpa-cudnn: skipped" in log
    assert "fp32-causal/sdpa-math: ok" in done.stderr
    hostname = socket.gethostname()
    if len(hostname) >= 4:  # a very short name could match by chance
        for path in bundle.iterdir():
            assert hostname not in path.read_text(encoding="utf-8"), path.name


def test_a_failed_gate_is_never_timed(tmp_path: Path):
    # Real rounding of the real reference (about 1e-7 in fp32) against an impossible
    # tolerance: the gate must fail and nothing may be timed.
    job = make_job([case("strict")], [SPARSEK_REFERENCE, SDPA_MATH],
                   correctness={"tolerance_float32": 1e-300})
    seen: list[dict] = []
    results = run_job(job, tmp_path / "bundle", run_id=RUN_ID, host_alias="test-host",
                      on_event=seen.append)
    assert [r.status for r in results.results] == ["gate_failed", "gate_failed"]
    for result in results.results:
        assert result.timing is None and result.tflops is None
        assert 0 < result.gate.rel_error < 1e-5 and "exceeds the tolerance" in result.gate.message
    stored = json.loads((tmp_path / "bundle" / RESULTS_NAME).read_text(encoding="utf-8"))
    assert all(r["timing"] is None for r in stored["results"])
    assert seen[-1]["failed"] == ["strict/sparsek-reference", "strict/sdpa-math"]
    validate_bundle(tmp_path / "bundle", expected_run_id=RUN_ID)


def test_an_error_in_one_case_does_not_stop_the_job(tmp_path: Path):
    # D = 24 is not a power of two: the Triton path refuses it with a ValueError.
    job = make_job([case("odd-d", D=24)], [{"kind": "sparsek", "impl": "triton"}, SDPA_MATH])
    results = run_job(job, tmp_path / "bundle", run_id=RUN_ID, host_alias="test-host")
    error, ok = results.results
    assert error.status == "error" and error.timing is None
    assert error.error.startswith("during the correctness gate: ValueError")
    assert ok.status == "ok"
    assert "Traceback" in (tmp_path / "bundle" / LOG_NAME).read_text(encoding="utf-8")
    validate_bundle(tmp_path / "bundle")


def test_a_non_empty_out_dir_is_refused_and_left_alone(tmp_path: Path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("other run", encoding="utf-8")
    job = make_job([case("c")], [SDPA_MATH])
    done = run_cli(tmp_path, job.model_dump_json(), out=out)
    assert done.returncode == 2
    assert "is not empty" in done.stderr and "hint:" in done.stderr
    assert done.stdout == ""
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize(("extra", "message"), [
    (("--run-id", "not-a-run-id"), "does not have the form of a run id"),
    (("--git-commit", "xyz"), "git_commit"),
])
def test_bad_arguments_fail_before_anything_runs(tmp_path: Path, extra, message):
    job = make_job([case("c")], [SDPA_MATH])
    done = run_cli(tmp_path, job.model_dump_json(), *extra)
    assert done.returncode == 2 and message in done.stderr
    assert not (tmp_path / "bundle").exists()


def test_a_job_file_that_is_not_json_is_refused(tmp_path: Path):
    done = run_cli(tmp_path, "name: yaml-not-json\n")
    assert done.returncode == 2 and "is not JSON" in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_cuda_without_a_gpu_fails_clearly(tmp_path: Path):
    job = make_job([case("c")], [SDPA_MATH])
    done = run_cli(tmp_path, job.model_dump_json(), "--device", "cuda")
    assert done.returncode == 4 and "sees no CUDA device" in done.stderr


@pytest.mark.skipif(importlib.util.find_spec("sparsek.triton_fwd") is None,
                    reason="the Triton kernels are not in this tree yet")
def test_cli_runs_the_triton_kernels_interpreted_on_the_cpu(tmp_path: Path):
    # The runner itself turns the interpreter on for a CPU run; the output buffer is
    # NaN-poisoned, so a kernel that skipped any element would fail its gate here.
    job = make_job([case("tri", D=64, S=37), case("tri-bf16", D=64, S=37, dtype="bfloat16",
                                               causal=False)],
                   [{"kind": "sparsek", "impl": "triton"}],
                   timing={"warmup": 0, "repetitions": 3, "max_seconds": 0.1})
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = run_cli(tmp_path, job.model_dump_json(), env=env)
    assert done.returncode == 0, done.stderr
    results = validate_bundle(tmp_path / "bundle").results.results
    assert [r.status for r in results] == ["ok", "ok"], [r.error for r in results]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_run_job_on_the_gpu_times_with_events(tmp_path: Path):
    job = make_job([case("gpu", D=64, S=300, dtype="bfloat16")],
                   [{"kind": "sparsek", "impl": "triton"}, {"kind": "sdpa", "backend": "flash"}])
    results = run_job(job, tmp_path / "bundle", run_id=RUN_ID, host_alias="test-host",
                      device="cuda")
    valid = validate_bundle(tmp_path / "bundle")
    assert valid.manifest.provenance.device == "cuda"
    for result in results.results:
        assert result.status == "ok", result.error
        # Calls this small are shorter than 20 us: timed by replaying a CUDA graph.
        assert result.timing.method in ("cuda-events", "cuda-graph") and result.timing.l2_flushed
        assert result.peak_extra_memory_bytes is not None and result.peak_extra_memory_bytes > 0
        assert result.card_before.source in ("nvml", "nvidia-smi")
