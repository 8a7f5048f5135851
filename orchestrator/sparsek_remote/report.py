"""The report: a markdown summary and PNG charts of one or more stored runs.

The caller loads and validates the bundles and passes each one in as ``RunData``;
nothing here reads a bundle or reaches a host. A case that failed its gate, erred or
was skipped is shown with its reason and never with a number. Two run ids are
compared case by case, and a change is called a regression or an improvement only
when it is larger than what the two runs' own spread can resolve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sparsek_remote import _measurements, _plots
from sparsek_remote._plots import Chart, timed_median
from sparsek_remote.errors import ConfigError
from sparsek_remote.jobspec import SdpaImpl
from sparsek_remote.schema import CaseResult, GpuProvenance, Manifest, Results, Stats

MARKDOWN_NAME = "report.md"
CPU_BANNER = "CPU run: timings are wall-clock on the CPU and say nothing about GPU speed."
NO_NUMBER = "—"
Verdict = Literal["regression", "improvement", "within noise"]


@dataclass(frozen=True)
class RunData:
    """One validated bundle; a run on several hosts is several of these with one run_id."""

    run_id: str
    host_alias: str
    manifest: Manifest
    results: Results


@dataclass(frozen=True)
class Change:
    """How the median of one (case, implementation) moved from an old run to a new one.

    ``change`` is ``new / old - 1`` (+0.30 is 30 % slower); ``noise`` is the relative
    change the two runs' spread cannot resolve; ``host_alias`` names the host of the
    new run.
    """

    case: str
    implementation: str
    old_ms: float
    new_ms: float
    change: float
    noise: float
    verdict: Verdict
    host_alias: str = ""


@dataclass(frozen=True)
class Report:
    """What ``write_report`` wrote; ``changes`` holds every comparison, ``regressions``
    the ones that got slower beyond the noise."""

    markdown_path: Path
    plot_paths: list[Path]
    regressions: list[Change]
    markdown: str
    changes: list[Change] = field(default_factory=list)


def write_report(runs: list[RunData], out_dir: Path, *, baseline: str | None = None,
                 noise_floor: float = 0.02) -> Report:
    """Write ``report.md`` and its PNG charts into ``out_dir`` and return what was written.

    ``baseline`` names the implementation speedups are taken against (default: the
    first sdpa implementation, cudnn preferred). With exactly two run ids, the first
    one given is "old" and the second "new". ``noise_floor`` is the smallest relative
    change ever called a regression or an improvement.
    """
    _check_request(runs, noise_floor)
    base = choose_baseline(runs, baseline)
    plots: list[Chart] = []
    sections: list[str] = []
    for run in runs:
        p = run.manifest.provenance
        tag, where = (f"{run.run_id}-{run.host_alias}",
                      f"run {run.run_id} on {run.host_alias}, {p.device_name[:60]} ({p.device})")
        run_plots = _plots.bundle_charts(run.results.results, tag=tag, baseline=base,
                                         where=where)
        roofline = _plots.roofline(run.results.results, run.results.ceilings, tag=tag,
                                   where=where, dtypes=[c.dtype for c in run.manifest.job.cases])
        run_plots += [roofline] if roofline is not None else []
        plots += run_plots
        sections.append(_run_section(run, base, run_plots))
    changes, comparison, change_plots = _comparison(runs, noise_floor)
    plots += change_plots
    markdown = "\n\n".join([_title(runs, base, changes), *sections, *comparison]) + "\n"
    out_dir = Path(out_dir)
    paths = _write(out_dir, markdown, plots)
    return Report(markdown_path=out_dir / MARKDOWN_NAME, plot_paths=paths,
                  regressions=[c for c in changes if c.verdict == "regression"],
                  markdown=markdown, changes=changes)


def choose_baseline(runs: list[RunData], requested: str | None = None) -> str | None:
    """The implementation label to take speedups against, or None when there is none."""
    present = _labels(runs)
    if requested is not None:
        if requested not in present:
            raise ConfigError(
                f"baseline {requested!r} is not an implementation of the runs reported",
                hint="choose one of: " + (", ".join(present) or "(the runs hold no results)"),
            )
        return requested
    sdpa = [impl for run in runs for impl in run.manifest.job.implementations
            if isinstance(impl, SdpaImpl) and impl.label in present]
    preferred = [impl for impl in sdpa if impl.backend == "cudnn"] or sdpa
    return preferred[0].label if preferred else None


def compare(old: RunData, new: RunData, *, noise_floor: float = 0.02) -> list[Change]:
    """One Change per (case, implementation) timed in both bundles, in the old order."""
    later = _index(new)
    changes = []
    for key, before in _index(old).items():
        after = later.get(key)
        if timed_median(before) and after is not None and timed_median(after):
            changes.append(_change(*key, before.timing.stats, after.timing.stats,
                                   noise_floor, new.host_alias))
    return changes


def _change(case: str, impl: str, old: Stats, new: Stats, floor: float, host: str) -> Change:
    change = new.median_ms / old.median_ms - 1
    noise = max(floor, _spread(old), _spread(new))
    verdict: Verdict = ("regression" if change > noise
                        else "improvement" if change < -noise else "within noise")
    return Change(case, impl, old.median_ms, new.median_ms, change, noise, verdict, host)


def _spread(stats: Stats) -> float:
    """The larger of the relative half-width of the median's 95 % CI and IQR/median/2."""
    ci = (stats.ci95_high_ms - stats.ci95_low_ms) / 2
    return max(ci, stats.iqr_ms / 2) / stats.median_ms


