"""The report: tables, charts and run-to-run changes, built from real bundle models.

Every number the report prints is checked against values set here, failed cases must
show no timing, and each chart must be a real PNG file.
"""

from __future__ import annotations

import math
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sparsek_remote.errors import ConfigError
from sparsek_remote.jobspec import parse_job
from sparsek_remote.report import RunData, choose_baseline, write_report
from sparsek_remote.schema import SCHEMA_VERSION, Manifest, Results

RUN_OLD = "20260101T120000Z-smoke-aaaaaa"
RUN_NEW = "20260102T120000Z-smoke-bbbbbb"
RUN_THIRD = "20260103T120000Z-smoke-cccccc"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SHA = "0" * 64
IMPLS = [
    {"kind": "sparsek", "impl": "triton"},
    {"kind": "sdpa", "backend": "math"},
    {"kind": "sdpa", "backend": "cudnn"},
]


# --- a small bundle builder ------------------------------------------------------------


def samples(median: float, spread: float, n: int = 21) -> list[float]:
    """``n`` evenly spaced samples from median*(1-spread) to median*(1+spread);
    an odd ``n`` makes ``median`` exact."""
    lo, hi = median * (1 - spread), median * (1 + spread)
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def stats_of(xs: list[float]) -> dict:
    xs = sorted(xs)
    n = len(xs)
    q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    # Order-statistic interval of the median (normal approximation of the binomial).
    lo = max(0, math.floor(n / 2 - 0.98 * math.sqrt(n)))
    hi = min(n - 1, math.ceil(n / 2 + 0.98 * math.sqrt(n)))
    return {"n": n, "median_ms": statistics.median(xs), "mean_ms": statistics.fmean(xs),
            "min_ms": xs[0], "max_ms": xs[-1], "q1_ms": q1, "q3_ms": q3, "iqr_ms": q3 - q1,
            "ci95_low_ms": xs[lo], "ci95_high_ms": xs[hi]}


def gate(passed: bool, rel_error: float) -> dict:
    return {"passed": passed, "rel_error": rel_error, "tolerance": 1e-2, "max_error_ratio": 2.0,
            "checked_queries": 64, "total_queries": 64,
            "message": "" if passed else "error above tolerance"}


def ok(case: str, impl: str, xs: list[float], *, tflops: float | None = 100.0,
       gbps: float | None = 900.0, device: str = "cuda") -> dict:
    timing = {"method": "cuda-events" if device == "cuda" else "wall-clock", "device": device,
              "warmup": 5, "l2_flushed": device == "cuda", "samples_ms": xs,
              "stats": stats_of(xs)}
    return {"case": case, "implementation": impl, "status": "ok", "gate": gate(True, 1.2e-3),
            "timing": timing, "flops": 1e12, "bytes": 1e9, "tflops": tflops, "gbps": gbps}


def gate_failed(case: str, impl: str, rel_error: float = 0.05) -> dict:
    return {"case": case, "implementation": impl, "status": "gate_failed",
            "gate": gate(False, rel_error), "flops": 1e12, "bytes": 1e9}


def not_run(case: str, impl: str, status: str, reason: str) -> dict:
    return {"case": case, "implementation": impl, "status": status, "error": reason,
            "flops": 1e12, "bytes": 1e9}


def bundle(run_id: str, results: list[dict], *, device: str = "cuda", host: str = "h100a",
           impls: list[dict] | None = None) -> RunData:
    job = parse_job({
        "name": "smoke", "targets": [host],
        "cases": [
            {"name": "small", "B": 1, "Hq": 8, "Hkv": 2, "S": 1024, "D": 64,
             "kv_budget": 128, "window": 32},
            {"name": "large", "B": 2, "Hq": 16, "Hkv": 4, "S": 8192, "D": 128,
             "kv_budget": 512, "window": 64},
        ],
        "implementations": impls or IMPLS,
    })
    provenance = {
        "host_alias": host, "device": device,
        "device_name": "NVIDIA H100 80GB HBM3" if device == "cuda" else "cpu",
        "device_count": 1 if device == "cuda" else 0,
        "compute_capability": "9.0" if device == "cuda" else None,
        "driver_version": "570.86.15" if device == "cuda" else None,
        "cuda_version": "12.8" if device == "cuda" else None,
        "python_version": "3.11.9", "torch_version": "2.7.0", "triton_version": "3.3.0",
        "package_version": "0.1.0", "git_commit": "abcdef1", "git_dirty": True,
    }
    manifest = Manifest.model_validate({
        "schema_version": SCHEMA_VERSION, "run_id": run_id,
        "created_at": "2026-01-01T12:00:00Z", "job": job.model_dump(),
        "provenance": provenance,
        "files": [{"path": "results.json", "size": 1, "sha256": SHA},
                  {"path": "runner.log", "size": 1, "sha256": SHA}],
    })
    results = Results.model_validate({"schema_version": SCHEMA_VERSION, "run_id": run_id,
                                      "results": results})
    return RunData(run_id=run_id, host_alias=host, manifest=manifest, results=results)


