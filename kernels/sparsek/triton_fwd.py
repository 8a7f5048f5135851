"""Fused SparseK forward in Triton: the launcher and the public function.

One call runs four steps, all on the device: a stable descending sort of u per
(batch, kv head); the selection kernels (per block of queries: the list of the base's K
best positions; per query: threshold, cut rank and list count); and the attention
kernel, which reads each block's list and dense range once for the whole GQA group.
Extra memory is the sort, its inverse and the per-query selection, all O(B * Hkv * S),
plus the block lists: (S / BM) * K int32 indices per (batch, kv head).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import triton

from sparsek._checks import check_attention_inputs, check_out, check_triton_head_dim
from sparsek.triton_attn import sparsek_attn_fwd_kernel, sparsek_attn_fwd_tuned
from sparsek.triton_select import (
    sparsek_block_causal_fwd_kernel,
    sparsek_boundary_fwd_kernel,
    sparsek_prefix_count_kernel,
    sparsek_prefix_table_kernel,
    sparsek_sort_ranks_kernel,
)
from sparsek.triton_select_noncausal import (
    sparsek_block_noncausal_fwd_kernel,
    sparsek_noncausal_prep_kernel,
)
from sparsek.triton_select_scan import (
    sparsek_causal_scan_kernel,
    sparsek_scan_resume_kernel,
    sparsek_scan_start_kernel,
)

LOG2E = 1.4426950408889634
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Tune the attention tile per shape on a GPU (about a second per new shape, plus one compile
# per config the first time). SPARSEK_TUNE=0 keeps the default tile: quick checks of many
# shapes, where the tuning would cost more than the runs.
TUNE = os.environ.get("SPARSEK_TUNE", "1") != "0"
# Newton steps per threshold before the solver keeps its last point; a bracketed solve
# on real data takes a handful, and the cap only bounds adversarial inputs.
MAX_NEWTON = 100
# Queries per causal per-query program: small tiles, many programs per SM, so the solvers'
# short dependent loads overlap across programs instead of stalling one large program.
# Measured on the H100 at one warp a program (bench_select --select-rows), long-64k's
# selection: 8 queries 2.42 ms, 16: 2.69, 32: 2.99.
SELECT_ROWS = 8
# Per-query programs per row behind the scan, which redo only the rows it flagged (none,
# on random scores): each takes every GATED_PROGRAMS-th query group of its row.
GATED_PROGRAMS = 8
# Register slots for the scores that bend inside a block's threshold bracket (the causal
# fast path); a block with more takes the generic path. The per-query kernel is bound by
# the instructions it issues, and every Newton step evaluates all its slots: long-64k's
# selection 1.43-1.44 ms with 32 slots, 1.40-1.41 with 16, 1.36-1.37 with 8 (H100).
SLOTS = 8
# The causal scan solves its first threshold over the first K + 1 scores held in registers,
# so it serves budgets up to SCAN_MAX_BUDGET (-1: never). A walk that crosses more than
# SCAN_MAX_ENDS piece ends for one new score flags its row, which the per-query kernels
# redo.
SCAN_MAX_BUDGET = 1023
SCAN_MAX_ENDS = 100
# The scan walks each row in order (in a few chunks, below): it pays where there are
# enough rows to fill the GPU (measured with one program a row: faster than the per-query
# kernels from 128 rows of 4096, slower at 32). SCAN_MAX_LEN is a guard, not a
# measurement: a row of 65536 would be a serial chain 16x longer than any row timed.
SCAN_MIN_ROWS = 128
SCAN_MAX_LEN = 16384
# The scan's chunks a row (None: enough for about SCAN_PROGRAMS_PER_SM programs an SM, at
# most SCAN_MAX_CHUNKS): each row is one chain of dependent steps, so more programs an SM
# hide more of their latency. Measured on the H100, gpt4-4k's selection (1536 rows, 11.6
# an SM): 1 chunk 2.23 ms, 2: 2.00, 3: 1.84-1.85, 4: 1.86.
SCAN_CHUNKS: int | None = None
SCAN_PROGRAMS_PER_SM = 36
SCAN_MAX_CHUNKS = 4
# Warps per scan program; None: one warp where rows fill the GPU several times over (its
# reductions then need no barrier), four for fewer, longer-waited rows.
SCAN_WARPS: int | None = None
# Warps per non-causal block program (measured against 8 and 2: see the cap below).
NONCAUSAL_WARPS = 4
# Caps on registers per thread (Triton's maxnreg); None leaves the compiler's choice.
# The scan's rows are latency-bound walks that all take about as long, so a row that
# misses the first wave doubles the kernel's time: "auto" caps its registers so that
# every row is resident at once (scan_register_cap). Measured on the H100, gpt4-4k's 1536
# one-warp rows with the slot-based scan of that time: 5.27 ms uncapped (8 per SM), 4.35
# ms at 168 (12 per SM), 5.66 at 176. The bitmap scan compiles to 88 registers for sm_90,
# so the cap no longer binds there; it stays as the guard for larger compilations.
SCAN_MAX_REGISTERS: int | str | None = "auto"
SCAN_MIN_REGISTERS = 128  # below this the spills cost more than the wave saves
REGISTERS_PER_SM = 65536  # 32-bit registers of one SM: Hopper's and Blackwell's alike
# The non-causal block kernel, 4 warps. Before its searches used value buckets, 96
# registers (five programs an SM) measured best for seed's selection on the H100: 8 warps
# 1.17 ms uncapped, 1.00 at 64; 4 warps 0.84 uncapped, 0.77 at 96, 0.86 at 64; 2 warps
# 0.80 uncapped, slower capped. With the buckets (graph-replayed selection, same run):
# 0.558 ms at 96, 0.536 at 128.
NONCAUSAL_MAX_REGISTERS: int | None = 128
# Non-causal rows of at most PREP_MAX_LEN scores are sorted, summed and bucketed by one
# program each (a bitonic sort in registers, which spills beyond 2048 on sm_90); longer
# rows by torch's sort and scan.
PREP_MAX_LEN = 2048
# Warps of that program; None: one up to 512 scores (seed's selection on the H100, same
# run: 0.536 ms at 1 warp, 0.540 at 2, 0.558 at 4, 0.618 at 8), else one per 256 (fewer
# spill at 2048).
PREP_WARPS: int | None = None
# Warps per causal boundary program, and the ranks of the sort it takes a step (at most
# cfg.chunk). Its steps are short reductions, and one warp needs no barrier between them:
# measured on the H100 (bench_select --boundary), the selection of long-64k 3.52-3.55 ms at
# 4 warps x 1024 ranks, 3.19 at 1 x 128; gpt4-4k's 3.90-4.00 -> 3.74-3.76.
BOUNDARY_WARPS = 1
BOUNDARY_CHUNK = 128
# Ranks a step of the boundary kernel's long walks: its list, and its second cursor's
# first descent from the top of the sort.
BOUNDARY_WALK_CHUNK = 256  # long-64k's selection: 128 ranks 2.49 ms, 256: 2.39, 512: 2.47
# Consecutive boundaries a program solves, each threshold from the one before (see
# sparsek_boundary_fwd_kernel): fewer, longer programs, whose cursors move a few ranks a
# boundary instead of walking from the K-th member. Measured on the H100, long-64k's
# selection (outputs equal bit for bit at every length): 1.294 ms at 1, 1.145 at 2, 1.111
# at 3, 1.054 at 4, 1.064 at 6; 8 and more leave too few programs to hide their chains'
# latency (1.171 at 8, 1.434 at 16, 1.712 at 32, against 1.086 at 4 in that run).
BOUNDARY_CHAIN = 4
# The attention's grid is (blocks, rows, head groups); a CUDA grid's second dimension holds
# at most 65535 programs, so more (batch, kv head) rows take several launches, each from
# a constant first row (so the usual single launch compiles to the kernel as measured).
# The selection kernels run their rows in the first dimension instead, blocks fastest.
# A flat grid for the attention too was measured on the H100 and not kept: long-64k's
# 64-key tile ran 8.58-8.65 ms with it against 8.15-8.88 with this grid, runs alternating.
ROWS_PER_LAUNCH = 65535
# Causal boundaries walk prefix tables instead of the whole sort: table j holds the
# sort's entries at positions below NL_j, in rank order, with NL_j doubling from about
# PREFIX_MIN_LEN up to PREFIX_LEN (None: the largest power of two at most S / 2; 0: no
# table), and a base walks the shortest table that holds it. Measured on the H100
# (selection, outputs equal bit for bit): with one table of NL = 4096 / 8192 / 16384,
# long-64k 1.57 / 1.49 / 1.44 ms against 1.78 without; gpt4-4k 1.84 / 1.81 / 1.83 at 512
# / 1024 / 2048 against 1.91. Tables from 64, 256 or 1024 up to S / 2: long-64k
# 1.27-1.28 ms each against 1.36-1.37 with one table of 16384; gpt4-4k 1.87 / 1.84 /
# 1.81 against 1.83 (building six tables for each of its 1536 rows costs more than the
# short walks gain).
PREFIX_LEN: int | None = None
PREFIX_MIN_LEN = 1024
# Warps per causal per-query program (SELECT_ROWS queries), capped at 96 registers. One
# warp needs no barrier in its reductions; measured on the H100 (bench_select
# --block-warps, 16 queries a program), long-64k's selection: 4 warps 3.22 ms, 2: 3.59,
# 8: 3.88, 1: 2.67, and 1 capped at 88-112 registers 2.35-2.52 ms.
BLOCK_CAUSAL_WARPS = 1
# Register caps of the causal boundary-list and per-query kernels.
BOUNDARY_MAX_REGISTERS: int | None = None
BLOCK_CAUSAL_MAX_REGISTERS: int | None = 96


def scan_chunks(bh: int, nblk: int, budget: int, window: int, block_m: int,
                sms: int) -> tuple[int, int]:
    """(chunks a row, blocks a chunk) for the causal scan: SCAN_CHUNKS, or for None about
    SCAN_PROGRAMS_PER_SM programs an SM (at most SCAN_MAX_CHUNKS a row). Every chunk but
    the first starts at a block whose base has more than K members (the state there is a
    solved threshold); fewer chunks where the row is too short for that."""
    want = SCAN_CHUNKS or max(1, min(SCAN_MAX_CHUNKS, SCAN_PROGRAMS_PER_SM * sms // bh))
    first = (budget + window) // block_m + 1  # the first block with more than K in its base
    stride = max(triton.cdiv(nblk, want), first)
    chunks = triton.cdiv(nblk, stride)
    return (chunks, stride) if chunks > 1 else (1, nblk + 1)


def scan_register_cap(rows: int, warps: int, sms: int) -> int | None:
    """The scan's register cap on a GPU of ``sms`` SMs: SCAN_MAX_REGISTERS, or for "auto"
    the most registers per thread that keep all ``rows`` programs of ``warps`` warps
    resident in one wave (None where no cap is needed, or where it would be under
    SCAN_MIN_REGISTERS)."""
    if SCAN_MAX_REGISTERS != "auto":
        return SCAN_MAX_REGISTERS
    per_sm = -(-rows // sms)
    cap = REGISTERS_PER_SM // (per_sm * warps * 32) // 8 * 8
    return cap if SCAN_MIN_REGISTERS <= cap < 255 else None


def _cap(registers: int | None) -> dict[str, int]:
    return {} if registers is None else {"maxnreg": registers}


@dataclass(frozen=True)
class ForwardConfig:
    """Tile sizes of one launch.

    block_m: queries per block (selection and attention); a power of two >= 16.
    heads: query heads of one GQA group per attention program (rows = heads * block_m).
    block_n: keys per attention step. chunk: the most ranks of the sort a selection
    kernel takes a step (small in the interpreter, so tiny shapes take several; on a
    GPU the kernels' own steps, such as BOUNDARY_CHUNK, are smaller).
    max_registers: a cap on the attention's registers per thread (Triton's maxnreg), or
    None for the compiler's choice.
    kernel: the attention kernel, "triton" (triton_attn, any device), "gluon"
    (gluon_attn: Hopper, float16/bfloat16, 64 or 128 rows a program; num_stages is then
    its shared-memory slots, at least 3, and num_warps follows the rows) or "ws"
    (gluon_ws_attn, warp-specialized: Hopper, float16/bfloat16, 64 or 128 rows a program;
    num_stages is then its key ring slots, at least 2, the value ring one more; its
    warps are fixed).
    On a GPU without an explicit config, the attention's kernel and tile are tuned per
    shape instead (triton_attn.ATTN_CONFIGS, gluon_attn.GLUON_CONFIGS,
    gluon_ws_attn.WS_CONFIGS), unless TUNE is off.
    """

    block_m: int
    heads: int
    block_n: int
    chunk: int
    num_warps: int
    num_stages: int
    max_registers: int | None = None
    kernel: str = "triton"


@dataclass(frozen=True)
class Selection:
    """Per (batch, kv head): lists [BH, NBG, K'] (K' = max(K, 1)), inverse sort rank
    [BH, S], and per query tau (float32), rk and cnt (int32) [BH, S]; scores are the
    float32 scores [BH, S] it was made from, which the attention reads its gates from."""

    lists: torch.Tensor
    rank: torch.Tensor
    tau: torch.Tensor
    rk: torch.Tensor
    cnt: torch.Tensor
    scores: torch.Tensor


def default_config(q: torch.Tensor, group: int) -> ForwardConfig:
    """Tiles for q [B, Hq, S, D]: up to 128 rows for D = 128 (64 for D = 64) and 64
    queries on a GPU; small tiles in the interpreter so tiny shapes still span several
    blocks and chunks."""
    seq_len, dim = q.shape[2], q.shape[3]
    # A GQA group's heads share the gathered keys: up to 4 of them per program (rows =
    # heads x queries) halves the gathers per FLOP against 2 (measured 1.4x on long-64k).
    heads = math.gcd(group, 4)
    if not q.is_cuda:
        heads = 1 if group == 1 else 2
        return ForwardConfig(block_m=32, heads=heads, block_n=16, chunk=16,
                             num_warps=4, num_stages=1)
    rows = 128 if dim > 64 else 64
    # At most 64 queries a block: a block gathers the union of its queries' candidates,
    # which grows with its queries (gpt4-4k on the H100, one head a program: 128 queries
    # 12.53 ms, 64 queries 11.34 ms for the whole forward; long-64k's 4 heads x 32
    # queries stay, 4 x 16 took 12.47 against 11.42 ms).
    block_m = max(16, min(rows // heads, 64, triton.next_power_of_2(seq_len)))
    warps = 8 if heads * block_m >= 128 else 4
    return ForwardConfig(block_m=block_m, heads=heads, block_n=64, chunk=1024,
                         num_warps=warps, num_stages=2)


def _sort(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """scores [BH, S] -> (z desc, positions int32, rank int32); ties keep the smaller
    position first, which is the contract's tie order."""
    z, order = torch.sort(scores, dim=1, descending=True, stable=True)
    bh, seq_len = scores.shape
    sp = torch.empty((bh, seq_len), dtype=torch.int32, device=scores.device)
    rank = torch.empty_like(sp)
    sparsek_sort_ranks_kernel[(triton.cdiv(seq_len, 1024) * bh,)](order, sp, rank, seq_len,
                                                                  BLOCK=1024)
    return z.contiguous(), sp, rank


