"""Reading Nsight Compute's raw-page CSV export into the bundle's metrics.

``ncu_raw_synthetic.csv`` is a hand-made stand-in in the format ncu 2025 prints; the
real export from the H100 goes into ``ncu_raw_h100.csv`` (tests/fixtures/README.md
says how it is made), and the test for it runs as soon as the file is there.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sparsek.runner.ncu_parse import (
    NcuCsvError,
    combine,
    parse_export,
    read_raw_csv,
    unit_kind,
)
from sparsek_remote.schema import NcuMetrics

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SYNTHETIC = FIXTURES / "ncu_raw_synthetic.csv"
REAL_H100 = FIXTURES / "ncu_raw_h100.csv"

HEADER = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream",'
          '"Block Size","Grid Size","Device","CC"')
IDENT = '"{id}","77","python3","127.0.0.1","{name}","1","7","(128, 1, 1)","(64, 1, 1)","0","9.0"'


def export(metrics: dict[str, tuple[str, list[str]]], names: list[str]) -> str:
    """A raw-page export: metrics maps a column to (unit, one value per kernel)."""
    columns = list(metrics)
    head = HEADER + "".join(f',"{c}"' for c in columns)
    units = ",".join(['""'] * 11 + [f'"{metrics[c][0]}"' for c in columns])
    rows = [IDENT.format(id=i, name=name) + "".join(f',"{metrics[c][1][i]}"' for c in columns)
            for i, name in enumerate(names)]
    return "\n".join([head, units, *rows]) + "\n"


def test_synthetic_export_gives_each_kernel_and_the_combined_call():
    metrics, kernels = parse_export(SYNTHETIC.read_text(encoding="utf-8"))
    assert [k.name for k in kernels] == ["_sparsek_select_kernel", "sparsek_fwd_kernel"]
    select, fwd = (k.metrics for k in kernels)
    assert (select.duration_ns, fwd.duration_ns) == (41_216, 212_480)  # "41,216" nsecond
    assert (select.dram_bytes, fwd.dram_bytes) == (25_165_824, 110_100_480)
    assert fwd.dram_throughput_pct == 15.47 and fwd.memory_throughput_pct == 38.02
    assert fwd.sm_throughput_pct == 71.84 and fwd.achieved_occupancy_pct == 12.40
    assert fwd.l2_hit_rate_pct == 71.20
    assert fwd.sm_frequency_hz == pytest.approx(1_754_998_102.55)
    # The busiest tensor pipe: warpgroup MMA (gmma) on Hopper; "n/a" is no number.
    assert fwd.tensor_pipe_pct == 58.61
    assert kernels[1].tensor_pipe_metric == \
        "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active"
    assert select.tensor_pipe_pct == 0.0
    total = 41_216 + 212_480
    assert metrics.duration_ns == total and metrics.dram_bytes == 25_165_824 + 110_100_480
    assert metrics.sm_throughput_pct == pytest.approx((31.24 * 41_216 + 71.84 * 212_480) / total)
    assert metrics.l2_hit_rate_pct == pytest.approx((48.91 * 41_216 + 71.20 * 212_480) / total)


def test_auto_scaled_units_are_brought_to_base_units():
    text = export({
        "gpu__time_duration.sum": ("usecond", ["1,250.5"]),
        "dram__bytes.sum": ("Mbyte", ["3.5"]),
        "dram__throughput.avg.pct_of_peak_sustained_elapsed": ("%", ["61.2"]),
        "smsp__cycles_elapsed.avg.per_second": ("cycle/nsecond", ["1.98"]),
    }, ["k"])
    (row,) = read_raw_csv(text)
    assert row.values["gpu__time_duration.sum"] == pytest.approx(1_250_500)
    assert row.values["dram__bytes.sum"] == pytest.approx(3.5e6)
    assert row.values["smsp__cycles_elapsed.avg.per_second"] == pytest.approx(1.98e9)
    assert unit_kind("Gbyte/second") == ("byte/s", 1e9)
    assert unit_kind("Ghz") == ("hz", 1e9) and unit_kind("msecond") == ("ns", 1e6)
    assert unit_kind("register/thread") == ("register/thread", 1.0)


def test_dram_bytes_fall_back_to_read_plus_write_then_rate_times_duration():
    split = export({"dram__bytes_read.sum": ("Kbyte", ["2"]),
                    "dram__bytes_write.sum": ("byte", ["500"])}, ["k"])
    assert parse_export(split)[0].dram_bytes == 2500
    rate = export({"gpu__time_duration.sum": ("msecond", ["2"]),
                   "dram__bytes.sum.per_second": ("Tbyte/second", ["1.5"])}, ["k"])
    assert parse_export(rate)[0].dram_bytes == pytest.approx(3e9)


def test_a_metric_in_the_wrong_unit_is_not_taken():
    # A percentage column printed in some other unit is not a percentage.
    text = export({"sm__throughput.avg.pct_of_peak_sustained_elapsed": ("cycle", ["50"])},
                  ["k"])
    assert parse_export(text)[0].sm_throughput_pct is None


def test_tensor_pipe_falls_back_to_any_tensor_percentage():
    text = export({"sm__inst_executed_pipe_tensor_op_hmma.avg.pct_of_peak_sustained_active":
                   ("%", ["12.5"])}, ["k"])
    metrics, (kernel,) = parse_export(text)
    assert metrics.tensor_pipe_pct == 12.5
    assert kernel.tensor_pipe_metric.startswith("sm__inst_executed_pipe_tensor_op_hmma")


def test_ncu_chatter_around_the_table_is_ignored():
    body = export({"gpu__time_duration.sum": ("nsecond", ["9,000", "12"])}, ["a", "b"])
    text = ("==PROF== Connected to process 77 (/usr/bin/python3)\n" + body
            + "==WARNING== Found outstanding GPU clock reset, trying to revert...\n")
    assert [r.name for r in read_raw_csv(text)] == ["a", "b"]


@pytest.mark.parametrize(("text", "words"), [
    ("==ERROR== the report could not be opened\n", ["no header row"]),
    ('"ID","Kernel Name"\n', ["no kernel"]),
    ('"ID","Name"\n"","" \n"0","k"\n', ['no "Kernel Name"']),
    (HEADER + ',"gpu__time_duration.sum"\n' + '"",' * 11 + '"nsecond"\n"0","k"\n',
     ["has 2 cells but the header 12"]),
])
def test_what_is_not_an_export_is_refused(text, words):
    with pytest.raises(NcuCsvError) as caught:
        parse_export(text)
    for word in words:
        assert word in str(caught.value)


def test_combining_without_every_duration_weighs_kernels_equally_and_sums_nothing():
    combined = combine([NcuMetrics(duration_ns=100.0, sm_throughput_pct=10.0),
                        NcuMetrics(duration_ns=None, sm_throughput_pct=30.0)])
    assert combined.duration_ns is None and combined.sm_throughput_pct == 20.0
    assert combined.l2_hit_rate_pct is None


@pytest.mark.skipif(not REAL_H100.exists(), reason="the real H100 export is not captured yet "
                    "(tests/fixtures/README.md says how)")
def test_real_h100_export_parses_with_every_key_metric():
    metrics, kernels = parse_export(REAL_H100.read_text(encoding="utf-8"))
    assert kernels and metrics.duration_ns and metrics.duration_ns > 0
    missing = [name for name in ("duration_ns", "dram_throughput_pct", "sm_throughput_pct",
                                 "tensor_pipe_pct", "achieved_occupancy_pct",
                                 "l2_hit_rate_pct", "dram_bytes")
               if getattr(metrics, name) is None]
    # A missing one means ncu on the H100 names it differently: add that name to the
    # lists in sparsek/runner/ncu_parse.py.
    assert not missing, f"metrics absent from the real export: {missing}"
    for name in ("dram_throughput_pct", "sm_throughput_pct", "tensor_pipe_pct",
                 "achieved_occupancy_pct", "l2_hit_rate_pct"):
        assert 0 <= getattr(metrics, name) <= 110, name
    assert sum(k.metrics.duration_ns for k in kernels) == pytest.approx(metrics.duration_ns)
    assert 1e8 < metrics.sm_frequency_hz < 3e9  # an H100 runs its SMs at 0.3 to 2 GHz
