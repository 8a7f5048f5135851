"""Time the SparseK selection alone (sort, lists, per-query thresholds), per path.

The forward's benchmark (``bench_sparsek.py``) times the whole operator; this one isolates
the selection so its two causal paths can be compared on the same scores: the per-row
scan, and the per-query kernels (``--paths scan,per-query``). Median of CUDA-event timings
after a warm-up; prints one row per (shape, path, scan warps, register cap).

Usage: python kernels/benchmarks/bench_select.py [--cases gpt4-4k,long-64k]
       [--paths scan,per-query] [--warps 4] [--regs auto,none,168] [--reps 20]
--regs caps the registers per thread of the scan (causal) or of the non-causal kernel:
auto is the forward's choice, none the compiler's.
"""

from __future__ import annotations

import argparse
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(SHAPES))
    parser.add_argument("--paths", default="scan,per-query")
    parser.add_argument("--warps", default="auto",
                        help="scan warps to try, comma-separated (auto: the forward's choice)")
    parser.add_argument("--regs", default="auto",
                        help="register caps to try, comma-separated (auto: the forward's "
                             "choice; none: the compiler's)")
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_select needs a CUDA GPU", file=sys.stderr)
        return 2
    print(f"{'shape':10} {'path':10} {'warps':>5} {'regs':>5} {'median ms':>10} "
          f"{'same as per-query':>18}")
    caps = [r if r in ("auto", "none") else int(r) for r in args.regs.split(",")]
    for name in args.cases.split(","):
        batch, kv_heads, seq_len, budget, window, causal, block_m = SHAPES[name]
        gen = torch.Generator(device="cuda").manual_seed(0)
        u = torch.randn(batch, kv_heads, seq_len, device="cuda", generator=gen)
        cfg = triton_fwd.ForwardConfig(block_m=block_m, heads=1, block_n=64, chunk=1024,
                                       num_warps=4, num_stages=2)
        saved = (triton_fwd.SCAN_SLOTS, triton_fwd.SCAN_MIN_ROWS, triton_fwd.SCAN_WARPS,
                 triton_fwd.SCAN_MAX_REGISTERS, triton_fwd.NONCAUSAL_MAX_REGISTERS)
        slots = saved[0]
        triton_fwd.SCAN_SLOTS = 0
        want = triton_fwd.select(u, budget, window, causal, cfg)
        for path in args.paths.split(","):
            capped = path == "scan" or not causal
            for warps in (args.warps.split(",") if path == "scan" and causal else ["-"]):
                for cap in (caps if capped else ["auto"]):
                    triton_fwd.SCAN_SLOTS = 0 if path == "per-query" else slots
                    triton_fwd.SCAN_MIN_ROWS = 1
                    if warps != "-":
                        triton_fwd.SCAN_WARPS = None if warps == "auto" else int(warps)
                    triton_fwd.SCAN_MAX_REGISTERS, triton_fwd.NONCAUSAL_MAX_REGISTERS = saved[3:]
                    if cap != "auto" and causal:
                        triton_fwd.SCAN_MAX_REGISTERS = None if cap == "none" else cap
                    elif cap != "auto":
                        triton_fwd.NONCAUSAL_MAX_REGISTERS = None if cap == "none" else cap
                    got = triton_fwd.select(u, budget, window, causal, cfg)
                    same = (torch.equal(got.rk, want.rk) and torch.equal(got.cnt, want.cnt)
                            and float((got.tau - want.tau).nan_to_num(0.0, 0.0, 0.0)
                                      .abs().max()) <= 1e-5)
                    ms = time_select(u, budget, window, causal, cfg, args.reps)
                    print(f"{name:10} {path:10} {warps:>5} {cap:>5} {ms:10.3f} "
                          f"{str(same):>18}", flush=True)
        (triton_fwd.SCAN_SLOTS, triton_fwd.SCAN_MIN_ROWS, triton_fwd.SCAN_WARPS,
         triton_fwd.SCAN_MAX_REGISTERS, triton_fwd.NONCAUSAL_MAX_REGISTERS) = saved
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
