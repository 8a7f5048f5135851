"""Benchmark the fused SparseK forward against SDPA with each dense backend forced.

Every number goes through the job runner's ``run_case`` (correctness gate first, then
timing with the L2 flushed, then peak memory), so this script and a job bundle measure
the same way. Prints one table and, with ``--out DIR``, writes it as JSON and markdown:

    shape | impl | median us | us/head | TFLOP/s | vs cudnn | vs flash | peak extra MiB

TFLOP/s counts attended pairs for SparseK and every allowed pair for SDPA; "vs X" is
X's median over this row's (above 1: faster than X). A row whose gate failed is
reported with its verdict and no time.

Usage: python kernels/benchmarks/bench_sparsek.py [--quick] [--out DIR] [--cases a,b]
       [--impls sparsek-triton,sdpa-cudnn] [--profile] [--sweep]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import sys
from pathlib import Path

import torch

from sparsek.runner.execute import resolve_device, run_case
from sparsek.runner.provenance import collect
from sparsek_remote.jobspec import JobSpec, parse_job
from sparsek_remote.schema import CaseResult

SHAPES = [
    dict(name="seed", B=16, Hq=96, Hkv=96, S=512, D=64, causal=False, kv_budget=64, window=32),
    dict(name="gpt4-4k", B=16, Hq=96, Hkv=96, S=4096, D=128, causal=True, kv_budget=256,
         window=256),
    dict(name="long-64k", B=1, Hq=32, Hkv=8, S=65536, D=128, causal=True, kv_budget=2048,
         window=512),
]
QUICK_SHAPES = [
    dict(name="quick-nc", B=2, Hq=4, Hkv=4, S=300, D=64, causal=False, kv_budget=32,
         window=8),
    dict(name="quick-gqa", B=1, Hq=8, Hkv=2, S=1000, D=128, causal=True, kv_budget=64,
         window=32),
]
IMPLEMENTATIONS = [
    {"kind": "sparsek", "impl": "triton"},
    {"kind": "sdpa", "backend": "cudnn"},
    {"kind": "sdpa", "backend": "flash"},
    {"kind": "sdpa", "backend": "efficient"},
]
COLUMNS = ("shape", "impl", "median us", "us/head", "TFLOP/s", "vs cudnn", "vs flash",
           "peak extra MiB")


def build_job(quick: bool, cases: list[str] | None, repetitions: int,
              max_seconds: float, impls: list[str] | None = None) -> JobSpec:
    shapes = QUICK_SHAPES if quick else SHAPES
    if cases:
        unknown = set(cases) - {s["name"] for s in shapes}
        if unknown:
            raise SystemExit(f"unknown case(s) {sorted(unknown)}; known: "
                             f"{[s['name'] for s in shapes]}")
        shapes = [s for s in shapes if s["name"] in cases]
    return parse_job({
        "name": "bench-sparsek",
        "cases": [{**s, "dtype": "bfloat16", "seed": 0} for s in shapes],
        "implementations": [i for i in IMPLEMENTATIONS
                            if not impls or _label(i) in impls],
        "timing": {"warmup": 5, "repetitions": repetitions, "max_seconds": max_seconds,
                   "flush_l2": True},
    })


def _label(impl: dict) -> str:
    return f"sparsek-{impl['impl']}" if impl["kind"] == "sparsek" else f"sdpa-{impl['backend']}"


def run_all(job: JobSpec, device: str, log: logging.Logger) -> list[CaseResult]:
    results = []
    for case in job.cases:
        for impl in job.implementations:
            results.append(run_case(job, case, impl, device, log))
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
    return results


def table_rows(job: JobSpec, results: list[CaseResult]) -> list[dict]:
    heads = {c.name: c.Hq for c in job.cases}
    medians = {(r.case, r.implementation): r.timing.stats.median_ms
               for r in results if r.status == "ok" and r.timing is not None}
    rows = []
    for r in results:
        ms = medians.get((r.case, r.implementation))
        row = {"shape": r.case, "impl": r.implementation, "status": r.status,
               "median_us": None if ms is None else ms * 1e3,
               "us_per_head": None if ms is None else ms * 1e3 / heads[r.case],
               "tflops": r.tflops,
               "vs_cudnn": _ratio(medians.get((r.case, "sdpa-cudnn")), ms),
               "vs_flash": _ratio(medians.get((r.case, "sdpa-flash")), ms),
               "peak_extra_mib": None if r.peak_extra_memory_bytes is None
               else r.peak_extra_memory_bytes / 2**20,
               "rel_error": None if r.gate is None else r.gate.rel_error,
               "note": "" if r.status == "ok" else (r.error or (r.gate.message if r.gate else ""))}
        rows.append(row)
    return rows


def _ratio(baseline_ms: float | None, ms: float | None) -> float | None:
    return None if baseline_ms is None or ms is None else baseline_ms / ms


def markdown(rows: list[dict]) -> str:
    keys = ("shape", "impl", "median_us", "us_per_head", "tflops", "vs_cudnn", "vs_flash",
            "peak_extra_mib")
    formats = {"median_us": "{:.1f}", "us_per_head": "{:.3f}", "tflops": "{:.1f}",
               "vs_cudnn": "{:.2f}x", "vs_flash": "{:.2f}x", "peak_extra_mib": "{:.1f}"}
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = []
        for key in keys:
            value = row[key]
            cells.append("-" if value is None else formats.get(key, "{}").format(value))
        if row["status"] != "ok":
            cells[2] = f"{row['status']}: {row['note'][:80]}"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def context_line(device: str) -> dict:
    where = collect(device, host_alias="bench")
    return {"date": datetime.date.today().isoformat(), "device": where.device_name,
            "driver": where.driver_version, "cuda": where.cuda_version,
            "torch": where.torch_version, "triton": where.triton_version}


def profile_sparsek(job: JobSpec, device: str, calls: int = 3) -> str:
    """Device time per kernel of the SparseK call on each case (torch.profiler), to see
    where the time goes; diagnostics only, the table's numbers come from run_case."""
    from torch.profiler import ProfilerActivity, profile

    from sparsek.api import sparsek_attention
    from sparsek.runner.inputs import make_inputs

    lines = []
    for case in job.cases:
        x = make_inputs(case, device)
        kw = dict(kv_budget=case.kv_budget, window=case.window, causal=case.causal,
                  impl="triton", check_finite=False)
        sparsek_attention(x.q, x.k, x.v, x.u, **kw)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                sparsek_attention(x.q, x.k, x.v, x.u, **kw)
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if _device_us(e) > 0]
        events.sort(key=_device_us, reverse=True)
        total = sum(_device_us(e) for e in events) / calls
        lines.append(f"{case.name}: {total:.1f} us of kernels per call")
        for e in events[:8]:
            lines.append(f"  {_device_us(e) / calls:10.1f} us  {e.count // calls:3d}x  "
                         f"{e.key[:90]}")
        del x
        torch.cuda.empty_cache()
    return "\n".join(lines)