def table_row(markdown: str, section: str, impl: str) -> list[str]:
    """The cells of ``impl``'s row in the table under the heading of case ``section``."""
    text = markdown.split(f"### `{section}`", 1)[1].split("\n### ", 1)[0]
    for line in text.splitlines():
        if line.startswith(f"| `{impl}` |"):
            return [cell.strip() for cell in line.strip("|").split(" | ")]
    raise AssertionError(f"no row for {impl} under {section}")


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path.name} is not a PNG"
    assert len(data) > 10_000, f"{path.name} is suspiciously small ({len(data)} bytes)"


# --- one run -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    run = bundle(RUN_OLD, [
        ok("small", "sparsek-triton", samples(0.5, 0.01), tflops=250.0, gbps=1500.0),
        ok("small", "sdpa-math", samples(8.0, 0.01), tflops=15.6, gbps=None),
        ok("small", "sdpa-cudnn", samples(2.0, 0.01)),
        gate_failed("large", "sparsek-triton", rel_error=0.05),
        not_run("large", "sdpa-math", "skipped", "needs too much memory | for S=8192\nat fp32"),
        ok("large", "sdpa-cudnn", samples(10.0, 0.02)),
    ])
    out = tmp_path_factory.mktemp("single")
    return write_report([run], out)


def test_report_lists_every_case_and_implementation(single):
    md = single.markdown_path.read_text(encoding="utf-8")
    assert md == single.markdown
    for name in ("`small`", "`large`", "sparsek-triton", "sdpa-math", "sdpa-cudnn", RUN_OLD):
        assert name in md
    assert "S=8192" in md and "Hq=16" in md


def test_report_shows_provenance(single):
    md = single.markdown
    for fact in ("NVIDIA H100 80GB HBM3", "570.86.15", "12.8", "2.7.0", "3.3.0",
                 "abcdef1 (dirty", "2026-01-01T12:00:00Z", "h100a", "cuda-events"):
        assert fact in md, fact
    assert "CPU run" not in md


def test_speedups_are_computed_against_the_cudnn_baseline(single):
    md = single.markdown
    assert "speedup vs sdpa-cudnn" in md
    assert table_row(md, "small", "sparsek-triton")[-1] == "4.00x"    # 2.0 / 0.5
    assert table_row(md, "small", "sdpa-math")[-1] == "0.25x"         # 2.0 / 8.0
    assert table_row(md, "small", "sdpa-cudnn")[-1] == "1.00x"


def test_ok_row_carries_its_numbers(single):
    row = table_row(single.markdown, "small", "sparsek-triton")
    assert row[1] == "pass (rel err 1.2e-03)"
    assert row[2] == "0.5"
    assert row[5] == "62.5"          # 0.5 ms = 500 us over Hq = 8 heads
    assert row[6] == "250" and row[7] == "1,500"
    low, high = (float(x) for x in row[4].split(" – "))
    assert low <= 0.5 <= high
    assert table_row(single.markdown, "small", "sdpa-math")[7] == "—"   # no GB/s given


def test_failed_and_skipped_cases_show_reasons_and_no_timing(single):
    md = single.markdown
    failed = table_row(md, "large", "sparsek-triton")
    assert failed[1] == "fail (rel err 5.0e-02)"
    assert failed[2:] == ["—"] * 7
    skipped = table_row(md, "large", "sdpa-math")
    assert skipped[1] == "skipped" and skipped[2:] == ["—"] * 7
    assert "gate failed: rel err 5.0e-02 against tolerance 1.0e-02" in md
    # A reason from a host cannot break the table or add lines to it.
    assert "skipped: needs too much memory \\| for S=8192 at fp32" in md


def test_charts_are_real_pngs(single):
    names = sorted(p.name for p in single.plot_paths)
    assert names == sorted(f"{kind}-{RUN_OLD}-h100a.png" for kind in
                           ("latency", "speedup", "tflops"))
    for path in single.plot_paths:
        assert path.parent == single.markdown_path.parent
        assert_png(path)
        assert f"]({path.name})" in single.markdown
    assert single.regressions == [] and single.changes == []


def test_cpu_run_carries_the_banner(tmp_path):
    run = bundle(RUN_OLD, [ok("small", "sdpa-math", samples(3.0, 0.05), device="cpu")],
                 device="cpu", host="local")
    report = write_report([run], tmp_path)
    assert ("CPU run: timings are wall-clock on the CPU and say nothing about GPU speed"
            in report.markdown)
    assert "wall-clock, warm-up 5 calls, L2 not flushed" in report.markdown