def _scan_serves(bh: int, seq_len: int, budget: int, on_gpu: bool) -> bool:
    """Whether the per-row scan computes the causal selection (see SCAN_MAX_BUDGET)."""
    fits = budget <= SCAN_MAX_BUDGET
    if not on_gpu:  # the interpreter: always, so the tests cover it
        return fits
    return fits and bh >= SCAN_MIN_ROWS and seq_len <= SCAN_MAX_LEN


def scan_rows(scores, z, sp, rank, tau, rk, cnt, flag, budget, window, block_m, chunks,
              stride, sms, boundary_tables=None) -> None:
    """The causal scan of every row of scores [BH, S] into tau, rk and cnt, raising flag
    for the rows it gives up on. With chunks > 1, chunk c starts at block c * stride, from
    the boundary kernel's (lists, bf, bi) there."""
    bh, seq_len = scores.shape
    dev = scores.device
    warps = SCAN_WARPS or (1 if bh >= 512 else 4)
    regs = scan_register_cap(bh * chunks, warps, sms) if dev.type == "cuda" else None
    nw = triton.next_power_of_2(triton.cdiv(seq_len, 32))
    st_i = torch.empty((bh, chunks, 8), dtype=torch.int32, device=dev)
    st_f = torch.empty((bh, chunks, 4), dtype=torch.float32, device=dev)
    st_d = torch.empty((bh, chunks), dtype=torch.float64, device=dev)
    bmw = torch.empty((bh, chunks, nw), dtype=torch.int32, device=dev)
    sparsek_scan_start_kernel[(bh,)](
        scores, sp, rank, st_i, st_f, st_d, seq_len, budget, window, MAX_NEWTON, chunks,
        BM=block_m, KP=triton.next_power_of_2(budget + 1), num_warps=warps)
    if chunks > 1:
        lists, bf, bi = boundary_tables
        sparsek_scan_resume_kernel[(bh, chunks - 1)](
            z, sp, rank, lists, bf, bi, st_i, st_f, st_d, bmw, seq_len, bf.shape[1], budget,
            window, stride, BM=block_m, NW=nw, NWC=min(nw, 128), num_warps=4)
    sparsek_causal_scan_kernel[(bh, chunks)](
        scores, z, sp, rank, tau, rk, cnt, flag, st_i, st_f, st_d, bmw, seq_len, budget,
        window, SCAN_MAX_ENDS, stride, BM=block_m, NW=nw, CH=32, num_warps=warps,
        **_cap(regs))


