"""The report's PNG charts: latency, speedup and TFLOP/s of one bundle, its roofline
(with Nsight Compute's points where there are profiles), and the changes between two
runs.

Figures are built as ``matplotlib.figure.Figure`` on an Agg canvas instead of through
pyplot, so drawing a report never switches the backend or leaves figures open in a
program that imports this module. Charts come back as PNG bytes; the report decides
where they are written.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sparsek_remote.schema import CaseResult, Ceilings

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# matplotlib is imported where a chart is drawn, not here: it costs most of a second, and
# every command would pay it at start-up (the report module is reached from the CLI).

DPI = 110
# A spread of values wider than this is drawn on a log axis, so that a 50 us case
# and a 50 ms case can both be read on one chart.
LOG_SPAN = 30.0
MAX_BAR_LABELS = 24
VERDICT_COLOURS = {"regression": "#c0392b", "improvement": "#1e8449", "within noise": "#7f8c8d"}


@dataclass(frozen=True)
class Chart:
    """A PNG to write as ``filename``, or (``png`` None) the reason there is none."""

    filename: str
    caption: str
    png: bytes | None
    reason: str = ""

    def markdown(self) -> str:
        if self.png is None:
            return f"*No {self.caption} chart: {self.reason}.*"
        return f"![{self.caption}]({self.filename})"


@dataclass(frozen=True)
class Bar:
    """One bar of a grouped chart. ``value`` None draws no bar but writes ``note``
    at its foot, so a missing number is never read as zero."""

    group: str
    series: str
    value: float | None
    low: float | None = None
    high: float | None = None
    note: str = ""


@dataclass(frozen=True)
class Delta:
    """One row of a change chart: ``change`` and ``noise`` are fractions of the old value."""

    label: str
    change: float
    noise: float
    verdict: str


def timed_median(result: CaseResult | None) -> float | None:
    """The median in ms of a case that passed its gate and was timed, else None."""
    if result is None or result.status != "ok" or result.timing is None:
        return None
    return result.timing.stats.median_ms


def bundle_charts(results: list[CaseResult], *, tag: str, where: str,
                  baseline: str | None) -> list[Chart]:
    """Latency, speedup and TFLOP/s charts of one bundle; ``where`` ends each title."""
    speedup_empty = (f"no case has timings for both {baseline} and another implementation"
                     if baseline else "there is no baseline implementation")
    return [
        _chart(f"latency-{tag}.png", "latency", _bars(results, timed_median, spread=True),
               "no case was timed", title=f"Median latency (bars: q1 to q3)\n{where}",
               ylabel="ms"),
        _chart(f"speedup-{tag}.png", f"speedup vs {baseline}" if baseline else "speedup",
               _speedup_bars(results, baseline), speedup_empty,
               title=f"Speedup vs {baseline} (its median / each median)\n{where}",
               ylabel="speedup (x)", reference=1.0, value_label=lambda v: f"{v:.2f}x"),
        _chart(f"tflops-{tag}.png", "TFLOP/s", _bars(results, _timed_tflops),
               "no timed case reports TFLOP/s", title=f"Throughput\n{where}",
               ylabel="TFLOP/s"),
    ]


@dataclass(frozen=True)
class RoofPoint:
    """One (case, implementation) on the roofline: arithmetic intensity in FLOP per
    byte of DRAM traffic and the rate in TFLOP/s. ``source`` "timing" uses the fewest
    bytes that must move and the timed median; "ncu" the DRAM bytes and kernel time
    Nsight Compute measured."""

    label: str
    series: str
    intensity: float
    tflops: float
    source: str


def roof_points(results: Sequence[CaseResult]) -> list[RoofPoint]:
    """The timing point of every timed result and the ncu point of every profiled one."""
    points = []
    for r in results:
        if timed_median(r) is None:
            continue
        if r.tflops and r.bytes > 0:
            points.append(RoofPoint(r.case, r.implementation, r.flops / r.bytes, r.tflops,
                                    "timing"))
        m = r.ncu.metrics if r.ncu is not None else None
        if m is not None and m.dram_bytes and m.duration_ns and r.flops > 0:
            points.append(RoofPoint(r.case, r.implementation, r.flops / m.dram_bytes,
                                    r.flops / (m.duration_ns * 1e-9) / 1e12, "ncu"))
    return points


def roofline(results: Sequence[CaseResult], ceilings: Ceilings | None, *, dtypes: Sequence[str],
             tag: str, where: str) -> Chart | None:
    """The bundle's roofline chart; None (no chart, nothing said) for a bundle with
    neither measured ceilings nor ncu profiles, as written before either existed."""
    points = roof_points(results)
    profiled = any(p.source == "ncu" for p in points)
    if ceilings is None and not profiled:
        return None
    filename = f"roofline-{tag}.png"
    if not points:
        return Chart(filename, "roofline", None, "no case was timed")
    roofs = _roofs(ceilings, dtypes)
    title = ("Roofline: hollow = timed median over the fewest bytes, filled = Nsight Compute"
             f"\n{where}")
    return Chart(filename, "roofline", roofline_chart(points, roofs, title=title))


def _roofs(ceilings: Ceilings | None, dtypes: Sequence[str]) -> list[tuple[str, float, float]]:
    if ceilings is None or not ceilings.copy_gbps:
        return []
    return [(d, peak, ceilings.copy_gbps) for d, peak in ceilings.matmul_tflops.items()
            if d in dtypes and peak > 0]


def roofline_chart(points: Sequence[RoofPoint], roofs: Sequence[tuple[str, float, float]], *,
                   title: str) -> bytes:
    """Log-log roofline: one roof per (dtype, matmul TFLOP/s, copy GB/s); points coloured
    by series, hollow for timing, filled for ncu, labelled by case when few."""
    fig = _figure(width_in=9.5, height_in=6.0)
    ax = fig.add_subplot()
    xs = [p.intensity for p in points]
    ridges = [peak * 1e3 / gbps for _, peak, gbps in roofs]
    lo, hi = min(xs + ridges) / 4, max(xs + ridges) * 4
    grid = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    for dtype, peak, gbps in roofs:
        ax.plot(grid, [min(peak, x * gbps / 1e3) for x in grid], color="black", linewidth=1,
                linestyle="--" if dtype != roofs[0][0] else "-",
                label=f"ceiling {dtype}: {peak:.4g} TFLOP/s, {gbps:.4g} GB/s")
    import matplotlib

    colours = matplotlib.colormaps["tab10"]
    for i, name in enumerate(_unique(p.series for p in points)):
        for source, filled in (("timing", False), ("ncu", True)):
            mine = [p for p in points if p.series == name and p.source == source]
            if mine:
                ax.scatter([p.intensity for p in mine], [p.tflops for p in mine], s=40,
                           facecolors=colours(i % 10) if filled else "none",
                           edgecolors=colours(i % 10), label=f"{name} ({source})")
    if len(points) <= MAX_BAR_LABELS:
        for p in points:
            ax.annotate(_plain(p.label), (p.intensity, p.tflops), fontsize=7,
                        xytext=(4, 2), textcoords="offset points", color="#444444")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte of DRAM traffic)")
    ax.set_ylabel("TFLOP/s")
    ax.set_title(_plain(title), fontsize=10)
    ax.grid(which="both", alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(fig)


def changes_chart(deltas: Sequence[Delta], *, filename: str, title: str) -> Chart:
    if not deltas:
        return Chart(filename, "change", None,
                     "no (case, implementation) has timings in both runs")
    return Chart(filename, "change", change_chart(deltas, title=title))


def _chart(filename: str, caption: str, bars: list[Bar], empty: str, **chart_args) -> Chart:
    if not any(bar.value is not None for bar in bars):
        return Chart(filename, caption, None, empty)
    return Chart(filename, caption, grouped_bars(bars, **chart_args))


def _bars(results: list[CaseResult], value: Callable[[CaseResult], float | None], *,
          spread: bool = False) -> list[Bar]:
    """One bar per result; ``spread`` adds q1..q3 error bars from its timing."""
    out = []
    for r in results:
        stats = r.timing.stats if spread and r.timing is not None else None
        out.append(Bar(r.case, r.implementation, value(r),
                       stats.q1_ms if stats else None, stats.q3_ms if stats else None,
                       note="" if r.status == "ok" else r.status.replace("_", " ")))
    return out


def _timed_tflops(result: CaseResult) -> float | None:
    return result.tflops if timed_median(result) is not None else None


def _speedup_bars(results: list[CaseResult], baseline: str | None) -> list[Bar]:
    if baseline is None:
        return []
    base = {r.case: timed_median(r) for r in results if r.implementation == baseline}
    out = []
    for r in results:
        if r.implementation == baseline:
            continue
        base_ms, ms = base.get(r.case), timed_median(r)
        value = base_ms / ms if base_ms and ms else None
        note = "" if value else ("no baseline" if ms else r.status.replace("_", " "))
        out.append(Bar(r.case, r.implementation, value, note=note))
    return out


def grouped_bars(bars: Sequence[Bar], *, title: str, ylabel: str,
                 reference: float | None = None,
                 value_label: Callable[[float], str] | None = None) -> bytes:
    """Bars grouped by ``group`` (x axis), one colour per ``series``; error bars
    from ``low`` to ``high`` where given; a dashed line at ``reference``."""
    groups = _unique(b.group for b in bars)
    series = _unique(b.series for b in bars)
    width = 0.8 / len(series)
    fig = _figure(width_in=min(26.0, max(8.5, 3.2 + 0.45 * len(groups) * len(series))),
                  height_in=5.0)
    ax = fig.add_subplot()
    import matplotlib

    colours = matplotlib.colormaps["tab10"]
    log = _wants_log([b.value for b in bars] + [reference])
    for i, name in enumerate(series):
        mine = {b.group: b for b in bars if b.series == name}
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        drawn = _draw_series(ax, xs, [mine.get(g) for g in groups], width,
                             colour=colours(i % 10), name=name)
        if value_label is not None and len(bars) <= MAX_BAR_LABELS and drawn is not None:
            ax.bar_label(drawn, labels=[value_label(v) if v == v else "" for v in
                                        drawn.datavalues], fontsize=7, padding=2)
    if reference is not None:
        ax.axhline(reference, color="black", linestyle="--", linewidth=1,
                   label=f"baseline ({reference:g})")
    _finish_grouped_axes(ax, groups, title=title, ylabel=ylabel, log=log, reference=reference)
    return _png(fig)


def _finish_grouped_axes(ax, groups: list[str], *, title: str, ylabel: str, log: bool,
                         reference: float | None) -> None:
    # Fixed limits keep the notes of groups with no bar at all inside the axes.
    ax.set_xlim(-0.5, len(groups) - 0.5)
    if log:
        ax.set_yscale("log")
        from matplotlib.ticker import FuncFormatter, NullFormatter

        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    elif reference is not None:
        ax.set_ylim(top=max(ax.get_ylim()[1], reference * 1.1))
    crowded = len(groups) > 3
    ax.set_xticks(range(len(groups)), [_plain(g) for g in groups],
                  rotation=25 if crowded else 0, ha="right" if crowded else "center")
    ax.set_ylabel(ylabel)
    ax.set_title(_plain(title), fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    # Outside the axes, so the legend never hides a bar or the reference line.
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))


def change_chart(deltas: Sequence[Delta], *, title: str) -> bytes:
    """Horizontal bars of relative change in percent, coloured by verdict, over a grey
    band showing each row's noise: a bar inside its band is not a real change."""
    fig = _figure(width_in=9.0, height_in=max(3.0, 1.6 + 0.35 * len(deltas)))
    ax = fig.add_subplot()
    ys = list(range(len(deltas)))
    ax.barh(ys, [2 * d.noise * 100 for d in deltas], left=[-d.noise * 100 for d in deltas],
            height=0.8, color="#e5e7e9", label="noise")
    ax.barh(ys, [d.change * 100 for d in deltas], height=0.5,
            color=[VERDICT_COLOURS.get(d.verdict, "#7f8c8d") for d in deltas])
    ax.axvline(0, color="black", linewidth=1)
    ax.set_yticks(ys, [_plain(d.label) for d in deltas], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("change of the median, % (positive is slower)")
    ax.set_title(_plain(title), fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    from matplotlib.patches import Patch

    handles = [Patch(color=c, label=v) for v, c in VERDICT_COLOURS.items()]
    handles.append(Patch(color="#e5e7e9", label="noise band"))
    ax.legend(handles=handles, fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(fig)


def _draw_series(ax, xs: list[float], bars: list[Bar | None], width: float, *,
                 colour, name: str):
    """Draw one series; returns the bar container, or None when it has no value."""
    values = [b.value if b is not None and b.value is not None else math.nan for b in bars]
    if all(math.isnan(v) for v in values):
        container = None
        ax.bar([], [], width, color=colour, label=name)
    else:
        errors = [_error(b) for b in bars]
        spread = [[e[0] for e in errors], [e[1] for e in errors]] if any(
            b is not None and b.low is not None for b in bars) else None
        container = ax.bar(xs, values, width, color=colour, label=name, yerr=spread,
                           error_kw={"elinewidth": 1, "capsize": 2})
    for x, bar in zip(xs, bars, strict=True):
        if bar is not None and bar.value is None and bar.note:
            ax.annotate(bar.note, (x, 0), xycoords=("data", "axes fraction"), rotation=90,
                        ha="center", va="bottom", fontsize=7, color="#555555",
                        xytext=(0, 3), textcoords="offset points")
    return container


def _error(bar: Bar | None) -> tuple[float, float]:
    if bar is None or bar.value is None or bar.low is None or bar.high is None:
        return (0.0, 0.0)
    return (max(0.0, bar.value - bar.low), max(0.0, bar.high - bar.value))


def _wants_log(values: list[float | None]) -> bool:
    positive = [v for v in values if v is not None and v > 0]
    return len(positive) > 1 and max(positive) / min(positive) > LOG_SPAN


def _figure(*, width_in: float, height_in: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _plain(text: str) -> str:
    """Escape '$' so a device name from a host is never parsed as mathtext."""
    return text.replace("$", r"\$")


def _unique(items) -> list[str]:
    return list(dict.fromkeys(items))