def test_nothing_to_draw_skips_charts_and_says_so(tmp_path):
    run = bundle(RUN_OLD, [gate_failed("small", "sparsek-triton"),
                           not_run("small", "sdpa-cudnn", "error", "CUDA out of memory")])
    report = write_report([run], tmp_path)
    assert report.plot_paths == []
    assert list(tmp_path.glob("*.png")) == []
    md = report.markdown
    assert "*No latency chart: no case was timed.*" in md
    assert "*No TFLOP/s chart: no timed case reports TFLOP/s.*" in md
    assert "*No speedup vs sdpa-cudnn chart:" in md
    assert "error: CUDA out of memory" in md


# --- the baseline --------------------------------------------------------------------------


def test_baseline_defaults_to_first_sdpa_without_cudnn_and_to_none_without_sdpa():
    with_math = bundle(RUN_OLD, [ok("small", "sdpa-math", samples(1.0, 0.01)),
                                 ok("small", "sparsek-triton", samples(1.0, 0.01))])
    assert choose_baseline([with_math]) == "sdpa-math"
    only_sparsek = bundle(RUN_OLD, [ok("small", "sparsek-triton", samples(1.0, 0.01))],
                          impls=[{"kind": "sparsek", "impl": "triton"}])
    assert choose_baseline([only_sparsek]) is None


def test_named_baseline_changes_the_speedups(tmp_path):
    run = bundle(RUN_OLD, [ok("small", "sparsek-triton", samples(0.5, 0.01)),
                           ok("small", "sdpa-math", samples(8.0, 0.01))])
    report = write_report([run], tmp_path, baseline="sparsek-triton")
    assert table_row(report.markdown, "small", "sdpa-math")[-1] == "0.06x"   # 0.5 / 8.0


def test_without_a_baseline_there_is_no_speedup(tmp_path):
    run = bundle(RUN_OLD, [ok("small", "sparsek-triton", samples(0.5, 0.01))],
                 impls=[{"kind": "sparsek", "impl": "triton"}])
    report = write_report([run], tmp_path)
    assert "speedup vs" not in report.markdown
    assert "*No speedup chart: there is no baseline implementation.*" in report.markdown
    assert len(report.plot_paths) == 2


def test_unknown_baseline_names_the_available_ones(tmp_path):
    run = bundle(RUN_OLD, [ok("small", "sparsek-triton", samples(0.5, 0.01)),
                           ok("small", "sdpa-cudnn", samples(1.0, 0.01))])
    with pytest.raises(ConfigError) as caught:
        write_report([run], tmp_path, baseline="sdpa-flash")
    assert "sdpa-flash" in caught.value.message
    assert caught.value.hint == "choose one of: sparsek-triton, sdpa-cudnn"
    assert not (tmp_path / "report.md").exists()


@pytest.mark.parametrize("floor", [-0.1, 1.0, math.nan])
def test_a_noise_floor_outside_zero_to_one_is_refused(tmp_path, floor):
    run = bundle(RUN_OLD, [ok("small", "sdpa-cudnn", samples(1.0, 0.01))])
    with pytest.raises(ConfigError, match="noise floor"):
        write_report([run], tmp_path, noise_floor=floor)


def test_no_runs_and_repeated_runs_are_refused(tmp_path):
    run = bundle(RUN_OLD, [ok("small", "sdpa-cudnn", samples(1.0, 0.01))])
    with pytest.raises(ConfigError, match="no runs"):
        write_report([], tmp_path)
    with pytest.raises(ConfigError, match="given twice"):
        write_report([run, run], tmp_path)


# --- two runs -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    old = bundle(RUN_OLD, [
        ok("small", "sparsek-triton", samples(1.0, 0.005)),
        ok("small", "sdpa-cudnn", samples(1.0, 0.005)),
        ok("small", "sdpa-math", samples(1.0, 0.30)),
        ok("large", "sparsek-triton", samples(4.0, 0.005)),
        ok("large", "sdpa-cudnn", samples(5.0, 0.005)),
    ])
    new = bundle(RUN_NEW, [
        ok("small", "sparsek-triton", samples(1.3, 0.005)),    # 30 % slower, tight
        ok("small", "sdpa-cudnn", samples(0.7, 0.005)),        # 30 % faster, tight
        ok("small", "sdpa-math", samples(1.01, 0.30)),         # 1 % slower, wide
        gate_failed("large", "sparsek-triton"),
        ok("large", "sdpa-cudnn", samples(5.05, 0.005)),       # 1 % slower, tight
    ])
    return write_report([old, new], tmp_path_factory.mktemp("compared"))


def verdicts(report) -> dict[tuple[str, str], str]:
    return {(c.case, c.implementation): c.verdict for c in report.changes}


