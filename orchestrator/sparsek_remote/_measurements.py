"""The report's markdown on how each number was measured: sampling and stop reason,
the card's state and throttling, rates against the card's measured ceilings,
speedups against every dense baseline, and Nsight Compute's metrics.

Only what a bundle holds is shown: a bundle written before these fields existed
gets none of these tables, and a missing value is a dash, never a zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from sparsek_remote.jobspec import TimingPolicy
from sparsek_remote.schema import CardState, CaseResult, Ceilings, NcuMetrics

# The ceilings of the GPU that measured a result (``Results.ceilings_for``).
CeilingsFor = Callable[[CaseResult], Ceilings | None]

NO_NUMBER = "—"


def case_tables(results: Sequence[CaseResult], *, dtype: str | None, ceilings_for: CeilingsFor,
                dense: Sequence[str]) -> list[str]:
    """Markdown blocks for one case: measurement, rates against ceilings and dense
    baselines, Nsight Compute; each only when it has something to show."""
    timed = [r for r in results if r.status == "ok" and r.timing is not None]
    blocks = []
    if any(r.timing.stop_reason or r.card_before or r.card_after for r in timed):
        blocks.append(_measurement_table(timed))
    medians = {r.implementation: r.timing.stats.median_ms for r in timed}
    # With one dense baseline the main table's speedup column already says it all.
    baselines = [d for d in dense if medians.get(d)]
    baselines = baselines if len(baselines) > 1 else []
    if timed and (any(ceilings_for(r) for r in timed) or baselines):
        blocks.append(_rates_table(timed, dtype, ceilings_for, baselines, medians))
    profiled = [r for r in results if r.ncu is not None]
    if any(r.ncu.metrics is not None for r in profiled):
        blocks.append(_ncu_table([r for r in profiled if r.ncu.metrics is not None]))
    failures = [f"- `{r.implementation}`: no Nsight Compute profile: {md(r.ncu.error)}"
                for r in profiled if r.ncu.error]
    if failures:
        blocks.append("\n".join(failures))
    return blocks


def throttle_banner(results: Sequence[CaseResult]) -> str | None:
    """A warning naming every timing taken while the card was throttled, or None."""
    hit = [r for r in results if r.throttled]
    if not hit:
        return None
    names = ", ".join(f"`{r.case}` / `{r.implementation}`" for r in hit)
    return (f"> **⚠ {len(hit)} timing(s) were taken while the card was throttled (clocks held "
            f"down by power or heat): {names}. Their numbers are lower bounds of the card's "
            "speed; compare them with care.**")


def card_text(card: CardState | None) -> str | None:
    """One line on the card's state, for the provenance table."""
    if card is None:
        return None
    if card.source == "unavailable":
        return f"not readable ({card.note or 'no reason given'})"
    parts = [_unit(card.sm_clock_mhz, "MHz SM"), _unit(card.max_sm_clock_mhz, "MHz max SM"),
             _unit(card.memory_clock_mhz, "MHz memory"), _unit(card.temperature_c, "°C"),
             _power(card.power_w, card.power_limit_w)]
    reasons = ", ".join(card.throttle_reasons) or "none"
    return f"{', '.join(p for p in parts if p)}; clock reasons: {reasons} (via {card.source})"


def ceilings_text(ceilings: Ceilings | None) -> str | None:
    if ceilings is None:
        return None
    mm = ", ".join(f"{d} {num(v)} TFLOP/s" for d, v in ceilings.matmul_tflops.items())
    copy = f"copy {num(ceilings.copy_gbps)} GB/s" if ceilings.copy_gbps else "no copy rate"
    return f"matmul {mm or 'not measured'}; {copy} ({ceilings.method})"


def timing_policy_text(policy: TimingPolicy) -> str:
    """The stopping rule of a policy already resolved for its device."""
    least = min(policy.min_repetitions, policy.repetitions)
    after = f"after at least {least} samples" + (f" and {policy.min_seconds:g} s"
                                                  if policy.min_seconds else "")
    return (f"sampled until the median's 95% CI is within ±{policy.target_ci_rel:.1%} "
            f"({after}), {policy.repetitions} samples, or {policy.max_seconds:g} s")


def _measurement_table(timed: Sequence[CaseResult]) -> str:
    header = ["implementation", "samples", "method", "95% CI of median", "stop",
              "card during timing (before → after)", "throttled"]
    spread = any(r.gpu_index is not None for r in timed)
    header += ["GPU"] if spread else []
    rows = []
    for r in timed:
        t = r.timing
        method = t.method + (f" ({t.calls_per_sample} calls/sample)" if t.calls_per_sample > 1
                             else "")
        if t.rotation_sets > 1:
            method += f", {t.rotation_sets} input sets"
        if t.host_bound:
            method += (f"; host-bound: {num(t.host_enqueue_ms)} ms to queue a call, "
                       "so a loop of calls runs at the host's pace")
        rows.append([f"`{r.implementation}`", str(t.stats.n), md(method), _ci(r),
                     t.stop_reason or NO_NUMBER, _card_change(r.card_before, r.card_after),
                     _throttle_cell(r)]
                    + ([NO_NUMBER if r.gpu_index is None else str(r.gpu_index)] if spread
                       else []))
    return table(header, rows, numeric=range(1, 2))


