"""Time the SparseK selection alone (sort, lists, per-query thresholds), per path.

The forward's benchmark (``bench_sparsek.py``) times the whole operator; this one isolates
the selection so its two causal paths can be compared on the same scores: the per-row
scan, and the per-query kernels (``--paths scan,per-query``). Median of CUDA-event timings
after a warm-up; prints one row per (shape, path, warps, register cap).

Usage: python kernels/benchmarks/bench_select.py [--cases gpt4-4k,long-64k]
       [--paths scan,per-query] [--warps 4] [--regs scan=none,scan=168,boundary=80]
       [--boundary 4x1024,1x128x512x4] [--block-warps 4,1] [--select-rows 16,32]
       [--prefix 0,auto,8192] [--reps 20]
--regs: variants to time, each one kernel's cap on registers per thread (scan, noncausal,
boundary or block), the others left as the forward sets them; none is the compiler's
choice, auto (the scan only) the forward's rule.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys

import torch

from sparsek import triton_fwd

# (name, B, Hkv, S, K, W, causal, block_m): the bar shapes' selection with the forward's
# blocks (triton_fwd.default_config), plus a GQA shape with few rows, where the scan's
# serial walk matters most, and a shape of 128-query blocks.
SHAPES = {
    "seed": (16, 96, 512, 64, 32, False, 64),
    "gpt4-4k": (16, 96, 4096, 256, 256, True, 64),
    "gpt4-gqa": (4, 8, 4096, 256, 256, True, 32),
    "gpt4-128": (4, 32, 4096, 256, 256, True, 128),
    "long-64k": (1, 8, 65536, 2048, 512, True, 32),
}


# --regs names: the forward's register cap of each selection kernel.
CAPS = {"scan": "SCAN_MAX_REGISTERS", "noncausal": "NONCAUSAL_MAX_REGISTERS",
        "boundary": "BOUNDARY_MAX_REGISTERS", "block": "BLOCK_CAUSAL_MAX_REGISTERS"}


# The forward's module settings a variant may change; each variant starts from their values.
KNOBS = ("SCAN_MAX_BUDGET", "SCAN_MAX_ENDS", "SCAN_MIN_ROWS", "SCAN_WARPS", "NONCAUSAL_WARPS",
         "BOUNDARY_WARPS", "BOUNDARY_CHUNK", "BOUNDARY_WALK_CHUNK", "BOUNDARY_CHAIN",
         "BLOCK_CAUSAL_WARPS",
         "SELECT_ROWS", "PREFIX_LEN", *CAPS.values())


def _set_variant(base: dict, causal: bool, path: str, warps: str,
                 cap: tuple[str, int | str | None] | None) -> None:
    """Set the forward's knobs for one variant: the scan on every row count or none
    (per-query), the warps of the scan (causal) or of the non-causal kernel, one cap."""
    for attr, value in base.items():
        setattr(triton_fwd, attr, value)
    triton_fwd.SCAN_MIN_ROWS = 1
    if path == "per-query":
        triton_fwd.SCAN_MAX_BUDGET = -1
    if warps not in ("-", "auto"):
        setattr(triton_fwd, "SCAN_WARPS" if causal else "NONCAUSAL_WARPS", int(warps))
    if cap is not None:
        setattr(triton_fwd, CAPS[cap[0]], cap[1])


def _variant(item: str) -> tuple[str, int | str | None]:
    """'scan=168' -> ('scan', 168); 'none' is the compiler's choice."""
    kernel, _, cap = item.partition("=")
    if kernel not in CAPS or not cap:
        raise SystemExit(f"--regs: {item!r} is not KERNEL=CAP with KERNEL one of "
                         f"{', '.join(CAPS)}")
    if cap == "auto" and kernel != "scan":
        raise SystemExit(f"--regs: {item!r}: auto (the forward's rule) applies to the scan "
                         "only; give a number of registers or none")
    return kernel, None if cap == "none" else cap if cap == "auto" else int(cap)


