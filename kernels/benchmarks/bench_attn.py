"""Time the SparseK attention kernel alone, per tile, against a saved copy of the kernel.

For each query block (``--blocks``: queries x GQA heads per program; the forward's
default when not given) the selection is made once; then the current kernel, and with
``--baseline FILE[,FILE]`` the kernels of other copies of ``triton_attn.py`` (an A/B of
kernel changes on the same card in one run; each copy must take the current arguments), run on
it with each tile (keys per step x warps x pipeline stages, and optionally a cap on
registers per thread, ``maxnreg``, so that more programs fit on an SM). ``--gluon``
adds the Hopper kernel of ``gluon_attn.py`` with each of its tiles (keys per step x
shared-memory slots, and optionally the register cap). Every output is compared with the
shape's first one; the table shows the registers and spills of each compiled tile.
``--no-list`` adds the same runs with no list and the window widened by K (the same keys
per query, every tile contiguous and ungated): the kernel's speed without its gathers and
gates, each output compared with the first such one.
Median of ``triton.testing.do_bench`` (L2 cleared before each call).

Usage: python kernels/benchmarks/bench_attn.py [--cases gpt4-4k,long-64k]
       [--blocks 128x1,64x1] [--tiles 32x4x2,64x8x2,32x4x2x168] [--baseline old_triton_attn.py]
       [--gluon 64x3,32x3x128] [--no-list]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import itertools
import math
import sys
from pathlib import Path

import torch
from bench_sparsek import SHAPES as BAR_SHAPES

from sparsek import triton_attn, triton_fwd
from sparsek.runner.metrics import attended_pairs

# name: (B, Hq, Hkv, S, D, K, W, causal): the three shapes of the speed bars.
SHAPES = {s["name"]: tuple(s[k] for k in ("B", "Hq", "Hkv", "S", "D", "kv_budget", "window",
                                          "causal")) for s in BAR_SHAPES}
# By default, every tile the tuner may pick.
TILES = ",".join(f"{c.kwargs['BN']}x{c.num_warps}x{c.num_stages}"
                 + (f"x{c.maxnreg}" if c.maxnreg else "") for c in triton_attn.ATTN_CONFIGS)


def _load_baseline(path: str):
    spec = importlib.util.spec_from_file_location(f"sparsek_attn_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.sparsek_attn_fwd_kernel


def _computed_keys(S: int, K: int, W: int, causal: bool, block_m: int) -> int:
    """Keys per (batch, head) the block scheme multiplies: each block's list (K at most)
    plus its dense range, times the block's queries."""
    total = 0
    for i0 in range(0, S, block_m):
        rows = min(block_m, S - i0)
        lo = max(i0 - W + 1, 0)
        hi = min(i0 + block_m - 1, S - 1) if causal else (
            min(i0 + block_m + W - 2, S - 1) if W > 0 else -1)
        total += rows * (min(K, S) + max(hi - lo + 1, 0))
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="gpt4-4k,long-64k")
    parser.add_argument("--tiles", default=TILES,
                        help="BNxWARPSxSTAGES[xMAXNREG], comma-separated")
    parser.add_argument("--blocks", default="",
                        help="BMxHEADS, comma-separated (default: the forward's)")
    parser.add_argument("--baseline", default="",
                        help="other copies of triton_attn.py, comma-separated: each is timed "
                        "under its file's name")
    parser.add_argument("--no-list", action="store_true",
                        help="also time each kernel and tile with no list (K = 0) and the "
                        "window widened by K: the same keys per query, all contiguous and "
                        "ungated (marked /nl)")
    parser.add_argument("--gluon", default="",
                        help="BNxSTAGES[xMAXNREG], comma-separated: also time the Gluon (sm_90) "
                        "kernel")
    parser.add_argument("--ws", default="",
                        help="BNxSTAGES[xCONSUMER_REGSxPRODUCER_REGS], comma-separated: also "
                        "time the warp-specialized Gluon (sm_90) kernel (64- or 128-row blocks)")
    args = parser.parse_args(argv)
    baselines = [p for p in args.baseline.split(",") if p]
    stems = [Path(p).stem for p in baselines]
    if len(set(stems)) < len(stems) or {"current", "gluon", "ws"} & set(stems):
        parser.error(f"--baseline: each copy is labelled by its file name, and these repeat "
                     f"(or are 'current', 'gluon' or 'ws'): {', '.join(stems)}; rename a copy")
    if not torch.cuda.is_available():
        print("bench_attn needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton.testing

    kernels = {"current": triton_attn.sparsek_attn_fwd_kernel}
    for path in baselines:
        kernels[Path(path).stem] = _load_baseline(path)
    tiles = [tuple(int(n) for n in t.split("x")) for t in args.tiles.split(",")]
    runs = [(kname, kernel, tile) for kname, kernel in kernels.items() for tile in tiles]
    gluon_attn = triton_fwd.gluon_attention() if args.gluon else None
    if gluon_attn is not None:
        runs += [("gluon", gluon_attn.sparsek_attn_fwd_gluon, tuple(int(n) for n in t.split("x")))
                 for t in args.gluon.split(",")]
    elif args.gluon:
        print("--gluon: this Triton build has no Gluon Hopper API", file=sys.stderr)
        return 2
    ws_attn = triton_fwd.ws_attention() if args.ws else None
    if ws_attn is not None:
        runs += [("ws", ws_attn.sparsek_attn_fwd_ws, tuple(int(n) for n in t.split("x")))
                 for t in args.ws.split(",")]
    elif args.ws:
        print("--ws: this Triton build has no Gluon warp specialization", file=sys.stderr)
        return 2
    # The kernel column fits every name, with room for the no-list runs' mark.
    width = max(8, *(len(kname) + 3 * args.no_list for kname, _, _ in runs))
    print(f"{'shape':9} {'block':6} {'kernel':{width}} {'tile':8} {'median ms':>9} "
          f"{'computed TF/s':>13} {'attended TF/s':>13} {'diff':>8} {'regs':>4} {'spills':>6}")
    for name in args.cases.split(","):
        B, Hq, Hkv, S, D, K, W, causal = SHAPES[name]
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(B, h, S, D, device="cuda", generator=gen,
                               dtype=torch.bfloat16) for h in (Hq, Hkv, Hkv))
        u = torch.randn(B, Hkv, S, device="cuda", generator=gen)
        lse = torch.empty(B, Hq, S, device="cuda")
        flops = 4 * B * Hq * D
        attended = flops * attended_pairs(S, K, W, causal)
        default = triton_fwd.default_config(q, Hq // Hkv)
        blocks = ([tuple(int(n) for n in b.split("x")) for b in args.blocks.split(",")]
                  if args.blocks else [(default.block_m, default.heads)])
        wants = {}
        for block_m, heads in blocks:
            cfg = dataclasses.replace(default, block_m=block_m, heads=heads)
            # (mark, selection, window, computed FLOPs, attended FLOPs)
            selections = [("", triton_fwd.select(u, K, W, causal, cfg), W,
                           flops * _computed_keys(S, K, W, causal, block_m), attended)]
            if args.no_list:
                selections.append(("/nl", triton_fwd.select(u, 0, K + W, causal, cfg), K + W,
                                   flops * _computed_keys(S, 0, K + W, causal, block_m),
                                   flops * attended_pairs(S, 0, K + W, causal)))
            for (kname, kernel, tile), (mark, sel, window, computed, pairs) in itertools.product(
                    runs, selections):
                o = torch.full_like(q, float("nan"))
                launches, a, fixed = triton_fwd.attention_launch(q, k, v, sel, window, causal,
                                                                 D ** -0.5, cfg, o, lse)
                if kname == "gluon":
                    bn, stages, *cap = tile
                    fixed = gluon_attn.kernel_args(fixed)
                    run_kw = gluon_attn.launch_kwargs(bn, stages, cap[0] if cap else None,
                                                      heads * block_m)
                    warps = run_kw["num_warps"]
                elif kname == "ws":
                    if heads * block_m not in ws_attn.ROWS:
                        continue
                    # Shown as keys x warps x slots x consumer and producer registers.
                    bn, stages, *cap = tile
                    fixed = triton_fwd.gluon_attention().kernel_args(fixed)
                    try:
                        run_kw = ws_attn.launch_kwargs(bn, stages, *cap, rows=heads * block_m)
                    except ValueError as exc:  # registers given for the other program size
                        print(f"{name:9} {block_m}x{heads:<3} ws {tile}: {exc}")
                        continue
                    cap = [run_kw["CONSUMER_REGS"], run_kw["PRODUCER_REGS"]]
                    warps = ws_attn.warps(heads * block_m)
                    a = ws_attn.kernel_args(a, block_m)
                else:
                    bn, warps, stages, *cap = tile
                    run_kw = dict(BN=bn, num_warps=warps, num_stages=stages,
                                  **({"maxnreg": cap[0]} if cap else {}))

                def run(kernel=kernel, launches=launches, a=a, fixed=fixed, run_kw=run_kw):
                    return triton_fwd.run_attention(kernel, launches, a, fixed, **run_kw)

                tile = "x".join(str(n) for n in (bn, warps, stages, *cap))
                label = f"{name:9} {block_m}x{heads:<3} {kname + mark:{width}} {tile:<8}"
                try:
                    compiled = run()
                    torch.cuda.synchronize()
                except Exception as exc:  # a tile that does not compile is a data point
                    print(f"{label} failed: {type(exc).__name__}: {str(exc)[:100]}",
                          flush=True)
                    continue
                want = wants.setdefault(mark, o.float())
                diff = float((o.float() - want).norm() / want.norm())
                ms = triton.testing.do_bench(run, return_mode="median")
                n_regs = getattr(compiled, "n_regs", "?")
                spills = getattr(compiled, "n_spills", "?")
                print(f"{label} {ms:9.3f} {computed / ms / 1e9:13.1f} "
                      f"{pairs / ms / 1e9:13.1f} {diff:8.1e} "
                      f"{n_regs:>4} {spills:>6}"
                      + ("" if math.isfinite(diff) else "  (not finite)"), flush=True)
            del selections
        del q, k, v, u, lse, wants
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