def _check_request(runs: list[RunData], noise_floor: float) -> None:
    if not runs:
        raise ConfigError("there are no runs to report", hint="name at least one stored run")
    if not (isinstance(noise_floor, int | float) and 0 <= noise_floor < 1):
        raise ConfigError(f"the noise floor must be a fraction in [0, 1); got {noise_floor!r}",
                          hint="0.02 means changes under 2 % are never called real")
    seen: set[tuple[str, str]] = set()
    for run in runs:
        key = (run.run_id, run.host_alias)
        if key in seen:
            raise ConfigError(f"run {run.run_id} on {run.host_alias} is given twice",
                              hint="name each stored run once")
        seen.add(key)


# --- one bundle ------------------------------------------------------------------


def _run_section(run: RunData, base: str | None, plots: list[Chart]) -> str:
    parts = [f"## Run `{run.run_id}` on `{run.host_alias}`"]
    if run.manifest.provenance.device == "cpu":
        parts.append(f"> **{CPU_BANNER}**")
    throttled = _measurements.throttle_banner(run.results.results)
    if throttled:
        parts.append(throttled)
    parts.append(_provenance_table(run))
    parts += [_case_section(run, case, base) for case in _cases(run)]
    parts += [plot.markdown() for plot in plots]
    return "\n\n".join(parts)


def _provenance_table(run: RunData) -> str:
    p = run.manifest.provenance
    device = f"{p.device_name} ({p.device}" + (
        f", compute capability {p.compute_capability})" if p.compute_capability else ")")
    rows = [("job", run.manifest.job.name), ("device", device), ("driver", p.driver_version),
            ("CUDA", p.cuda_version), ("torch", p.torch_version), ("triton", p.triton_version),
            ("git commit", _commit(p.git_commit, p.git_dirty)), ("image", p.image_digest),
            ("created at", run.manifest.created_at), ("timing", _timing_summary(run))]
    rows += [(f"GPU {g.index}", _gpu_text(g)) for g in p.gpus]
    ceilings = [(f"measured ceilings, GPU {c.gpu_index}", c) for c in run.results.gpu_ceilings]
    ceilings = ceilings or [("measured ceilings", run.results.ceilings)]
    optional = [("card at start", _measurements.card_text(p.card))] + [
        (name, _measurements.ceilings_text(c)) for name, c in ceilings]
    rows += [(name, value) for name, value in optional if value]
    body = "\n".join(f"| {name} | {_md(value) if value else 'unknown'} |" for name, value in rows)
    return "| provenance | |\n|---|---|\n" + body