# Tile configurations tried by --sweep: (block_m, heads, block_n, num_warps, num_stages,
# register cap or None). The first of each shape is the forward's own blocks with the
# tile the tuner picked for them on an H100.
SWEEP = {
    "seed": [(64, 1, 16, 4, 2, 96), (32, 1, 32, 2, 2, 128), (32, 1, 16, 2, 2, 128)],
    "gpt4-4k": [(64, 1, 32, 4, 2, 128), (128, 1, 32, 8, 3, 128), (64, 1, 16, 4, 3, 128),
                (64, 1, 32, 4, 2, None)],
    "long-64k": [(32, 4, 32, 8, 2, 128), (16, 4, 32, 4, 2, 128), (32, 4, 64, 4, 2, None)],
}


def sweep_configs(job: JobSpec, device: str) -> str:
    """Median time of the whole SparseK forward per tile configuration (triton do_bench,
    L2 cleared), each output checked against the default configuration's; diagnostics
    for choosing defaults, not results."""
    import triton.testing

    from sparsek.runner.inputs import make_inputs
    from sparsek.triton_fwd import ForwardConfig, launch_forward

    lines = []
    for case in job.cases:
        x = make_inputs(case, device)
        args = (x.q, x.k, x.v, x.u, case.kv_budget, case.window, case.causal, case.D ** -0.5)
        lse = torch.empty(x.q.shape[:3], dtype=torch.float32, device=device)
        want = torch.empty_like(x.q)
        launch_forward(*args, want, lse)
        for bm, heads, bn, warps, stages, regs in SWEEP.get(case.name, []):
            cfg = ForwardConfig(block_m=bm, heads=heads, block_n=bn, chunk=1024,
                                num_warps=warps, num_stages=stages, max_registers=regs)
            o = torch.full_like(x.q, float("nan"))
            try:
                launch_forward(*args, o, lse, config=cfg)
                diff = float((o.float() - want.float()).norm() / want.float().norm())
                def run(args=args, o=o, lse=lse, cfg=cfg):
                    launch_forward(*args, o, lse, config=cfg)

                ms = triton.testing.do_bench(run, return_mode="median")
                lines.append(f"{case.name} BM{bm} HG{heads} BN{bn} w{warps} s{stages} "
                             f"r{regs}: {ms * 1e3:9.1f} us  diff {diff:.1e}")
            except Exception as exc:  # a config that does not compile is a data point
                lines.append(f"{case.name} BM{bm} HG{heads} BN{bn} w{warps} s{stages} "
                             f"r{regs}: failed: {type(exc).__name__}: {str(exc)[:120]}")
        del x, want
        torch.cuda.empty_cache()
    return "\n".join(lines)


