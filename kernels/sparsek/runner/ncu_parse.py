"""Reading Nsight Compute's raw-page CSV export (``ncu --import R.ncu-rep --csv
--page raw``) into the bundle's metrics.

The export (ncu 2023 to 2025) is one table: a row of quoted column names (columns
that identify the kernel, such as "ID" and "Kernel Name", then one per metric), a
row of units (empty under the identifying columns), then one row per profiled
kernel. Lines ncu prints about itself ("==PROF==", "==WARNING==") may come before or
after the table. Numbers may carry thousands separators ("1,234,567.5"), and a
metric that was not collected reads "n/a" or nothing. Units are converted to base
units here (ns, bytes, bytes/s, Hz, %), whatever scaling ncu chose.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass

from sparsek_remote.schema import NcuKernel, NcuMetrics

ID_COLUMN = "ID"
NAME_COLUMN = "Kernel Name"
MAX_NAME_CHARS = 1000

DURATION = ("gpu__time_duration.sum",)
DRAM_PCT = ("gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed",
            "dram__throughput.avg.pct_of_peak_sustained_elapsed")
MEMORY_PCT = ("gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed",)
SM_PCT = ("sm__throughput.avg.pct_of_peak_sustained_elapsed",)
OCCUPANCY = ("sm__warps_active.avg.pct_of_peak_sustained_active",)
L2_HIT = ("lts__t_sector_hit_rate.pct",)
DRAM_BYTES = ("dram__bytes.sum",)
DRAM_READ_WRITE = ("dram__bytes_read.sum", "dram__bytes_write.sum")
DRAM_RATE = ("dram__bytes.sum.per_second",)
SM_FREQUENCY = ("smsp__cycles_elapsed.avg.per_second", "sm__cycles_elapsed.avg.per_second",
                "gpc__cycles_elapsed.avg.per_second")
# Tensor pipes: Hopper's warpgroup MMA (gmma) and the older mma.sync (hmma) are
# separate pipes, so the busiest one present is the utilization reported.
TENSOR_CYCLES = ("sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active",
                 "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active",
                 "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active")
TENSOR_FALLBACK = re.compile(
    r"^sm__(?:pipe|inst_executed_pipe)_tensor\w*\.avg\.pct_of_peak_sustained_(?:active|elapsed)$")

_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?(?:[eE][+-]?\d+)?")
_SI = {"": 1.0, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}
_TIME_NS = {"nsecond": 1.0, "usecond": 1e3, "msecond": 1e6, "second": 1e9}


class NcuCsvError(ValueError):
    """The text is not a raw-page CSV export of ncu."""


@dataclass(frozen=True)
class KernelRow:
    """One profiled kernel: its numeric metrics in base units (a metric without a
    number is absent) and each metric's kind of unit ("ns", "byte", "byte/s", "hz",
    "%", or the unit as printed when it is none of those)."""

    id: str
    name: str
    values: dict[str, float]
    kinds: dict[str, str]


def parse_export(text: str) -> tuple[NcuMetrics, list[NcuKernel]]:
    """The call's metrics (kernels combined) and each kernel's own."""
    rows = read_raw_csv(text)
    if not rows:
        raise NcuCsvError("the export holds no kernel: nothing was profiled in the range")
    kernels = [NcuKernel(name=row.name[:MAX_NAME_CHARS], metrics=kernel_metrics(row),
                         tensor_pipe_metric=tensor_metric(row)) for row in rows]
    return combine([k.metrics for k in kernels]), kernels


def read_raw_csv(text: str) -> list[KernelRow]:
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines)
                  if line.startswith(f'"{ID_COLUMN}",') or line.startswith(f"{ID_COLUMN},")), None)
    if start is None:
        raise NcuCsvError('no header row starting with "ID" was found; is this the output '
                          "of ncu --import ... --csv --page raw?")
    table = [line for line in lines[start:] if line.strip() and not line.startswith("==")]
    records = list(csv.reader(table))
    header, rest = records[0], records[1:]
    if NAME_COLUMN not in header:
        raise NcuCsvError(f'the header row has no "{NAME_COLUMN}" column')
    units = [""] * len(header)
    if rest and rest[0] and rest[0][0] == "":  # the units row: nothing under "ID"
        units, rest = rest[0], rest[1:]
    if len(units) != len(header):
        raise NcuCsvError(f"the units row has {len(units)} cells but the header {len(header)}")
    return [_row(header, units, cells) for cells in rest if cells and cells[0] != ""]


def _row(header: list[str], units: list[str], cells: list[str]) -> KernelRow:
    if len(cells) != len(header):
        raise NcuCsvError(f"a kernel row has {len(cells)} cells but the header {len(header)}")
    named = dict(zip(header, cells, strict=True))
    values: dict[str, float] = {}
    kinds: dict[str, str] = {}
    for column, unit, cell in zip(header, units, cells, strict=True):
        if "__" not in column:  # identifying columns: ID, Kernel Name, Grid Size, NVTX...
            continue
        number = _number(cell)
        kind, factor = unit_kind(unit)
        kinds[column] = kind
        if number is not None:
            values[column] = number * factor
    return KernelRow(id=named[ID_COLUMN], name=named[NAME_COLUMN], values=values, kinds=kinds)


def _number(cell: str) -> float | None:
    text = cell.strip()
    if _THOUSANDS.fullmatch(text):
        text = text.replace(",", "")
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def unit_kind(unit: str) -> tuple[str, float]:
    """(kind, factor to base units) of a unit as ncu prints it."""
    unit = unit.strip()
    if unit in _TIME_NS:
        return "ns", _TIME_NS[unit]
    if unit == "%":
        return "%", 1.0
    match = re.fullmatch(r"([KMGTP]?)byte(/second)?", unit)
    if match:
        return ("byte/s" if match.group(2) else "byte"), _SI[match.group(1)]
    match = re.fullmatch(r"([KMGTP]?)hz", unit, flags=re.IGNORECASE)
    if match:
        return "hz", _SI[match.group(1).upper()]
    match = re.fullmatch(r"cycle/(nsecond|usecond|msecond|second)", unit)
    if match:
        return "hz", 1e9 / _TIME_NS[match.group(1)]
    return unit, 1.0


def _first(row: KernelRow, names: tuple[str, ...], kind: str) -> float | None:
    for name in names:
        if name in row.values and row.kinds.get(name) == kind:
            return row.values[name]
    return None


def tensor_metric(row: KernelRow) -> str | None:
    """The tensor-pipe metric reported for ``row``: the busiest listed pipe, else the
    busiest of any other tensor-pipe percentage ncu collected."""
    listed = [n for n in TENSOR_CYCLES if n in row.values and row.kinds.get(n) == "%"]
    others = [n for n in row.values if TENSOR_FALLBACK.match(n) and row.kinds.get(n) == "%"]
    candidates = listed or sorted(others)
    return max(candidates, key=lambda n: row.values[n]) if candidates else None


def kernel_metrics(row: KernelRow) -> NcuMetrics:
    duration = _first(row, DURATION, "ns")
    tensor = tensor_metric(row)
    return NcuMetrics(
        duration_ns=duration,
        dram_throughput_pct=_first(row, DRAM_PCT, "%"),
        memory_throughput_pct=_first(row, MEMORY_PCT, "%"),
        sm_throughput_pct=_first(row, SM_PCT, "%"),
        tensor_pipe_pct=row.values[tensor] if tensor else None,
        achieved_occupancy_pct=_first(row, OCCUPANCY, "%"),
        l2_hit_rate_pct=_first(row, L2_HIT, "%"),
        dram_bytes=_dram_bytes(row, duration),
        sm_frequency_hz=_first(row, SM_FREQUENCY, "hz"),
    )


def _dram_bytes(row: KernelRow, duration_ns: float | None) -> float | None:
    total = _first(row, DRAM_BYTES, "byte")
    if total is not None:
        return total
    parts = [_first(row, (name,), "byte") for name in DRAM_READ_WRITE]
    if all(p is not None for p in parts):
        return sum(parts)
    rate = _first(row, DRAM_RATE, "byte/s")
    return rate * duration_ns * 1e-9 if rate is not None and duration_ns is not None else None


_SUMMED = ("duration_ns", "dram_bytes")
_AVERAGED = ("dram_throughput_pct", "memory_throughput_pct", "sm_throughput_pct",
             "tensor_pipe_pct", "achieved_occupancy_pct", "l2_hit_rate_pct", "sm_frequency_hz")


def combine(kernels: list[NcuMetrics]) -> NcuMetrics:
    """One call's metrics from its kernels': times and bytes add up (None unless every
    kernel has them); the rest are averaged, weighted by each kernel's duration when
    every kernel has one, else equally, over the kernels that have them."""
    durations = [k.duration_ns for k in kernels]
    timed = all(d is not None and d > 0 for d in durations)
    fields: dict[str, float | None] = {}
    for name in _SUMMED:
        values = [getattr(k, name) for k in kernels]
        fields[name] = sum(values) if all(v is not None for v in values) else None
    for name in _AVERAGED:
        pairs = [(getattr(k, name), d if timed else 1.0) for k, d in zip(kernels, durations,
                                                                          strict=True)]
        pairs = [(v, w) for v, w in pairs if v is not None]
        weight = sum(w for _, w in pairs)
        fields[name] = sum(v * w for v, w in pairs) / weight if pairs and weight > 0 else None
    return NcuMetrics(**fields)