def _gpu_text(gpu: GpuProvenance) -> str:
    """One GPU of a run spread over several: what it is and its state at the start."""
    parts = [gpu.name] + [f"{label} {value}" for label, value in (
        ("UUID", gpu.uuid), ("driver", gpu.driver_version),
        ("compute capability", gpu.compute_capability)) if value]
    card = _measurements.card_text(gpu.card) if gpu.card else None
    return ", ".join(parts) + (f"; at start: {card}" if card else "")


def _commit(commit: str | None, dirty: bool | None) -> str | None:
    if commit is None:
        return None
    state = {True: "dirty: uncommitted changes", False: "clean", None: "dirty flag unknown"}
    return f"{commit} ({state[dirty]})"


def _timing_summary(run: RunData) -> str:
    timed = [r.timing for r in run.results.results if r.timing is not None]
    if not timed:
        return "no case was timed"
    t = timed[0]
    policy = run.manifest.job.timing.for_device(t.device)
    methods = " and ".join(dict.fromkeys(x.method for x in timed))
    warmup = f"warm-up {policy.warmup} calls" + (f" and {policy.warmup_seconds:g} s"
                                                 if policy.warmup_seconds else "")
    summary = f"{methods}, {warmup}, L2 {'flushed' if t.l2_flushed else 'not flushed'}"
    if any(x.stop_reason for x in timed):
        summary += "; " + _measurements.timing_policy_text(policy)
    return summary


def _case_section(run: RunData, case: str, base: str | None) -> str:
    index = _index(run)
    results = [index[(case, impl)] for impl in _impls(run) if (case, impl) in index]
    spec = next((c for c in run.manifest.job.cases if c.name == case), None)
    title = f"### `{case}`"
    if spec is not None:
        title += (f" (B={spec.B}, Hq={spec.Hq}, Hkv={spec.Hkv}, S={spec.S}, D={spec.D}, "
                  f"{spec.dtype}, {'causal' if spec.causal else 'not causal'}, "
                  f"kv_budget={spec.kv_budget}, window={spec.window})")
    header = ["implementation", "gate", "median ms", "IQR ms", "95% CI ms", "us/head",
              "TFLOP/s", "GB/s"] + ([f"speedup vs {base}"] if base else [])
    base_ms = timed_median(index.get((case, base))) if base else None
    rows = [_row(r, spec.Hq if spec else None, base_ms, base is not None) for r in results]
    table = _table(header, rows, numeric=range(2, len(header)))
    reasons = [f"- `{r.implementation}`: {_md(_reason(r))}" for r in results if r.status != "ok"]
    dense = [i.label for i in run.manifest.job.implementations if isinstance(i, SdpaImpl)]
    measured = _measurements.case_tables(results, dtype=spec.dtype if spec else None,
                                         ceilings_for=run.results.ceilings_for, dense=dense)
    return "\n\n".join([title, table, *(["\n".join(reasons)] if reasons else []), *measured])


def _row(result: CaseResult, hq: int | None, base_ms: float | None, speedup: bool) -> list[str]:
    cells = [f"`{result.implementation}`", _gate_cell(result)]
    if result.status != "ok" or result.timing is None:
        return cells + [NO_NUMBER] * (6 + speedup)
    s = result.timing.stats
    cells += [_num(s.median_ms), _num(s.iqr_ms), f"{_num(s.ci95_low_ms)} – {_num(s.ci95_high_ms)}",
              _num(s.median_ms * 1000 / hq) if hq else NO_NUMBER,
              _num(result.tflops), _num(result.gbps)]
    if speedup:
        cells.append(f"{base_ms / s.median_ms:.2f}x" if base_ms and s.median_ms else NO_NUMBER)
    return cells