def _boundary(item: str) -> tuple[int, int, int, int | None]:
    """'4x1024' -> (4 warps, 1024 ranks a cursor step, 1024 a walk step, the forward's
    chain); '1x128x512x4' -> (1, 128, 512, chains of 4 boundaries), for the causal
    boundary kernel."""
    parts = item.split("x")
    if len(parts) not in (2, 3, 4) or not all(p.isdigit() for p in parts):
        raise SystemExit(f"--boundary: {item!r} is not WARPSxCHUNK[xWALK[xCHAIN]], "
                         "e.g. 4x1024")
    warps, chunk = int(parts[0]), int(parts[1])
    walk = int(parts[2]) if len(parts) >= 3 else chunk
    return warps, chunk, walk, int(parts[3]) if len(parts) == 4 else None


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
                        help="warps of the scan (causal) or of the non-causal kernel to try, "
                             "comma-separated (auto: the forward's choice)")
    parser.add_argument("--regs", default="",
                        help="KERNEL=CAP variants, comma-separated (default: the forward's)")
    parser.add_argument("--boundary", default="",
                        help="causal boundary-kernel variants WARPSxCHUNK[xWALK[xCHAIN]] "
                             "(warps, ranks a cursor step, ranks a walk step, boundaries "
                             "a program), comma-separated, e.g. 4x1024,1x128x512x4 "
                             "(default: the forward's)")
    parser.add_argument("--block-warps", default="",
                        help="warps of the causal per-query kernel to try, comma-separated")
    parser.add_argument("--select-rows", default="",
                        help="queries per causal per-query program to try, comma-separated")
    parser.add_argument("--prefix", default="",
                        help="longest causal boundary prefix table to try (PREFIX_LEN), "
                             "comma-separated (0: none, auto: the forward's rule)")
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_select needs a CUDA GPU", file=sys.stderr)
        return 2
    print(f"{'shape':10} {'path':10} {'warps':>5} {'regs':>14} {'median ms':>10} "
          f"{'same as per-query':>18}")
    caps = [_variant(item) for item in args.regs.split(",") if item] or [None]
    bounds = [_boundary(item) for item in args.boundary.split(",") if item] or [None]
    blocks = [int(n) for n in args.block_warps.split(",") if n] or [None]
    rows = [int(n) for n in args.select_rows.split(",") if n] or [None]
    prefixes = [n for n in args.prefix.split(",") if n] or [None]
    base = {attr: getattr(triton_fwd, attr) for attr in KNOBS}
    try:
        for name in args.cases.split(","):
            batch, kv_heads, seq_len, budget, window, causal, block_m = SHAPES[name]
            gen = torch.Generator(device="cuda").manual_seed(0)
            u = torch.randn(batch, kv_heads, seq_len, device="cuda", generator=gen)
            cfg = triton_fwd.ForwardConfig(block_m=block_m, heads=1, block_n=64, chunk=1024,
                                           num_warps=4, num_stages=2)
            _set_variant(base, causal, "per-query", "-", None)
            want = triton_fwd.select(u, budget, window, causal, cfg)
            for path in args.paths.split(","):
                for warps in (args.warps.split(",") if path == "scan" or not causal
                              else ["-"]):
                    for cap, bound, block, sub, pre in itertools.product(
                            caps, bounds, blocks, rows, prefixes):
                        _set_variant(base, causal, path, warps, cap)
                        if bound is not None:
                            (triton_fwd.BOUNDARY_WARPS, triton_fwd.BOUNDARY_CHUNK,
                             triton_fwd.BOUNDARY_WALK_CHUNK) = bound[:3]
                            if bound[3] is not None:
                                triton_fwd.BOUNDARY_CHAIN = bound[3]
                        if block is not None:
                            triton_fwd.BLOCK_CAUSAL_WARPS = block
                        if sub is not None:
                            triton_fwd.SELECT_ROWS = sub
                        if pre is not None:
                            triton_fwd.PREFIX_LEN = None if pre == "auto" else int(pre)
                        got = triton_fwd.select(u, budget, window, causal, cfg)
                        same = (torch.equal(got.rk, want.rk) and torch.equal(got.cnt, want.cnt)
                                and float((got.tau - want.tau).nan_to_num(0.0, 0.0, 0.0)
                                          .abs().max()) <= 1e-5)
                        ms = time_select(u, budget, window, causal, cfg, args.reps)
                        label = "-" if cap is None else f"{cap[0]}={cap[1]}"
                        if bound is not None:
                            label += " b" + "x".join(str(x) for x in bound if x is not None)
                        if block is not None:
                            label += f" q{block}"
                        if sub is not None:
                            label += f" r{sub}"
                        if pre is not None:
                            label += f" p{pre}"
                        print(f"{name:10} {path:10} {warps:>5} {label:>14} {ms:10.3f} "
                              f"{str(same):>18}", flush=True)
    finally:
        for attr, value in base.items():
            setattr(triton_fwd, attr, value)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
