"""Time the SparseK selection alone (sort, lists, per-query thresholds), per path.

The forward's benchmark (``bench_sparsek.py``) times the whole operator; this one isolates
the selection so its paths can be compared on the same scores: causal, the per-row scan
and the per-query kernels; non-causal, the thresholds by one program per row or by the
block kernel (``--paths scan,per-query,per-row,per-block``). Median of CUDA-event
timings after a warm-up; prints one row per (shape, path, scan warps).

Usage: python kernels/benchmarks/bench_select.py [--cases gpt4-4k,long-64k]
       [--paths scan,per-query] [--warps 4] [--reps 20]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys

import torch

from sparsek import triton_fwd

# (name, B, Hkv, S, K, W, causal, block_m): the bar shapes' selection, plus a GQA shape
# with few rows, where the scan's serial walk matters most.
SHAPES = {
    "seed": (16, 96, 512, 64, 32, False, 64),
    "gpt4-4k": (16, 96, 4096, 256, 256, True, 128),
    "gpt4-gqa": (4, 8, 4096, 256, 256, True, 32),
    "gpt4-128": (4, 32, 4096, 256, 256, True, 128),
    "long-64k": (1, 8, 65536, 2048, 512, True, 32),
}


def time_select(u: torch.Tensor, budget: int, window: int, causal: bool,
                cfg: triton_fwd.ForwardConfig, reps: int) -> float:
    """Median milliseconds of one ``select`` call."""
    for _ in range(3):
        triton_fwd.select(u, budget, window, causal, cfg)
    samples = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        triton_fwd.select(u, budget, window, causal, cfg)
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


# What each path sets in triton_fwd, and whether it is a causal path; the last path of
# each kind is the reference the others are compared with (the solvers from the sort).
PATHS = {
    "scan": ({"SCAN_MIN_ROWS": 1}, True),
    "per-query": ({"SCAN_SLOTS": 0}, True),
    "per-row": ({"ROW_TAU_MIN_ROWS": 1}, False),
    "per-block": ({"ROW_TAU_MAX_LEN": 0}, False),
}


@contextlib.contextmanager
def _settings(values: dict):
    """triton_fwd's module settings replaced inside the block."""
    saved = {name: getattr(triton_fwd, name) for name in values}
    try:
        for name, value in values.items():
            setattr(triton_fwd, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(triton_fwd, name, value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(SHAPES))
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--warps", default="auto",
                        help="scan warps to try, comma-separated (auto: the forward's choice)")
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_select needs a CUDA GPU", file=sys.stderr)
        return 2
    print(f"{'shape':10} {'path':10} {'warps':>5} {'median ms':>10} {'same as reference':>18}")
    for name in args.cases.split(","):
        batch, kv_heads, seq_len, budget, window, causal, block_m = SHAPES[name]
        gen = torch.Generator(device="cuda").manual_seed(0)
        u = torch.randn(batch, kv_heads, seq_len, device="cuda", generator=gen)
        cfg = triton_fwd.ForwardConfig(block_m=block_m, heads=1, block_n=64, chunk=1024,
                                       num_warps=4, num_stages=2)
        paths = [p for p in args.paths.split(",") if PATHS[p][1] == causal]
        reference = [p for p, (_, c) in PATHS.items() if c == causal][-1]
        with _settings(PATHS[reference][0]):
            want = triton_fwd.select(u, budget, window, causal, cfg)
        for path in paths:
            for warps in (args.warps.split(",") if path == "scan" else ["-"]):
                settings = dict(PATHS[path][0])
                if warps != "-":
                    settings["SCAN_WARPS"] = None if warps == "auto" else int(warps)
                with _settings(settings):
                    got = triton_fwd.select(u, budget, window, causal, cfg)
                    ms = time_select(u, budget, window, causal, cfg, args.reps)
                tau_diff = (got.tau - want.tau).nan_to_num(0.0, 0.0, 0.0).abs().max()
                same = (torch.equal(got.rk, want.rk) and torch.equal(got.cnt, want.cnt)
                        and float(tau_diff) <= 1e-5)
                print(f"{name:10} {path:10} {warps:>5} {ms:10.3f} {str(same):>18}",
                      flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