def _gate_cell(result: CaseResult) -> str:
    gate = result.gate
    if gate is None:
        return result.status.replace("_", " ")
    verdict = "pass" if gate.passed else "fail"
    return verdict if gate.rel_error is None else f"{verdict} (rel err {gate.rel_error:.1e})"


def _reason(result: CaseResult) -> str:
    gate = result.gate
    said = " ".join(x for x in (gate.message if gate else "", result.error or "") if x)
    if result.status == "gate_failed" and gate is not None:
        error = "unknown" if gate.rel_error is None else f"{gate.rel_error:.1e}"
        return (f"gate failed: rel err {error} against tolerance {gate.tolerance:.1e}"
                + (f"; {said}" if said else ""))
    return f"{result.status.replace('_', ' ')}: {said or 'no reason given'}"


# --- two runs ------------------------------------------------------------------------


def _comparison(runs: list[RunData], floor: float) -> tuple[list[Change], list[str],
                                                             list[Chart]]:
    groups = _group(runs)
    if len(groups) != 2:
        skipped = (f"## Change\n\nA comparison needs exactly two run ids; {len(groups)} "
                   "were given, so each is reported on its own.")
        return [], [skipped] if len(groups) > 2 else [], []
    (old_id, old), (new_id, new) = groups.items()
    parts = [f"## Change: `{old_id}` (old) → `{new_id}` (new)",
             "A change is called a regression or an improvement only beyond the noise: the "
             "larger of each run's 95% CI half-width and IQR/2, relative to its median, and "
             f"the floor of {floor:.1%}."]
    changes: list[Change] = []
    plots: list[Chart] = []
    pairs = _pairs(old, new)
    if not pairs:
        parts.append("No host appears in both runs, so nothing is compared.")
    for a, b in pairs:
        found = compare(a, b, noise_floor=floor)
        changes += found
        plots.append(_change_plot(a, b, found))
        parts.append(_pair_section(a, b, found, plots[-1]))
    return changes, ["\n\n".join(parts)], plots


def _pairs(old: list[RunData], new: list[RunData]) -> list[tuple[RunData, RunData]]:
    """Bundles of the same host; two single-host runs are compared even across hosts."""
    shared = [(a, b) for a in old for b in new if a.host_alias == b.host_alias]
    if not shared and len(old) == len(new) == 1:
        return [(old[0], new[0])]
    return shared


def _pair_section(a: RunData, b: RunData, changes: list[Change], plot: Chart) -> str:
    same = a.host_alias == b.host_alias
    parts = [f"### on `{a.host_alias}`" if same else f"### `{a.host_alias}` → `{b.host_alias}`"]
    old_dev, new_dev = a.manifest.provenance, b.manifest.provenance
    if (old_dev.device, old_dev.device_name) != (new_dev.device, new_dev.device_name):
        parts.append(f"> The runs used different devices ({_md(old_dev.device_name)}, then "
                     f"{_md(new_dev.device_name)}): the change includes the hardware.")
    if "cpu" in (old_dev.device, new_dev.device):
        parts.append(f"> **{CPU_BANNER}**")
    rows = [[f"`{c.case}`", f"`{c.implementation}`", _num(c.old_ms), _num(c.new_ms),
             f"{c.change:+.1%}", f"±{c.noise:.1%}",
             f"**{c.verdict}**" if c.verdict == "regression" else c.verdict] for c in changes]
    parts.append(_table(["case", "implementation", "old median ms", "new median ms", "change",
                         "noise", "verdict"], rows, numeric=range(2, 6)) if rows
                 else "No (case, implementation) has timings in both runs.")
    missing = _not_compared(a, b)
    if missing:
        parts.append("Not compared, as one side has no timing:\n\n" + "\n".join(missing))
    parts.append(plot.markdown())
    return "\n\n".join(parts)