def _rates_table(timed: Sequence[CaseResult], dtype: str | None, ceilings_for: CeilingsFor,
                 baselines: Sequence[str], medians: dict[str, float]) -> str:
    header = ["implementation", "TFLOP/s", f"% of {dtype or ''} matmul ceiling", "GB/s",
              "% of copy ceiling"] + [f"speedup vs `{b}`" for b in baselines]
    rows = []
    for r in timed:
        median = medians[r.implementation]
        ceilings = ceilings_for(r)
        peak = ceilings.matmul_tflops.get(dtype) if ceilings and dtype else None
        copy = ceilings.copy_gbps if ceilings else None
        rows.append([f"`{r.implementation}`", num(r.tflops), _pct(r.tflops, peak),
                     num(r.gbps), _pct(r.gbps, copy)]
                    + [f"{medians[b] / median:.2f}x" if median else NO_NUMBER
                       for b in baselines])
    return table(header, rows, numeric=range(1, len(header)))


def _ncu_table(profiled: Sequence[CaseResult]) -> str:
    header = ["implementation", "kernels", "ncu duration us", "DRAM %", "SM %", "tensor pipe %",
              "achieved occupancy %", "L2 hit %", "SM clock MHz", "report"]
    rows = []
    for r in profiled:
        m: NcuMetrics = r.ncu.metrics
        duration_us = None if m.duration_ns is None else m.duration_ns / 1e3
        clock = whole(None if m.sm_frequency_hz is None else m.sm_frequency_hz / 1e6)
        rows.append([f"`{r.implementation}`", str(len(r.ncu.kernels)), num(duration_us),
                     num(m.dram_throughput_pct), num(m.sm_throughput_pct),
                     num(m.tensor_pipe_pct), num(m.achieved_occupancy_pct),
                     num(m.l2_hit_rate_pct), clock,
                     f"`{r.ncu.report_path}`" if r.ncu.report_path else NO_NUMBER])
    note = ("Nsight Compute, clock control " + ", ".join(sorted({r.ncu.clock_control
                                                                 for r in profiled}))
            + "; percentages of a call of several kernels are weighted by kernel duration.")
    return note + "\n\n" + table(header, rows, numeric=range(1, len(header) - 1))


def _ci(result: CaseResult) -> str:
    s = result.timing.stats
    reach = max(s.median_ms - s.ci95_low_ms, s.ci95_high_ms - s.median_ms)
    rel = f" (±{reach / s.median_ms:.2%})" if s.median_ms > 0 else ""
    return f"{num(s.ci95_low_ms)} – {num(s.ci95_high_ms)} ms{rel}"


def _card_change(before: CardState | None, after: CardState | None) -> str:
    known = [c for c in (before, after) if c is not None and c.source != "unavailable"]
    if not known:
        return NO_NUMBER

    def span(field: str, unit: str) -> str | None:
        values = [getattr(c, field) if c else None for c in (before, after)]
        if all(v is None for v in values):
            return None
        return " → ".join(whole(v) for v in values) + f" {unit}"

    parts = [span("sm_clock_mhz", "MHz"), span("temperature_c", "°C"), span("power_w", "W")]
    return ", ".join(p for p in parts if p) or NO_NUMBER


def _throttle_cell(result: CaseResult) -> str:
    if result.throttled is None:
        return "unknown"
    if result.throttled:
        return f"**⚠ yes**: {md(result.throttle_detail or '')}"
    return "no"


def _pct(value: float | None, ceiling: float | None) -> str:
    if value is None or not ceiling:
        return NO_NUMBER
    return f"{value / ceiling:.1%}"


def _unit(value: float | None, unit: str) -> str | None:
    return None if value is None else f"{whole(value)} {unit}"


def _power(power: float | None, limit: float | None) -> str | None:
    if power is None:
        return None
    return f"{whole(power)} W" + (f" of {whole(limit)} W" if limit else "")


def whole(value: float | None) -> str:
    """Clocks, temperatures and watts: whole numbers, no thousands separator."""
    return NO_NUMBER if value is None or not math.isfinite(value) else f"{value:.0f}"


def table(header: list[str], rows: list[list[str]], *, numeric: range) -> str:
    align = ["---:" if i in numeric else "---" for i in range(len(header))]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [header, align, *rows])


def num(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return NO_NUMBER
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def md(text: object) -> str:
    """Text from a host made safe for one table cell or line: no pipes, newlines or HTML."""
    flat = " ".join(str(text).split()).replace("|", "\\|").replace("<", "&lt;")
    return flat if len(flat) <= 300 else flat[:299] + "…"
