"""The job and bundle fields of GPU-grade measurement: their defaults, that job files
stay strict about them, that impossible values from a host are refused, and that
bundles written before the fields existed still validate."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from sparsek_remote.errors import JobSpecError
from sparsek_remote.jobspec import TimingPolicy, load_job
from sparsek_remote.schema import CardState, Ceilings, NcuMetrics, NcuResult, Results, Timing
from tests.unit.bundle_factory import make_results, make_stats

JOB = """\
name: gpu-fields
cases:
  - {name: c, B: 1, Hq: 2, Hkv: 1, S: 64, D: 64, kv_budget: 8, window: 4}
implementations:
  - {kind: sdpa, backend: cudnn}
timing:
  warmup: 3
"""


def test_timing_policy_defaults():
    p = TimingPolicy()
    assert (p.target_ci_rel, p.min_repetitions, p.graph_below_us, p.graph_replay_us) == \
        (0.01, 10, 20, 1000)
    assert p.rotate_inputs == "auto" and p.measure_ceilings is True


@pytest.mark.parametrize(("line", "words"), [
    ("  target_ci: 0.01\n", ["line 8", "timing.target_ci", "unknown key"]),
    ("  rotate_inputs: sometimes\n", ["line 8", "timing.rotate_inputs"]),
    ("  target_ci_rel: 0\n", ["line 8", "timing.target_ci_rel", "greater than 0"]),
    ("  graph_below_us: -1\n", ["line 8", "timing.graph_below_us"]),
])
def test_job_files_stay_strict_about_the_new_timing_keys(tmp_path: Path, line, words):
    path = tmp_path / "job.yaml"
    path.write_text(JOB + line, encoding="utf-8")
    with pytest.raises(JobSpecError) as caught:
        load_job(path)
    for word in words:
        assert word in str(caught.value)


def test_the_shipped_jobs_still_load():
    root = Path(__file__).resolve().parents[2]
    for path in sorted((root / "jobs").glob("*.yaml")):
        job = load_job(path)
        assert job.timing.target_ci_rel == 0.01, path.name


def test_a_results_file_from_before_the_new_fields_validates():
    old = make_results().model_dump(mode="json")
    for result in old["results"]:
        for key in ("input_seed", "card_before", "card_after", "throttled", "throttle_detail",
                    "ncu"):
            result.pop(key)
        if result["timing"]:
            for key in ("calls_per_sample", "rotation_sets", "stop_reason", "target_ci_rel",
                        "graph_fallback"):
                result["timing"].pop(key)
    old.pop("ceilings")
    parsed = Results.model_validate(old)
    assert parsed.ceilings is None and parsed.results[0].timing.calls_per_sample == 1
    assert parsed.results[0].throttled is None and parsed.results[0].ncu is None


def timing(**fields) -> dict:
    samples = [0.010, 0.011, 0.012]
    return {"method": "cuda-graph", "device": "cuda", "warmup": 5, "l2_flushed": True,
            "samples_ms": samples, "stats": make_stats(samples).model_dump(), **fields}


def test_graph_timings_and_their_fields():
    t = Timing.model_validate(timing(calls_per_sample=100, rotation_sets=6, stop_reason="budget"))
    assert t.method == "cuda-graph" and t.calls_per_sample == 100
    for bad in ({"stop_reason": "bored"}, {"calls_per_sample": 0}, {"rotation_sets": 0},
                {"method": "stopwatch"}):
        with pytest.raises(ValidationError):
            Timing.model_validate(timing(**bad))


@pytest.mark.parametrize("bad", [
    {"report_path": "ncu/../../etc/passwd"},
    {"report_path": "/abs/report.ncu-rep"},
    {"csv_path": "ncu/a b.csv"},
    {"clock_control": "boost"},
    {"metrics": {"sm_throughput_pct": 5000.0}},
    {"metrics": {"duration_ns": -1.0}},
    {"metrics": {"l2_hit_rate_pct": float("nan")}},
])
def test_impossible_ncu_results_are_refused(bad):
    with pytest.raises(ValidationError):
        NcuResult.model_validate({"clock_control": "none", **bad})


def test_card_state_and_ceilings_refuse_impossible_numbers():
    assert CardState(source="nvml", power_w=312.5).power_w == 312.5
    with pytest.raises(ValidationError):
        CardState(source="nvml", sm_clock_mhz=-5)
    with pytest.raises(ValidationError):
        CardState(source="guess")
    with pytest.raises(ValidationError):
        Ceilings(device="cuda", matmul_tflops={"int4": 1.0})
    assert NcuMetrics().duration_ns is None
