"""The report's GPU measurement parts: throttle marks, how each case was sampled, rates
against the card's measured ceilings, speedups against every dense baseline, Nsight
Compute's metrics and errors, and the roofline chart. Built from real bundle models;
every number shown is checked against values set here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sparsek_remote import _plots
from sparsek_remote.report import RunData, write_report
from sparsek_remote.schema import Ceilings, GpuProvenance, Results
from tests.unit.test_report import RUN_OLD, assert_png, bundle, gate_failed, ok, samples

PERMISSION = ("Nsight Compute may not read this GPU's performance counters here "
              "(ERR_NVGPUCTRPERM) ... start it with --cap-add SYS_ADMIN ...")


def card(sm: float, temp: float, power: float, reasons: list[str] | None = None) -> dict:
    return {"source": "nvml", "sm_clock_mhz": sm, "max_sm_clock_mhz": 1980, "temperature_c": temp,
            "power_w": power, "power_limit_w": 700, "throttle_reasons": reasons or []}


def measured(case: str, impl: str, median: float, *, method: str = "cuda-events",
             calls: int = 1, sets: int = 1, throttled: bool = False, ncu: dict | None = None,
             host_ms: float | None = None, **rates) -> dict:
    result = ok(case, impl, samples(median, 0.01), **rates)
    result["timing"].update(method=method, calls_per_sample=calls, rotation_sets=sets,
                            stop_reason="ci", target_ci_rel=0.01, host_enqueue_ms=host_ms,
                            head_start_us=None if host_ms is None else 2e3 * host_ms + 20)
    after = card(1755, 71, 690, ["sw_power_cap"] if throttled else ["gpu_idle"])
    result.update(card_before=card(1980, 45, 310), card_after=after, throttled=throttled,
                  throttle_detail="after: sw_power_cap" if throttled else None, ncu=ncu)
    return result


NCU_OK = {"report_path": "ncu/small/sparsek-triton.ncu-rep",
          "csv_path": "ncu/small/sparsek-triton.csv", "clock_control": "none",
          "tool_version": "Version 2025.3.1.0",
          "metrics": {"duration_ns": 253_696.0, "dram_throughput_pct": 15.9,
                      "sm_throughput_pct": 65.3, "tensor_pipe_pct": 48.4,
                      "achieved_occupancy_pct": 20.8, "l2_hit_rate_pct": 67.3,
                      "dram_bytes": 1.25e8, "sm_frequency_hz": 1.755e9},
          "kernels": [{"name": "_sparsek_select_kernel", "metrics": {"duration_ns": 41_216.0}},
                      {"name": "sparsek_fwd_kernel", "metrics": {"duration_ns": 212_480.0}}]}
CEILINGS = Ceilings(device="cuda", matmul_tflops={"bfloat16": 800.0}, copy_gbps=3000.0,
                    method="median of 10 after 3 warm-up")


def with_ceilings(run: RunData, ceilings: Ceilings | None) -> RunData:
    results = Results.model_validate({**run.results.model_dump(), "ceilings": ceilings})
    return RunData(run.run_id, run.host_alias, run.manifest, results)


@pytest.fixture(scope="module")
def gpu_report(tmp_path_factory):
    run = bundle(RUN_OLD, [
        measured("small", "sparsek-triton", 0.5, method="cuda-graph", calls=100, sets=6,
                 throttled=True, ncu=NCU_OK, tflops=250.0, gbps=1500.0),
        measured("small", "sdpa-math", 8.0, tflops=15.6, gbps=None),
        measured("small", "sdpa-cudnn", 2.0, tflops=62.5, gbps=375.0, host_ms=0.05,
                 ncu={"clock_control": "none", "error": PERMISSION}),
        measured("small", "sdpa-efficient", 1.5, host_ms=2.5),
        gate_failed("large", "sparsek-triton"),
        measured("large", "sdpa-cudnn", 10.0),
    ])
    out = tmp_path_factory.mktemp("gpu")
    return write_report([with_ceilings(run, CEILINGS)], out)


def row(markdown: str, section: str, column: str, impl: str) -> list[str]:
    """The cells of ``impl``'s row in the first table under case ``section`` whose
    header holds ``column``."""
    text = markdown.split(f"### `{section}`", 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
    for block in text.split("\n\n"):
        lines = block.strip().splitlines()
        if lines and lines[0].startswith("|") and column in lines[0]:
            for line in lines[2:]:
                if line.startswith(f"| `{impl}` |"):
                    return [cell.strip() for cell in line.strip("|").split(" | ")]
    raise AssertionError(f"no row for {impl} in a table with {column!r} under {section}")


def test_a_throttled_timing_is_flagged_above_and_in_its_row(gpu_report):
    md = gpu_report.markdown
    assert "⚠ 1 timing(s) were taken while the card was throttled" in md
    assert "`small` / `sparsek-triton`" in md.split("| provenance |")[0]
    cells = row(md, "small", "throttled", "sparsek-triton")
    assert cells[-1] == "**⚠ yes**: after: sw_power_cap"
    assert row(md, "small", "throttled", "sdpa-math")[-1] == "no"


def test_each_timing_says_how_it_was_sampled_and_the_card_around_it(gpu_report):
    cells = row(gpu_report.markdown, "small", "stop", "sparsek-triton")
    assert cells[1] == "21"
    assert cells[2] == "cuda-graph (100 calls/sample), 6 input sets"
    # 21 samples 0.495 ... 0.505; the builder's interval is (x7, x16) = (0.498, 0.5025).
    assert cells[3] == "0.498 – 0.5025 ms (±0.50%)"
    assert cells[4] == "ci"
    assert cells[5] == "1980 → 1755 MHz, 45 → 71 °C, 310 → 690 W"
    assert row(gpu_report.markdown, "small", "stop", "sdpa-cudnn")[2] == "cuda-events"
    assert row(gpu_report.markdown, "small", "stop", "sdpa-efficient")[2] == (
        "cuda-events; host-bound: 2.5 ms to queue a call, so a loop of calls runs at the "
        "host's pace")
    assert "cuda-graph and cuda-events, warm-up 5 calls and 1 s, L2 flushed" in gpu_report.markdown
    assert ("within ±1.0% (after at least 10 samples and 1 s), 50 samples, or 10 s"
            in gpu_report.markdown)


def test_rates_against_the_ceilings_and_every_dense_baseline(gpu_report):
    md = gpu_report.markdown
    cells = row(md, "small", "% of bfloat16 matmul ceiling", "sparsek-triton")
    assert cells[1:5] == ["250", "31.2%", "1,500", "50.0%"]   # 250 / 800, 1500 / 3000
    assert cells[5:] == ["16.00x", "4.00x"]                   # vs sdpa-math, vs sdpa-cudnn
    header = md.split("% of bfloat16 matmul ceiling", 1)[1].splitlines()[0]
    assert "speedup vs `sdpa-math`" in header and "speedup vs `sdpa-cudnn`" in header
    assert row(md, "small", "% of copy ceiling", "sdpa-math")[4] == "—"   # no GB/s given
    assert "matmul bfloat16 800 TFLOP/s; copy 3,000 GB/s" in md


def test_ncu_metrics_and_errors_are_shown(gpu_report):
    md = gpu_report.markdown
    cells = row(md, "small", "tensor pipe %", "sparsek-triton")
    assert cells[1:] == ["2", "253.7", "15.9", "65.3", "48.4", "20.8", "67.3", "1755",
                         "`ncu/small/sparsek-triton.ncu-rep`"]
    assert "clock control none" in md
    assert ("- `sdpa-cudnn`: no Nsight Compute profile: Nsight Compute may not read this "
            "GPU's performance counters") in md and "--cap-add SYS_ADMIN" in md


def test_the_roofline_is_drawn_with_the_ncu_points(gpu_report):
    names = sorted(p.name for p in gpu_report.plot_paths)
    assert f"roofline-{RUN_OLD}-h100a.png" in names
    roofline = next(p for p in gpu_report.plot_paths if p.name.startswith("roofline"))
    assert_png(roofline)
    assert f"![roofline]({roofline.name})" in gpu_report.markdown


def test_roofline_points_place_timings_and_profiles():
    run = bundle(RUN_OLD, [measured("small", "sparsek-triton", 0.5, ncu=NCU_OK, tflops=250.0),
                           gate_failed("large", "sparsek-triton")])
    points = _plots.roof_points(run.results.results)
    assert [(p.label, p.source) for p in points] == [("small", "timing"), ("small", "ncu")]
    timing, profiled = points
    assert timing.intensity == pytest.approx(1e12 / 1e9) and timing.tflops == 250.0
    assert profiled.intensity == pytest.approx(1e12 / 1.25e8)
    assert profiled.tflops == pytest.approx(1e12 / 253_696e-9 / 1e12)


def test_a_bundle_from_before_these_fields_reads_as_before(tmp_path: Path):
    run = bundle(RUN_OLD, [ok("small", "sdpa-cudnn", samples(2.0, 0.01))])
    report = write_report([run], tmp_path)
    assert [p.name for p in report.plot_paths if "roofline" in p.name] == []
    for absent in ("roofline", "95% CI of median", "throttled", "Nsight Compute", "ceiling"):
        assert absent not in report.markdown, absent


def test_ceilings_alone_draw_a_roofline_without_ncu(tmp_path: Path):
    run = with_ceilings(bundle(RUN_OLD, [measured("small", "sdpa-cudnn", 2.0)]), CEILINGS)
    report = write_report([run], tmp_path)
    assert any(p.name.startswith("roofline") for p in report.plot_paths)


def test_a_run_spread_over_gpus_lists_each_gpu_and_where_each_timing_ran(tmp_path: Path):
    spread = [measured("small", "sparsek-triton", 0.5), measured("small", "sdpa-cudnn", 2.0)]
    spread[0]["gpu_index"], spread[1]["gpu_index"] = 1, 0
    run = bundle(RUN_OLD, spread)
    gpus = [{"index": i, "name": "NVIDIA H100 80GB HBM3", "uuid": f"GPU-{i}aa",
             "driver_version": "580.159.04", "compute_capability": "9.0",
             "card": card(345, 30 + i, 70)} for i in (0, 1)]
    provenance = run.manifest.provenance.model_copy(
        update={"gpus": [GpuProvenance.model_validate(g) for g in gpus]})
    manifest = run.manifest.model_copy(update={"provenance": provenance})
    md = write_report([RunData(run.run_id, run.host_alias, manifest, run.results)],
                      tmp_path).markdown
    assert ("| GPU 1 | NVIDIA H100 80GB HBM3, UUID GPU-1aa, driver 580.159.04, compute "
            "capability 9.0; at start: 345 MHz SM, 1980 MHz max SM") in md
    assert row(md, "small", "stop", "sparsek-triton")[-1] == "1"
    assert row(md, "small", "stop", "sdpa-cudnn")[-1] == "0"
    single = write_report([bundle(RUN_OLD, [measured("small", "sdpa-cudnn", 2.0)])],
                          tmp_path / "one").markdown
    assert "| GPU 0 |" not in single and "| GPU |" not in single


def test_each_gpu_s_rates_are_held_against_its_own_ceilings(tmp_path: Path):
    # A run spread over two GPUs that measured different ceilings: each row's percentages
    # use the ceilings of the GPU that timed it, and provenance lists both.
    slow = CEILINGS.model_copy(update={"matmul_tflops": {"bfloat16": 500.0},
                                       "copy_gbps": 2000.0, "gpu_index": 1})
    first = measured("small", "sparsek-triton", 0.5, tflops=250.0, gbps=1500.0)
    second = measured("small", "sdpa-cudnn", 2.0, tflops=250.0, gbps=1500.0)
    first["gpu_index"], second["gpu_index"] = 0, 1
    run = bundle(RUN_OLD, [first, second])
    results = Results.model_validate({
        **run.results.model_dump(), "ceilings": CEILINGS,
        "gpu_ceilings": [CEILINGS.model_copy(update={"gpu_index": 0}), slow]})
    md = write_report([RunData(run.run_id, run.host_alias, run.manifest, results)],
                      tmp_path).markdown
    column = "% of bfloat16 matmul ceiling"
    assert row(md, "small", column, "sparsek-triton")[2:5] == ["31.2%", "1,500", "50.0%"]
    assert row(md, "small", column, "sdpa-cudnn")[2:5] == ["50.0%", "1,500", "75.0%"]
    assert "measured ceilings, GPU 0 | matmul bfloat16 800 TFLOP/s; copy 3,000 GB/s" in md
    assert "measured ceilings, GPU 1 | matmul bfloat16 500 TFLOP/s; copy 2,000 GB/s" in md


def test_gpu_ceilings_must_name_each_gpu_once():
    run = bundle(RUN_OLD, [measured("small", "sdpa-cudnn", 2.0)])
    twice = [CEILINGS.model_copy(update={"gpu_index": 0})] * 2
    with pytest.raises(ValueError, match="each GPU's index once"):
        Results.model_validate({**run.results.model_dump(), "gpu_ceilings": twice})