def _device_us(event) -> float:
    value = getattr(event, "device_time_total", None)
    return float(value if value is not None else event.cuda_time_total)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, a smoke run")
    parser.add_argument("--out", type=Path, help="folder for bench.json and bench.md")
    parser.add_argument("--cases", help="comma-separated subset of the shapes")
    parser.add_argument("--repetitions", type=int, default=30)
    parser.add_argument("--max-seconds", type=float, default=5.0)
    parser.add_argument("--profile", action="store_true",
                        help="also print device time per kernel of the SparseK call")
    parser.add_argument("--sweep", action="store_true",
                        help="also time the SparseK forward under several tile configs")
    parser.add_argument("--impls", help="comma-separated subset of the implementations "
                        "(labels such as sparsek-triton,sdpa-cudnn)")
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")
    log = logging.getLogger("bench")
    job = build_job(args.quick, args.cases.split(",") if args.cases else None,
                    args.repetitions, args.max_seconds,
                    args.impls.split(",") if args.impls else None)
    device = resolve_device("auto")
    context = context_line(device)
    rows = table_rows(job, run_all(job, device, log))
    text = markdown(rows)
    print(" ".join(f"{k}={v}" for k, v in context.items()))
    if args.profile and device == "cuda":
        print(profile_sparsek(job, device))
    if args.sweep and device == "cuda":
        print(sweep_configs(job, device))
    print(text)
    tuned = tuned_attention_configs()
    if tuned:
        print(tuned)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench.json").write_text(json.dumps({"context": context, "rows": rows},
                                                        indent=2), encoding="utf-8")
        (args.out / "bench.md").write_text(
            " ".join(f"{k}={v}" for k, v in context.items()) + "\n\n" + text + "\n",
            encoding="utf-8")
    return 0


def tuned_attention_configs() -> str:
    """The attention kernel picked for each shape met in this process, and the tiles
    each kernel's tuner chose."""
    from sparsek import triton_fwd
    from sparsek.triton_attn import sparsek_attn_fwd_tuned

    times = triton_fwd.attention_pick_times()

    def timed(key) -> str:
        return "".join(f", {name} {ms:.3f} ms" for name, ms in times.get(key, {}).items())

    lines = [f"attention kernel for {key[2:9]} (B, Hq, S, D, Hkv, K, W): {pick}{timed(key)}"
             for key, pick in triton_fwd.attention_picks().items()]
    tuners = [("triton", sparsek_attn_fwd_tuned)]
    if triton_fwd.gluon_attention() is not None:
        tuners += [("gluon", tuner) for tuner in triton_fwd.gluon_attention().tuners()]
    if triton_fwd.ws_attention() is not None:
        tuners += [("ws", tuner) for tuner in triton_fwd.ws_attention().tuners()]
    lines += [f"{name} attention tuned for {key[:5]} (S, Hq, Hkv, K, W): {config}"
              for name, tuner in tuners for key, config in tuner.cache.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