def test_thirty_percent_slower_with_tight_samples_is_a_regression(compared):
    [regression] = compared.regressions
    assert (regression.case, regression.implementation) == ("small", "sparsek-triton")
    assert regression.old_ms == pytest.approx(1.0) and regression.new_ms == pytest.approx(1.3)
    assert regression.change == pytest.approx(0.30)
    assert regression.noise == pytest.approx(0.02)   # tight samples: the floor decides
    assert regression.host_alias == "h100a"


def test_thirty_percent_faster_is_an_improvement(compared):
    assert verdicts(compared)[("small", "sdpa-cudnn")] == "improvement"


def test_one_percent_change_is_within_noise(compared):
    found = {(c.case, c.implementation): c for c in compared.changes}
    wide = found[("small", "sdpa-math")]
    assert wide.verdict == "within noise"
    assert wide.noise > 0.1              # the wide samples' own spread, not the floor
    assert found[("large", "sdpa-cudnn")].verdict == "within noise"


def test_a_case_timed_on_one_side_only_is_listed_not_compared(compared):
    assert ("large", "sparsek-triton") not in verdicts(compared)
    assert "- `large` / `sparsek-triton`: old ok, new gate_failed" in compared.markdown


def test_change_section_and_chart(compared):
    md = compared.markdown
    assert f"## Change: `{RUN_OLD}` (old) → `{RUN_NEW}` (new)" in md
    assert "**1 regression(s)**, 1 improvement(s), 2 within noise." in md
    assert "| `small` | `sparsek-triton` | 1 | 1.3 | +30.0% | ±2.0% | **regression** |" in md
    change_png = compared.markdown_path.parent / "change-h100a.png"
    assert change_png in compared.plot_paths
    assert_png(change_png)
    assert len(compared.plot_paths) == 7      # three charts per run and one change chart


def test_wide_samples_hide_even_a_large_change(tmp_path):
    old = bundle(RUN_OLD, [ok("small", "sdpa-cudnn", samples(1.0, 0.8))])
    new = bundle(RUN_NEW, [ok("small", "sdpa-cudnn", samples(1.3, 0.8))])
    report = write_report([old, new], tmp_path)
    assert verdicts(report) == {("small", "sdpa-cudnn"): "within noise"}
    assert report.regressions == []


def test_the_noise_floor_is_honoured(tmp_path):
    old = bundle(RUN_OLD, [ok("small", "sdpa-cudnn", samples(1.0, 0.001))])
    new = bundle(RUN_NEW, [ok("small", "sdpa-cudnn", samples(1.05, 0.001))])
    assert verdicts(write_report([old, new], tmp_path / "a"))[("small", "sdpa-cudnn")] \
        == "regression"
    assert verdicts(write_report([old, new], tmp_path / "b", noise_floor=0.1))[
        ("small", "sdpa-cudnn")] == "within noise"


def test_three_runs_are_reported_each_on_their_own(tmp_path):
    runs = [bundle(run_id, [ok("small", "sdpa-cudnn", samples(1.0, 0.01))])
            for run_id in (RUN_OLD, RUN_NEW, RUN_THIRD)]
    report = write_report(runs, tmp_path)
    assert report.changes == []
    assert "needs exactly two run ids; 3 were given" in report.markdown
    assert all(f"## Run `{r}` on `h100a`" in report.markdown
               for r in (RUN_OLD, RUN_NEW, RUN_THIRD))


def test_one_run_on_two_hosts_is_not_compared(tmp_path):
    runs = [bundle(RUN_OLD, [ok("small", "sdpa-cudnn", samples(1.0, 0.01))], host=host)
            for host in ("h100a", "h100b")]
    report = write_report(runs, tmp_path)
    assert report.changes == [] and "## Change" not in report.markdown
    assert len(report.plot_paths) == 4        # latency and tflops for each host


def test_writing_a_report_leaves_pyplot_alone(tmp_path):
    """Run in a fresh interpreter: the report must draw without importing pyplot or
    switching matplotlib's backend for the program that uses it."""
    root = Path(__file__).resolve().parents[2]
    script = textwrap.dedent(f"""
        import sys
        import matplotlib
        before = dict.__getitem__(matplotlib.rcParams, "backend")
        sys.path[:0] = {[str(root), str(root / "orchestrator")]!r}
        from tests.unit.test_report import bundle, ok, samples, RUN_OLD
        from sparsek_remote.report import write_report
        report = write_report([bundle(RUN_OLD, [ok("small", "sdpa-cudnn", samples(1.0, 0.01))])],
                              __import__("pathlib").Path({str(tmp_path)!r}))
        assert report.plot_paths, "nothing was drawn"
        assert "matplotlib.pyplot" not in sys.modules, "pyplot was imported"
        assert dict.__getitem__(matplotlib.rcParams, "backend") == before
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