def prefix_levels(seq_len: int) -> tuple[int, int]:
    """The causal boundary kernel's prefix tables, (NL0, levels): table j holds the
    positions below NL0 << j, the last one PREFIX_LEN (None: the largest power of two at
    most half the row), the first about PREFIX_MIN_LEN; (0, 0) for none. A base of n
    members walks the shortest table holding it, of which it is more than half (or all of
    it below NL0), and a base longer than the last table walks the sort, of which it is
    more than half when that table is half the row."""
    n_l = PREFIX_LEN
    if n_l is None:
        n_l = 1 << max((seq_len // 2).bit_length() - 1, 0)
    if not 0 < n_l <= seq_len // 2:
        return 0, 0
    levels = 1
    while n_l >> levels >= PREFIX_MIN_LEN:
        levels += 1
    return n_l >> (levels - 1), levels


def prefix_tables(sp: torch.Tensor, nl0: int, levels: int) -> torch.Tensor:
    """The causal boundary kernel's prefix tables of the sort sp [BH, S] (positions by
    rank), one after the other in [BH, nl0 * (2 ** levels - 1)] int32: table j the ranks
    of positions 0 .. (nl0 << j) - 1 in ascending order. Two passes over sp: each block of
    ranks counts its entries for every table, then writes them at the sum of the counts
    before it."""
    bh, seq_len = sp.shape
    block = 1024
    n_blk = triton.cdiv(seq_len, block)
    grid = (n_blk * bh,)
    counts = torch.empty((bh, levels, n_blk), dtype=torch.int32, device=sp.device)
    sparsek_prefix_count_kernel[grid](sp, counts, seq_len, nl0, BLOCK=block, LEVELS=levels)
    offsets = (torch.cumsum(counts, dim=2, dtype=torch.int32) - counts).contiguous()
    tables = torch.empty((bh, nl0 * ((1 << levels) - 1)), dtype=torch.int32,
                         device=sp.device)
    sparsek_prefix_table_kernel[grid](sp, offsets, tables, seq_len, nl0, BLOCK=block,
                                      LEVELS=levels)
    return tables


def _select_causal(scores, z, sp, rank, budget, window, cfg) -> Selection:
    bh, seq_len = scores.shape
    nblk = triton.cdiv(seq_len, cfg.block_m)
    nbnd = nblk + 1  # boundary nblk is the upper bracket of the last block only
    dev = scores.device
    lists = torch.empty((bh, nbnd, budget), dtype=torch.int32, device=dev)
    bf = torch.empty((bh, nbnd, 2), dtype=torch.float32, device=dev)
    bi = torch.empty((bh, nbnd, 4), dtype=torch.int32, device=dev)
    tau, rk, cnt = _per_query(scores)
    # The scan writes every query of a row and flags any row it gave up on; the
    # per-query kernels then solve only those (all rows, when the scan does not run).
    scan = _scan_serves(bh, seq_len, budget, scores.is_cuda)
    flag = torch.zeros(bh, dtype=torch.int32, device=dev)

    # No table: the kernel walks the sort for every base (sp stands in for the tables).
    nl0, levels = prefix_levels(seq_len)
    tables = prefix_tables(sp, nl0, levels) if levels else sp[:, :0]

    def boundaries(flags, stride, redo=False):
        chain = 1 if scan else BOUNDARY_CHAIN  # the scan's launches solve few boundaries
        sparsek_boundary_fwd_kernel[(triton.cdiv(nbnd, chain) * bh,)](
            z, sp, tables, scores, lists, bf, bi, flags, seq_len, nl0, nbnd,
            budget, window, MAX_NEWTON, stride,
            BM=cfg.block_m, CH=min(cfg.chunk, BOUNDARY_CHUNK),
            CHW=min(cfg.chunk, BOUNDARY_WALK_CHUNK), GATED=scan, LEVELS=levels, REDO=redo,
            CHAIN=chain, num_warps=BOUNDARY_WARPS,
            **_cap(BOUNDARY_MAX_REGISTERS))

    if not scan:
        boundaries(flag, 1)
    else:
        # The scan walks each row in chunks that start at boundaries the boundary kernel
        # solves first (with every list; no row is flagged yet); rows the scan then flags
        # are redone whole.
        sms = (torch.cuda.get_device_properties(dev).multi_processor_count
               if dev.type == "cuda" else 1)  # the interpreter: as many chunks as fit
        chunks, stride = scan_chunks(bh, nblk, budget, window, cfg.block_m, sms)
        boundaries(flag, stride)
        scan_rows(scores, z, sp, rank, tau, rk, cnt, flag, budget, window, cfg.block_m,
                  chunks, stride, sms, (lists, bf, bi))
        boundaries(flag, stride, redo=True)
    sub = min(cfg.block_m, SELECT_ROWS)
    groups = nblk * (cfg.block_m // sub)
    if scan:  # only the flagged rows are solved, by a few programs each
        groups = min(groups, GATED_PROGRAMS)
    sparsek_block_causal_fwd_kernel[(groups * bh,)](
        z, sp, rank, scores, lists, bf, bi, tau, rk, cnt, flag, seq_len, nbnd, budget,
        window, MAX_NEWTON, groups, BM=cfg.block_m, BQ=sub, NS=SLOTS, CHX=64,
        GATED=scan, num_warps=BLOCK_CAUSAL_WARPS,
        **_cap(BLOCK_CAUSAL_MAX_REGISTERS))
    return Selection(lists, rank, tau, rk, cnt, scores)


def score_buckets(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where each of S value buckets starts in the descending sort z [BH, S]
    -> (first [BH, S + 2] int32, inv_h [BH] float32, fullest [BH] int32: the most scores
    in one bucket of the row). For rows longer than PREP_MAX_LEN; shorter ones get these
    tables, built the same way, from ``sparsek_noncausal_prep_kernel``.

    Value t's bucket is ``floor((z[0] - t) * inv_h)`` clamped to [0, S], computed the
    same way (float32) wherever it is used, with ``inv_h = S / (z[0] - z[-1])``;
    ``first[b]`` is the number of sorted scores whose bucket is below b. The bucket is
    monotone in the value, so every score of an earlier bucket than t's is above t and
    every score of a later one below it: a count of scores above t lies in
    ``[first[b], first[b + 1]]``, a few ranks instead of the whole row."""
    buckets = z.shape[1]
    zmax = z[:, :1]
    inv_h = buckets / (zmax - z[:, -1:])
    inv_h = torch.where(torch.isfinite(inv_h), inv_h, 0.0)
    b = torch.floor((zmax - z) * inv_h).clamp_(0, buckets).to(torch.int32)
    edges = torch.arange(buckets + 2, dtype=torch.int32, device=z.device)
    first = torch.searchsorted(b, edges.expand(z.shape[0], -1).contiguous(), out_int32=True)
    fullest = torch.diff(first, dim=1).amax(dim=1).to(torch.int32)
    return first, inv_h.reshape(-1).contiguous(), fullest


def _noncausal_tables(scores: torch.Tensor):
    """(z, sp, rank, zpre, first, inv_h, fullest) of scores [BH, S] for the non-causal
    block kernel: the sort, its float64 prefix sums and its value buckets (one bucket a
    score). Rows of at most PREP_MAX_LEN scores take one fused program each."""
    bh, seq_len = scores.shape
    dev = scores.device
    if seq_len > PREP_MAX_LEN:
        z, sp, rank = _sort(scores)
        zpre = torch.zeros((bh, seq_len + 1), dtype=torch.float64, device=dev)
        torch.cumsum(z.double(), dim=1, out=zpre[:, 1:])
        return (z, sp, rank, zpre, *score_buckets(z))
    z = torch.empty_like(scores)
    sp = torch.empty_like(scores, dtype=torch.int32)
    rank = torch.empty_like(sp)
    zpre = torch.empty((bh, seq_len + 1), dtype=torch.float64, device=dev)
    first = torch.empty((bh, seq_len + 2), dtype=torch.int32, device=dev)
    inv_h = torch.empty(bh, dtype=torch.float32, device=dev)
    fullest = torch.empty(bh, dtype=torch.int32, device=dev)
    p2 = triton.next_power_of_2(seq_len)
    sparsek_noncausal_prep_kernel[(bh,)](
        scores, z, sp, rank, zpre, first, inv_h, fullest, seq_len,
        P2=p2, NBIN=triton.next_power_of_2(seq_len + 2),
        num_warps=PREP_WARPS or (1 if p2 <= 512 else min(16, p2 // 256)))
    return z, sp, rank, zpre, first, inv_h, fullest


def _select_noncausal(scores, budget, window, cfg) -> Selection:
    bh, seq_len = scores.shape
    nblk = triton.cdiv(seq_len, cfg.block_m)
    dev = scores.device
    lists = torch.empty((bh, nblk, budget), dtype=torch.int32, device=dev)
    z, sp, rank, zpre, first, inv_h, fullest = _noncausal_tables(scores)
    tau, rk, cnt = _per_query(scores)
    # One program per block: a 16-query one-warp program (measured 9x slower) holds
    # larger per-query tiles a thread and spills.
    sparsek_block_noncausal_fwd_kernel[(nblk * bh,)](
        z, sp, rank, zpre, first, inv_h, fullest, scores, lists, tau, rk, cnt, seq_len,
        nblk, budget, window, MAX_NEWTON, BM=cfg.block_m,
        NW=max(16, triton.next_power_of_2(2 * window - 1)),
        NR=max(16, triton.next_power_of_2(cfg.block_m + 2 * window - 2)),
        CH=min(cfg.chunk, 256), num_warps=NONCAUSAL_WARPS,
        **_cap(NONCAUSAL_MAX_REGISTERS))
    return Selection(lists, rank, tau, rk, cnt, scores)


def _per_query(scores: torch.Tensor):
    shape, dev = scores.shape, scores.device
    return (torch.empty(shape, dtype=torch.float32, device=dev),
            torch.empty(shape, dtype=torch.int32, device=dev),
            torch.empty(shape, dtype=torch.int32, device=dev))


def select(u: torch.Tensor, kv_budget: int, window: int, causal: bool,
           cfg: ForwardConfig) -> Selection:
    """The selection for scores u [B, Hkv, S] with blocks of cfg.block_m queries."""
    seq_len = u.shape[-1]
    scores = u.reshape(-1, seq_len).to(torch.float32).contiguous()
    budget = min(kv_budget, seq_len)
    if budget == 0:
        # Nothing is ever selected: an empty list, and a cut no rank passes.
        rank = _sort(scores)[2]
        bh, dev = scores.shape[0], scores.device
        lists = torch.zeros((bh, 1, 1), dtype=torch.int32, device=dev)
        return Selection(lists, rank, torch.zeros_like(scores),
                         torch.full_like(rank, -1), torch.zeros_like(rank), scores)
    if causal:
        return _select_causal(scores, *_sort(scores), budget, window, cfg)
    return _select_noncausal(scores, budget, window, cfg)


def attention_launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     sel: Selection, window: int, causal: bool, scale: float,
                     cfg: ForwardConfig, o: torch.Tensor, lse: torch.Tensor):
    """([(grid, first row)], positional args, constexpr args) of the attention kernel
    for contiguous q, k, v, o and lse and a selection made with cfg's blocks: one launch
    per ROWS_PER_LAUNCH (batch, kv head) rows (see run_attention); the caller adds the
    tile (BN, num_warps, num_stages) or lets the tuner pick it."""
    batch, q_heads, seq_len, dim = q.shape
    kv_heads = k.shape[1]
    group = q_heads // kv_heads
    heads = math.gcd(cfg.heads, group)
    args = (q, k, v, sel.scores, sel.rank, sel.lists, sel.tau, sel.rk, sel.cnt, o, lse,
            seq_len, q_heads, kv_heads, sel.lists.shape[1], sel.lists.shape[2], window,
            scale * LOG2E)
    rows = batch * kv_heads
    launches = [((triton.cdiv(seq_len, cfg.block_m), min(ROWS_PER_LAUNCH, rows - row0),
                  group // heads), row0) for row0 in range(0, rows, ROWS_PER_LAUNCH)]
    fixed = dict(CAUSAL=causal, BM=cfg.block_m, HG=heads, D=dim,
                 PREC="ieee" if q.dtype == torch.float32 else "tf32",
                 UPCAST=q.device.type == "cpu" and q.dtype == torch.bfloat16)
    return launches, args, fixed


def run_attention(kernel, launches, args: tuple, fixed: dict, **launch):
    """Launch an attention kernel (Triton or Gluon, tuned or not) over attention_launch's
    launches: (grid, first row) each. Returns the last launch's compiled kernel (its
    registers and spills; a tuner returns the one it ran)."""
    compiled = None
    for grid, row0 in launches:
        compiled = kernel[grid](*args, **fixed, ROW0=row0, **launch)
    return compiled


# The attention kernel picked per shape (see launch_forward for the key): "triton",
# "gluon" or "ws".
_ATTENTION_PICKS: dict[tuple, str] = {}
# The median milliseconds each candidate took when the pick was made, per shape.
_PICK_TIMES: dict[tuple, dict[str, float]] = {}


@functools.cache
def gluon_attention():
    """The Hopper attention kernel's module (gluon_attn), or None where this Triton build
    lacks Gluon's warpgroup API. Imported on first use on a GPU, never on the way to the
    CPU interpreter: after a Gluon import in compiled mode, interpreted kernels fail
    (seen with Triton 3.9: "Cannot call @triton.jit'd outside of the scope of a
    kernel")."""
    try:
        from sparsek import gluon_attn
    except (ImportError, AttributeError):  # pragma: no cover - depends on the Triton build
        return None
    return gluon_attn


@functools.cache
def ws_attention():
    """The warp-specialized Hopper attention kernel's module (gluon_ws_attn), or None
    where this Triton build lacks Gluon's warp specialization; imported as
    gluon_attention is."""
    if gluon_attention() is None:
        return None
    try:
        from sparsek import gluon_ws_attn
    except (ImportError, AttributeError):  # pragma: no cover - depends on the Triton build
        return None
    return gluon_ws_attn


def attention_picks() -> dict[tuple, str]:
    """The attention kernel picked for each shape tuned so far in this process."""
    return dict(_ATTENTION_PICKS)


def attention_pick_times() -> dict[tuple, dict[str, float]]:
    """For each shape picked among several kernels: each one's median milliseconds."""
    return {key: dict(times) for key, times in _PICK_TIMES.items()}


# A candidate replaces the first (default) attention kernel only when it is faster by more
# than this fraction: on gpt4-4k the two kernels tie within 1-2%, and a pick made on such
# a margin came out 6% slower inside the forward (7.41 against 6.99 ms on the H100). On
# long-64k the warp-specialized kernel is 4-9% faster in four measurements (the pick's
# own: 8.006 against 8.354 ms; the whole forward: 9.01-9.03 against 9.56-9.66 ms), which
# a 5% margin turned down.
PICK_MARGIN = 0.03


def _pick_attention(key: tuple, runs: dict) -> str:
    """The attention kernel for the shape `key` among the candidates (runs: name ->
    launch, each tuned over its own tiles on its first call, the default first): the
    fastest, if it beats the default by PICK_MARGIN. Timed once per process."""
    if key not in _ATTENTION_PICKS:
        names = list(runs)
        pick = names[0]
        if len(names) > 1:
            from triton.testing import do_bench

            times = {}
            for name, run in runs.items():
                run()  # the kernel's own tuner runs here, on the first call
                times[name] = do_bench(run, return_mode="median")
            best = min(times, key=times.get)
            if times[best] < (1 - PICK_MARGIN) * times[pick]:
                pick = best
            _PICK_TIMES[key] = times
        _ATTENTION_PICKS[key] = pick
    return _ATTENTION_PICKS[key]


def launch_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, u: torch.Tensor,
                   kv_budget: int, window: int, causal: bool, scale: float,
                   o: torch.Tensor, lse: torch.Tensor,
                   config: ForwardConfig | None = None) -> None:
    """Write o [B, Hq, S, D] and lse [B, Hq, S] (float32) for already-validated inputs."""
    cfg = config or default_config(q, q.shape[1] // k.shape[1])
    rows = math.gcd(cfg.heads, q.shape[1] // k.shape[1]) * cfg.block_m  # a program's rows
    gluon_attn = gluon_attention() if q.is_cuda else None
    if cfg.kernel == "gluon":
        if gluon_attn is None or not gluon_attn.supported(q, rows):
            raise ValueError(f"config.kernel='gluon' needs float16 or bfloat16 on a Hopper "
                             f"GPU (sm_90) and 64 or 128 rows a program; got {q.dtype} on "
                             f"{q.device} with {rows} rows: use kernel='triton'")
        gluon_launch = gluon_attn.launch_kwargs(cfg.block_n, cfg.num_stages,
                                                cfg.max_registers, rows)
    ws_attn = ws_attention() if q.is_cuda else None
    if cfg.kernel == "ws":
        if ws_attn is None or not ws_attn.supported(q, rows):
            raise ValueError(f"config.kernel='ws' needs float16 or bfloat16 on a Hopper GPU "
                             f"(sm_90) and 64 or 128 rows a program (heads x block_m); got "
                             f"{q.dtype} on {q.device} with {rows} rows: use "
                             f"kernel='triton'")
        ws_launch = ws_attn.launch_kwargs(cfg.block_n, cfg.num_stages, rows=rows)
    elif cfg.kernel not in ("triton", "gluon"):
        raise ValueError(f"config.kernel must be 'triton', 'gluon' or 'ws'; got "
                         f"{cfg.kernel!r}")
    sel = select(u, kv_budget, window, causal, cfg)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    # The kernels write contiguous outputs; the warp-specialized one writes o by TMA,
    # which needs it to start on a 16-byte boundary too.
    o_dst = (o if o.is_contiguous() and o.data_ptr() % 16 == 0
             else torch.empty(q.shape, dtype=q.dtype, device=q.device))
    lse_dst = lse if lse.is_contiguous() else torch.empty(lse.shape, dtype=lse.dtype,
                                                          device=lse.device)
    launches, args, fixed = attention_launch(q, k, v, sel, window, causal, scale, cfg,
                                             o_dst, lse_dst)
    if config is None and q.is_cuda and TUNE:
        # Each new shape is tuned once per process, on its first call (outputs are
        # rewritten whole by every trial, so the trials leave nothing behind).
        runs = {"triton": lambda: run_attention(sparsek_attn_fwd_tuned, launches, args,
                                                fixed)}
        if gluon_attn is not None and gluon_attn.supported(q, rows):
            runs["gluon"] = lambda: run_attention(gluon_attn.tuned(rows), launches, args,
                                                  gluon_attn.kernel_args(fixed))
        if ws_attn is not None and ws_attn.supported(q, rows):
            # Its descriptors (and copies of misaligned inputs) only when it runs.
            runs["ws"] = lambda: run_attention(ws_attn.tuned(rows), launches,
                                               ws_attn.kernel_args(args, cfg.block_m),
                                               gluon_attn.kernel_args(fixed))
        key = (q.device.index, q.dtype, *q.shape, k.shape[1], kv_budget, window, causal,
               cfg.block_m, fixed["HG"], *runs)
        runs[_pick_attention(key, runs)]()
    elif cfg.kernel == "gluon":
        run_attention(gluon_attn.sparsek_attn_fwd_gluon, launches, args,
                      gluon_attn.kernel_args(fixed), **gluon_launch)
    elif cfg.kernel == "ws":
        run_attention(ws_attn.sparsek_attn_fwd_ws, launches,
                      ws_attn.kernel_args(args, cfg.block_m),
                      gluon_attn.kernel_args(fixed), **ws_launch)
    else:
        run_attention(sparsek_attn_fwd_kernel, launches, args, fixed, BN=cfg.block_n,
                      num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                      **_cap(cfg.max_registers))
    if o_dst is not o:
        o.copy_(o_dst)
    if lse_dst is not lse:
        lse.copy_(lse_dst)


def _check(q, k, v, u, kv_budget, window, causal, scale) -> float:
    scale = check_attention_inputs(q, k, v, u, kv_budget=kv_budget, window=window,
                                   causal=causal, scale=scale, check_finite=False)
    check_triton_head_dim(q.shape[-1])
    if q.dtype not in DTYPES:
        raise ValueError(f"q must be float16, bfloat16 or float32 for impl='triton'; got "
                         f"{q.dtype}. impl='reference' accepts float64.")
    return scale


def sparsek_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, u: torch.Tensor, *,
    kv_budget: int, window: int, causal: bool, scale: float | None = None,
    out: torch.Tensor | None = None, lse_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseK attention through the fused kernels (registered as ``sparsek::attention_fwd``).

    Args:
        q: fp16, bf16 or fp32 [B, Hq, S, D], D in {64, 128}; k, v: [B, Hkv, S, D].
        u: float32 [B, Hkv, S] scores (float64 is read as float32).
        kv_budget, window, causal, scale: as in ``sparsek.sparsek_attention``.
        out: optional [B, Hq, S, D] buffer for o; lse_out: optional float32 [B, Hq, S].

    Returns:
        (o [B, Hq, S, D] in q's dtype, lse [B, Hq, S] float32); o is ``out`` when given.
    """
    scale = _check(q, k, v, u, kv_budget, window, causal, scale)
    if out is None and lse_out is None:
        return op.attention_fwd(q, k, v, u, kv_budget, window, causal, scale)
    o = out if out is not None else torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out is not None:
        check_out(out, q)
    lse = lse_out if lse_out is not None else torch.empty(q.shape[:3], dtype=torch.float32,
                                                           device=q.device)
    op.attention_fwd_out(q, k, v, u, o, lse, kv_budget, window, causal, scale)
    return o, lse


# The custom ops wrap launch_forward above, so they are registered after it exists; a
# module-level import (not one inside the function) keeps torch.compile free of breaks.
from sparsek import op  # noqa: E402