def _not_compared(a: RunData, b: RunData) -> list[str]:
    later = _index(b)
    pairs = [(before, later[key]) for key, before in _index(a).items() if key in later]
    return [f"- `{old.case}` / `{old.implementation}`: old {old.status}, new {new.status}"
            for old, new in pairs if not (timed_median(old) and timed_median(new))]


def _change_plot(a: RunData, b: RunData, changes: list[Change]) -> Chart:
    hosts = a.host_alias if a.host_alias == b.host_alias else f"{a.host_alias}-{b.host_alias}"
    deltas = [_plots.Delta(f"{c.case} / {c.implementation}", c.change, c.noise, c.verdict)
              for c in changes]
    title = (f"Change of the median\n{a.run_id} → {b.run_id}\n"
             f"on {hosts}, {b.manifest.provenance.device_name[:60]}")
    return _plots.changes_chart(deltas, filename=f"change-{hosts}.png", title=title)


# --- the whole document ----------------------------------------------------------------


def _title(runs: list[RunData], base: str | None, changes: list[Change]) -> str:
    lines = ["# sparsek-remote report", ""]
    for run_id, group in _group(runs).items():
        hosts = ", ".join(f"`{r.host_alias}` ({_md(r.manifest.provenance.device_name)})"
                          for r in group)
        lines.append(f"- run `{run_id}` on {hosts}")
    lines.append("")
    lines.append(f"Speedup is the median of `{base}` divided by each implementation's median; "
                 "above 1.00x is faster than it." if base else
                 "No speedups are shown: no baseline was named and no sdpa implementation ran.")
    lines.append("us/head is the median in microseconds divided by Hq, the number of query "
                 "heads. A case that failed its correctness gate, erred or was skipped shows "
                 "its reason and no timing.")
    if len(_group(runs)) == 2:
        count = {v: sum(c.verdict == v for c in changes) for v in ("regression", "improvement")}
        lines.append(f"\n**{count['regression']} regression(s)**, {count['improvement']} "
                     f"improvement(s), {len(changes) - sum(count.values())} within noise.")
    return "\n".join(lines)


def _write(out_dir: Path, markdown: str, plots: list[Chart]) -> list[Path]:
    paths = []
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for plot in plots:
            if plot.png is not None:
                paths.append(out_dir / plot.filename)
                paths[-1].write_bytes(plot.png)
        (out_dir / MARKDOWN_NAME).write_text(markdown, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot write the report into {out_dir}: {exc.strerror or exc}",
                          hint="choose a folder you can write to") from None
    return paths


def _group(runs: list[RunData]) -> dict[str, list[RunData]]:
    groups: dict[str, list[RunData]] = {}
    for run in runs:
        groups.setdefault(run.run_id, []).append(run)
    return groups


def _index(run: RunData) -> dict[tuple[str, str], CaseResult]:
    return {(r.case, r.implementation): r for r in run.results.results}


def _labels(runs: list[RunData]) -> list[str]:
    return list(dict.fromkeys(r.implementation for run in runs for r in run.results.results))


def _cases(run: RunData) -> list[str]:
    return _ordered([c.name for c in run.manifest.job.cases],
                    [r.case for r in run.results.results])


def _impls(run: RunData) -> list[str]:
    return _ordered([i.label for i in run.manifest.job.implementations],
                    [r.implementation for r in run.results.results])


def _ordered(listed: list[str], found: list[str]) -> list[str]:
    """The names found, in the job's order first, then those the job does not list."""
    present = set(found)
    return [name for name in dict.fromkeys(listed + found) if name in present]


def _table(header: list[str], rows: list[list[str]], *, numeric: range) -> str:
    align = ["---:" if i in numeric else "---" for i in range(len(header))]
    lines = [header, align, *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def _num(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return NO_NUMBER
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def _md(text: object) -> str:
    """Text from a host made safe for one table cell or line: no pipes, newlines or HTML."""
    flat = " ".join(str(text).split()).replace("|", "\\|").replace("<", "&lt;")
    return flat if len(flat) <= 300 else flat[:299] + "…"
