"""Selection kernels of the Triton SparseK forward: thresholds, cut ranks and gathered lists.

Queries are taken in blocks of BM consecutive positions. For a block starting at i0 the
*base* is the part of every block query's candidate set that they all share:
causal ``[0, i0 - W]``, non-causal every position outside the block's dense range. Each
query's candidates are the base plus at most BM - 1 *extras* from the dense range, so its
selected set lies in ``G_b`` (the top-K of the base) plus the dense range. Per block the
kernels write ``G_b`` (positions, best first); per query they write

- ``tau``: the threshold (``-inf`` where every candidate is kept),
- ``rk``: the global rank of the K-th best candidate, so key j is selected iff
  ``rank[j] <= rk`` (global ranks order scores descending, ties by smaller position),
- ``cnt``: how many leading entries of ``G_b`` the query selects.

Everything works on one stable descending sort of u per (batch, kv head): ``z`` the sorted
scores, ``sp`` their positions, ``rank`` the inverse permutation.

This module holds the shared solver pieces and the causal kernels; the non-causal kernel is
in ``triton_select_noncausal``.

The threshold solves ``f(t) = sum_{j in C} clip(u_j - t, 0, 1) = K``, a non-increasing
piecewise-linear function. Every solver here is a safeguarded Newton iteration that
evaluates f exactly from counts (``#{u >= t + 1}``, ``#{t < u < t + 1}``) and the sum over
the middle set; when two successive points share those counts, the second is the closed-form
root of that linear piece, exact up to float32 rounding of t.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _row_block(n_blk):
    """(row, block) of this program in a one-dimensional grid of n_blk programs per row,
    blocks fastest. Rows go in the first grid dimension (up to 2**31 - 1 programs), not
    the second, whose limit of 65535 a batch of many heads would exceed."""
    return tl.program_id(0) // n_blk, tl.program_id(0) % n_blk


@triton.jit
def sparsek_sort_ranks_kernel(order_ptr, sp_ptr, rank_ptr, S, BLOCK: tl.constexpr):
    """From a sort's permutation ``order`` [BH, S] (int64): its int32 copy ``sp`` and its
    inverse ``rank`` (rank[order[r]] = r), for one BLOCK of ranks of one row (programs in
    (row, block) order, blocks fastest: see ``_row_block``)."""
    i_bh, i_blk = _row_block(tl.cdiv(S, BLOCK))
    row = i_bh.to(tl.int64) * S
    r = i_blk * BLOCK + tl.arange(0, BLOCK)
    m = r < S
    pos = tl.load(order_ptr + row + r, mask=m, other=0)
    tl.store(sp_ptr + row + r, pos.to(tl.int32), mask=m)
    tl.store(rank_ptr + row + pos, r, mask=m)


@triton.jit
def _tables_row(i_bh, NL0, LEVELS: tl.constexpr):
    """Where row i_bh's prefix tables start: each row holds LEVELS tables of NL0 << j
    entries, one after the other (NL0 * (2 ** LEVELS - 1) in all; see
    triton_fwd.prefix_tables, which allocates them)."""
    return i_bh.to(tl.int64) * (NL0 * ((1 << LEVELS) - 1))


@triton.jit
def sparsek_prefix_count_kernel(sp_ptr, cnt_ptr, S, NL0, BLOCK: tl.constexpr,
                                LEVELS: tl.constexpr):
    """How many of one BLOCK of a row's sort ranks hold a position below each prefix
    table's length NL0 << j (j < LEVELS), into cnt [BH, LEVELS, cdiv(S, BLOCK)]: the
    first pass of the prefix tables (see below)."""
    n_blk = tl.cdiv(S, BLOCK)
    i_bh, i_blk = _row_block(n_blk)
    r = i_blk * BLOCK + tl.arange(0, BLOCK)
    pos = tl.load(sp_ptr + i_bh.to(tl.int64) * S + r, mask=r < S, other=S)
    for j in tl.static_range(LEVELS):
        tl.store(cnt_ptr + (i_bh * LEVELS + j) * n_blk + i_blk,
                 tl.sum((pos < (NL0 << j)).to(tl.int32), axis=0))


@triton.jit
def sparsek_prefix_table_kernel(sp_ptr, off_ptr, lr_ptr, S, NL0, BLOCK: tl.constexpr,
                                LEVELS: tl.constexpr):
    """A row's prefix tables for the causal boundary kernel, one BLOCK of its sort ranks a
    program: table j holds the ranks whose position is below NL0 << j, in ascending order.
    They lie one after the other in lr [BH, NL0 * (2 ** LEVELS - 1)], table j at
    NL0 * (2 ** j - 1). off [BH, LEVELS, cdiv(S, BLOCK)] holds how many such ranks precede
    each block (the exclusive sums of sparsek_prefix_count_kernel's counts)."""
    n_blk = tl.cdiv(S, BLOCK)
    i_bh, i_blk = _row_block(n_blk)
    r = i_blk * BLOCK + tl.arange(0, BLOCK)
    pos = tl.load(sp_ptr + i_bh.to(tl.int64) * S + r, mask=r < S, other=S)
    l_row = _tables_row(i_bh, NL0, LEVELS)
    for j in tl.static_range(LEVELS):
        keep = pos < (NL0 << j)
        idx = tl.load(off_ptr + (i_bh * LEVELS + j) * n_blk + i_blk)
        idx += tl.cumsum(keep.to(tl.int32), axis=0) - 1
        tl.store(lr_ptr + l_row + NL0 * ((1 << j) - 1) + idx, r, mask=keep)


@triton.jit
def _ulps(lo, hi):
    """About two float32 ulps at the bracket's scale: narrower brackets are resolved."""
    return tl.maximum(tl.maximum(tl.abs(lo), tl.abs(hi)) * 2.4e-7, 1e-30)


@triton.jit
def _outward(lo, hi):
    """Widen a bracket by about two ulps each way: its ends come from float32 arithmetic
    (``fl((z_K - 1) + 1)`` can exceed ``z_K``), and an end that is off by rounding would
    leave the root outside, where the safeguard could only crawl towards it."""
    pad = _ulps(lo, hi)
    return lo - pad, hi + pad


@triton.jit
def _newton_step(t, f, nmid, lo, hi, K):
    """One safeguarded step from t (f = f(t), nmid = -slope there)
    -> (next t, lo, hi, newton, settled).

    The bracket [lo, hi] keeps f(lo) >= K >= f(hi); a Newton point outside it, or a flat
    piece, falls back to bisection. ``newton`` says the step was a Newton step, which makes
    the next point the exact root if it lands on the same piece. ``settled``: the Newton
    step is below float32 resolution at t, so t already is the root to float32 rounding
    (this happens at a bracket end that is itself the root, where bisection would crawl).
    """
    lo = tl.where(f > K, t, lo)
    hi = tl.where(f < K, t, hi)
    tn = (t.to(tl.float64) + (f - K) / tl.maximum(nmid, 1).to(tl.float64)).to(tl.float32)
    settled = ((nmid > 0) & (tn == t)) | (hi - lo <= _ulps(lo, hi))
    newton = (nmid > 0) & (tn > lo) & (tn < hi)
    mid = lo + (hi - lo) * 0.5
    return tl.where(newton, tn, mid), lo, hi, newton, settled


@triton.jit
def _newton_advance(t, f, n_sat, n_mid, prev_sat, prev_mid, newton, lo, hi, it, K, MAXIT):
    """Every solver's iteration: the stop test at t, then the step from it
    -> (next t, lo, hi, newton, done); at done, t is the answer.

    f = f(t), from n_sat saturated and n_mid middle scores. Done when: f hits K; a Newton
    step landed on the piece it started from (same counts as before it: t is that piece's
    root); the step settles or bisection cannot move; or MAXIT steps were taken."""
    done = (newton & (n_sat == prev_sat) & (n_mid == prev_mid)) | (f == K) | (it >= MAXIT)
    t_next, lo, hi, newton, settled = _newton_step(t, f, n_mid, lo, hi, K)
    # Bisection that cannot move any more means lo and hi are adjacent floats.
    done = done | settled | (t_next <= lo) | (t_next >= hi)
    return t_next, lo, hi, newton, done


@triton.jit
def _above(z, t, STRICT: tl.constexpr):
    """z > t (STRICT) or z >= t: which side of a threshold a cursor or count takes."""
    if STRICT:  # noqa: SIM108 (a constexpr branch; Triton compiles one side)
        r = z > t
    else:
        r = z >= t
    return r


@triton.jit
def _walked(sp_ptr, lr_ptr, row, l_row, o, m_in, use_l):
    """(sort ranks, positions) of entries o of a walk's source: the row's sort itself (entry
    o is rank o), or with use_l its prefix table (the ranks of the positions below NL, in
    ascending order; see sparsek_boundary_fwd_kernel)."""
    if use_l:  # noqa: SIM108 (a runtime branch, kept as the statement Triton compiles)
        b_r = tl.load(lr_ptr + l_row + o, mask=m_in, other=0)
    else:
        b_r = o
    return b_r, tl.load(sp_ptr + row + b_r, mask=m_in, other=0)


@triton.jit
def _move_cursor(z_ptr, sp_ptr, lr_ptr, row, l_row, use_l, n_src, c, cnt, acc, t, P,
                 STRICT: tl.constexpr, CH: tl.constexpr):
    """Move cursor c (an entry of the walked source, n_src entries: see _walked) so that
    the entries before it are exactly those with z > t (STRICT) or z >= t, keeping the count
    and float64 sum of base members (position <= P) among them."""
    o_ch = tl.arange(0, CH)
    go = c >= 0
    moved = c < 0
    while go:  # forward: take entries that now satisfy the condition
        o = c + o_ch
        m_in = o < n_src
        b_r, b_p = _walked(sp_ptr, lr_ptr, row, l_row, o, m_in, use_l)
        b_z = tl.load(z_ptr + row + b_r, mask=m_in, other=float("-inf"))
        m_take = m_in & _above(b_z, t, STRICT)
        m_base = m_take & (b_p <= P)
        cnt += tl.sum(m_base.to(tl.int32), axis=0)
        acc += tl.sum(tl.where(m_base, b_z, 0.0).to(tl.float64), axis=0)
        n_take = tl.sum(m_take.to(tl.int32), axis=0)
        c += n_take
        moved = moved | (n_take > 0)
        go = n_take == CH
    # A cursor that moved forward already satisfies the condition below it.
    go = (c > 0) & (moved == 0)
    while go:  # backward: drop entries that no longer satisfy it
        o = c - CH + o_ch
        m_in = o >= 0
        b_r, b_p = _walked(sp_ptr, lr_ptr, row, l_row, o, m_in, use_l)
        b_z = tl.load(z_ptr + row + b_r, mask=m_in, other=float("inf"))
        m_drop = m_in & (_above(b_z, t, STRICT) == 0)
        m_base = m_drop & (b_p <= P)
        cnt -= tl.sum(m_base.to(tl.int32), axis=0)
        acc -= tl.sum(tl.where(m_base, b_z, 0.0).to(tl.float64), axis=0)
        n_drop = tl.sum(m_drop.to(tl.int32), axis=0)
        c -= n_drop
        go = (n_drop == CH) & (c > 0)
    return c, cnt, acc


@triton.jit
def _sort_cursor(z_ptr, lr_ptr, row, l_row, c, NL, S, t, STRICT: tl.constexpr,
                 CH: tl.constexpr):
    """The cursor into the row's sort (#{z > t}, or #{z >= t}) for cursor c into its prefix
    table: it lies between the ranks of table entries c - 1 (taken) and c (not taken), a
    few ranks apart (S / NL on average), and is found by stepping over them."""
    lo = tl.where(c > 0, tl.load(lr_ptr + l_row + tl.maximum(c - 1, 0)) + 1, 0)
    hi = tl.where(c < NL, tl.load(lr_ptr + l_row + tl.minimum(c, NL - 1)), S)
    o_ch = tl.arange(0, CH)
    go = lo < hi
    while go:
        o = lo + o_ch
        m_in = o < hi
        b_z = tl.load(z_ptr + row + o, mask=m_in, other=float("-inf"))
        m_take = m_in & _above(b_z, t, STRICT)
        n_take = tl.sum(m_take.to(tl.int32), axis=0)
        lo += n_take
        go = (n_take == CH) & (lo < hi)
    return lo


@triton.jit
def sparsek_boundary_fwd_kernel(
    z_ptr, sp_ptr, lr_ptr, u_ptr, g_ptr, bf_ptr, bi_ptr, flag_ptr,
    S, NL0, NBND, K, W, MAXIT, STRIDE,
    BM: tl.constexpr, CH: tl.constexpr, CHW: tl.constexpr, GATED: tl.constexpr,
    LEVELS: tl.constexpr, REDO: tl.constexpr = False, CHAIN: tl.constexpr = 1,
):
    """Causal block boundaries: top-K list and exact threshold of each prefix base.

    Boundary b has base ``[0, P]`` with ``P = min(b * BM - W, S - 1)``. Writes
    g [BH, NBND, K] (positions, best first), bf [BH, NBND, 2] (tau, D) and
    bi [BH, NBND, 4] (a, n, c1, c2): at tau, a = #{base: z >= tau + 1},
    n = #{base: tau < z < tau + 1}, D = sum over that middle set of (z - tau),
    c1 = #{all: z > tau} and c2 = #{all: z >= tau + 1} (cursors into the sort).
    tau = -inf where the base has at most K members. GATED: the thresholds are solved only
    for rows whose flag is set (the rows the scan of ``triton_select_scan`` gave back) and
    at every STRIDE-th boundary (where a chunk of the scan starts). REDO: only the rows
    whose flag is set are written at all, lists and every threshold; the other programs
    do nothing (their lists and chunk starts were written by an earlier launch).

    lr: the row's LEVELS prefix tables (none at LEVELS = 0), see
    sparsek_prefix_table_kernel: table j holds the sort ranks of positions 0 .. NL - 1,
    NL = NL0 << j, in ascending order. A base of at most NL members lies in such a table,
    so its boundary walks the shortest one that holds it instead of the sort: its members
    are spread over the whole sort (finding K of them there takes about S * K / |base|
    ranks), but make up more than half of that table, so the walk takes fewer than 2 K
    entries (2 |base| for a base of at most K members).

    CHAIN: each program takes CHAIN consecutive boundaries of its row. After the first it
    solves, each threshold starts from the one before (``_next_threshold``): the base
    gains at most BM members, so the root moves little and the cursors a few ranks,
    where a fresh solve walks them from the K-th member and from the top. The lists are
    walked afresh at every boundary. Only for ungated launches (GATED solves few
    boundaries a row, so a chain would rarely have a threshold to start from).
    """
    # One program per (row, chain of CHAIN boundaries), every row's first chain first,
    # then every row's second, ...: the early boundaries walk the most (their bases are
    # short), so they start first and the short walks fill in behind them.
    bh = tl.num_programs(0) // tl.cdiv(NBND, CHAIN)
    i_c = tl.program_id(0) // bh
    i_bh = tl.program_id(0) % bh
    row = i_bh.to(tl.int64) * S
    # The chain's state (valid while `have`): the last threshold solved, the end of its
    # base, and its two cursors into the sort with the base's counts and float64 sums
    # before them (see _move_cursor).
    zero = (i_bh * 0).to(tl.int32)
    have = zero != 0
    t_prev = zero.to(tl.float32)
    p_prev = zero
    c1, n1, s1 = zero, zero, zero.to(tl.float64)
    c2, n2, s2 = zero, zero, zero.to(tl.float64)
    for step in range(CHAIN):
        i_b = i_c * CHAIN + step
        if i_b < NBND:
            have, t_prev, p_prev, c1, n1, s1, c2, n2, s2 = _boundary(
                z_ptr, sp_ptr, lr_ptr, u_ptr, g_ptr, bf_ptr, bi_ptr, flag_ptr, S, NL0, NBND,
                K, W, MAXIT, STRIDE, i_bh, i_b, row, have, t_prev, p_prev, c1, n1, s1, c2,
                n2, s2, BM, CH, CHW, GATED, LEVELS, REDO)


@triton.jit
def _boundary(z_ptr, sp_ptr, lr_ptr, u_ptr, g_ptr, bf_ptr, bi_ptr, flag_ptr, S, NL0, NBND,
              K, W, MAXIT, STRIDE, i_bh, i_b, row, have, t_prev, p_prev, c1, n1, s1, c2, n2,
              s2, BM: tl.constexpr, CH: tl.constexpr, CHW: tl.constexpr,
              GATED: tl.constexpr, LEVELS: tl.constexpr, REDO: tl.constexpr):
    """Boundary i_b of row i_bh (see sparsek_boundary_fwd_kernel), given the chain's state
    after the boundary before it; returns the state after this one."""
    P = tl.minimum(i_b * BM - W, S - 1)
    n_base = tl.maximum(P + 1, 0)
    n_g = tl.minimum(n_base, K)
    # The shortest table that holds the base (the longest one if none does) and where it
    # starts in the row's tables.
    NL = NL0 + n_base * 0
    l_row = _tables_row(i_bh, NL0, LEVELS)
    for _ in tl.static_range(LEVELS - 1):
        grow = n_base > NL
        l_row += tl.where(grow, NL, 0)
        NL = tl.where(grow, NL * 2, NL)
    use_l = n_base <= NL
    n_src = tl.where(use_l, NL, S)
    work = n_g >= 0
    if REDO:
        work = tl.load(flag_ptr + i_bh) != 0
        n_g = tl.where(work, n_g, 0)
    p_g = g_ptr + (i_bh.to(tl.int64) * NBND + i_b) * K
    o_ch = tl.arange(0, CHW)
    solve = n_base > K
    if GATED:
        solve = solve & work & ((tl.load(flag_ptr + i_bh) != 0) | (i_b % STRIDE == 0))
    # Walk the source from the top, compacting base members into the list. The walk also
    # keeps the entry of the K-th member, and for a fresh solve the float64 sum of the
    # K - 1 before it: the threshold's first cursor starts there instead of walking the
    # same entries again. Scores are read only as a fresh solve's inputs.
    sums = solve & (have == 0)
    n_z = tl.where(sums, n_src, 0)
    cnt = n_g * 0
    r0 = n_g * 0
    r_k = n_g * 0
    s_k = tl.sum(tl.zeros([CH], tl.float64), axis=0)
    while cnt < n_g:
        o = r0 + o_ch
        m_in = o < n_src
        b_r, b_p = _walked(sp_ptr, lr_ptr, row, l_row, o, m_in, use_l)
        m_base = m_in & (b_p <= P)
        idx = cnt + tl.cumsum(m_base.to(tl.int32), axis=0) - 1
        tl.store(p_g + idx, b_p, mask=m_base & (idx < n_g))
        r_k += tl.sum(tl.where(m_base & (idx == n_g - 1), o, 0), axis=0)
        if sums:
            b_z = tl.load(z_ptr + row + b_r, mask=o < n_z, other=float("-inf"))
            s_k += tl.sum(tl.where(m_base & (idx < n_g - 1), b_z, 0.0).to(tl.float64),
                          axis=0)
        cnt += tl.sum(m_base.to(tl.int32), axis=0)
        r0 += CHW
    # The K-th member's score (entry r_k of the source).
    z_k = tl.load(z_ptr + row + _walked(sp_ptr, lr_ptr, row, l_row, r_k, solve, use_l)[0],
                  mask=solve, other=0.0)
    tau = float("-inf") + z_k * 0
    d_mid = z_k * 0
    if solve:
        if have:
            tau, d_mid, c1, n1, s1, c2, n2, s2 = _next_threshold(
                z_ptr, sp_ptr, u_ptr, row, S, p_prev, P, t_prev, c1, n1, s1, c2, n2, s2, z_k,
                K, MAXIT, BM, CH)
        else:
            tau, d_mid, c1, n1, s1, c2, n2, s2 = _boundary_threshold(
                z_ptr, sp_ptr, lr_ptr, row, l_row, use_l, n_src, z_k, r_k, s_k, P, K,
                MAXIT, CH, CHW)
            if use_l:  # the cursors kept and stored are the sort's
                t1 = tau + 1.0
                c1 = _sort_cursor(z_ptr, lr_ptr, row, l_row, c1, NL, S, tau, True, CH)
                c2 = _sort_cursor(z_ptr, lr_ptr, row, l_row, c2, NL, S, t1, False, CH)
    a = tl.where(solve, n2, 0)
    n = tl.where(solve, n1 - n2, 0)
    c1 = tl.where(solve, c1, 0)
    c2 = tl.where(solve, c2, 0)
    p_f = bf_ptr + (i_bh.to(tl.int64) * NBND + i_b) * 2
    p_i = bi_ptr + (i_bh.to(tl.int64) * NBND + i_b) * 4
    tl.store(p_f, tau, mask=work)
    tl.store(p_f + 1, d_mid, mask=work)
    tl.store(p_i, a, mask=work)
    tl.store(p_i + 1, n, mask=work)
    tl.store(p_i + 2, c1, mask=work)
    tl.store(p_i + 3, c2, mask=work)
    return solve, tau, P, c1, n1, s1, c2, n2, s2


@triton.jit
def _boundary_threshold(z_ptr, sp_ptr, lr_ptr, row, l_row, use_l, n_src, z_k, r_k,
                        s_k, P, K, MAXIT, CH: tl.constexpr, CHW: tl.constexpr):
    """Exact tau of the base [0, P] (more than K members, the K-th best score z_k at entry
    r_k of the walked source, the K - 1 before it summing to s_k), solved afresh. Returns
    _cursor_newton's tuple; the cursors are entries of that source."""
    zero = (P * 0).to(tl.int32)
    # Cursor 1 (z > t) starts at the K-th member: the entries above it hold exactly the
    # K - 1 members before it. Its first move (t = z_k) steps back over any ties with z_k.
    # Cursor 2 (z >= t + 1) walks down from the top once, in the list walk's long steps;
    # the Newton steps then move both cursors a little, in short ones.
    c2, n2, s2 = _move_cursor(z_ptr, sp_ptr, lr_ptr, row, l_row, use_l, n_src, zero,
                              zero, zero.to(tl.float64), z_k + 1.0, P, False, CHW)
    lo, hi = _outward(z_k - 1.0, z_k)
    return _cursor_newton(z_ptr, sp_ptr, lr_ptr, row, l_row, use_l, n_src, z_k, lo, hi,
                          r_k, zero + K - 1, s_k, c2, n2, s2, P, K, MAXIT, CH)


@triton.jit
def _next_threshold(z_ptr, sp_ptr, u_ptr, row, S, p_prev, P, t_prev, c1, n1, s1, c2, n2,
                    s2, z_k, K, MAXIT, BM: tl.constexpr, CH: tl.constexpr):
    """Exact tau of the base [0, P] (the K-th best score z_k) from the threshold t_prev of
    the base [0, p_prev] before it in the chain (P - p_prev <= BM), with that base's
    cursors into the sort (c1 = #{z > t_prev}, c2 = #{z >= t_prev + 1}) and its members'
    counts and float64 sums before them. The new members before the cursors join the
    counts; the cursors count every score, so they stay. New members only raise f, so
    the root lies at or above t_prev (up to its rounding), and on random scores a few
    ranks of the sort away."""
    o = p_prev + 1 + tl.arange(0, BM)
    m = o <= P
    b_z = tl.load(u_ptr + row + o, mask=m, other=float("-inf"))
    m1 = m & (b_z > t_prev)
    m2 = m & (b_z >= t_prev + 1.0)
    n1 += tl.sum(m1.to(tl.int32), axis=0)
    s1 += tl.sum(tl.where(m1, b_z, 0.0).to(tl.float64), axis=0)
    n2 += tl.sum(m2.to(tl.int32), axis=0)
    s2 += tl.sum(tl.where(m2, b_z, 0.0).to(tl.float64), axis=0)
    t = tl.maximum(z_k - 1.0, t_prev)
    lo, hi = _outward(t, z_k)
    # The cursors walk the sort itself (S entries): no table, so its pointer and row
    # (sp_ptr and row here) are never read. `P != P` is a false the compiler folds, which
    # drops the table's branch from the cursor moves.
    no_table = P != P
    return _cursor_newton(z_ptr, sp_ptr, sp_ptr, row, row, no_table, S, t, lo, hi, c1, n1,
                          s1, c2, n2, s2, P, K, MAXIT, CH)


@triton.jit
def _cursor_newton(z_ptr, sp_ptr, lr_ptr, row, l_row, use_l, n_src, t, lo, hi, c1, n1, s1,
                   c2, n2, s2, P, K, MAXIT, CH: tl.constexpr):
    """Newton from t in the bracket [lo, hi] on f(t) = #{z >= t + 1} + sum over
    t < z < t + 1 of (z - t) over the base [0, P], each step's counts and sums from the
    two cursors (moved by _move_cursor) -> (tau, D, c1, n1, s1, c2, n2, s2) at tau."""
    zero = (P * 0).to(tl.int32)
    prev_a, prev_n = zero - 1, zero - 1
    newton = zero != 0
    it = zero
    go = zero == 0
    d_mid = t * 0
    while go:
        c1, n1, s1 = _move_cursor(z_ptr, sp_ptr, lr_ptr, row, l_row, use_l, n_src,
                                  c1, n1, s1, t, P, True, CH)
        c2, n2, s2 = _move_cursor(z_ptr, sp_ptr, lr_ptr, row, l_row, use_l, n_src,
                                  c2, n2, s2, t + 1.0, P, False, CH)
        n = n1 - n2
        d = (s1 - s2) - n.to(tl.float64) * t.to(tl.float64)
        f = n2.to(tl.float64) + d
        d_mid = d.to(tl.float32)
        t_next, lo, hi, newton, done = _newton_advance(t, f, n2, n, prev_a, prev_n, newton,
                                                       lo, hi, it, K, MAXIT)
        prev_a, prev_n = n2, n
        t = tl.where(done, t, t_next)
        it += 1
        go = done == 0
    return t, d_mid, c1, n1, s1, c2, n2, s2


@triton.jit
def _cut_from_extras(g_ptr, rank_ptr, row, n_g, K, m_e, r_e, BM: tl.constexpr):
    """Each query's cut given the list and its extras m_e [BQ, BM] (ranks r_e [BM]).

    An extra's rank in the union is 1 + (list entries above it) + (own extras above it);
    the K best of the union are the first ``cnt`` list entries plus the extras whose union
    rank is <= K. Returns (cnt [BQ], rk [BQ]: the largest selected global rank).

    A query has fewer than BM extras, so only the list's last BM places can decide: an
    extra with at most K - BM list entries above it is selected however many of its own
    extras beat it, and every cnt is at least K - BM + 1. So the list is read at entries
    K - BM .. K - 1 only (one load of positions, one of their ranks), and an extra above
    all of them counts as having K - BM above it, which selects it as its true count
    does. (This replaced a binary search of the whole list per extra: long-64k's
    selection 1.47-1.49 -> 1.43-1.44 ms on the H100, NOTES v19.)
    """
    w0 = tl.maximum(K - BM, 0)
    o_w = w0 + tl.arange(0, BM)
    m_w = o_w < n_g
    pos_w = tl.load(g_ptr + o_w, mask=m_w, other=0)
    # The list holds ranks in ascending order; entries past its end never count as above.
    r_w = tl.load(rank_ptr + row + pos_w, mask=m_w, other=2147483647)
    above_g = w0 + tl.sum((r_w[:, None] < r_e[None, :]).to(tl.int32), axis=0)  # [BM e]
    gt = (r_e[:, None] < r_e[None, :]).to(tl.float16)  # [BM e', BM e]: e' beats e
    above_e = tl.dot(m_e.to(tl.float16), gt, out_dtype=tl.float32).to(tl.int32)
    sel = m_e & (above_g[None, :] + above_e + 1 <= K)
    cnt = K - tl.sum(sel.to(tl.int32), axis=1)
    rk_e = tl.max(tl.where(sel, r_e[None, :], -1), axis=1)
    # The last list entry a query keeps (entry cnt - 1, inside the window read above).
    # Only queries with more than K candidates have cnt <= n_g; the others are overwritten.
    at = (o_w[None, :] == cnt[:, None] - 1) & m_w[None, :]
    rk_g = tl.max(tl.where(at, r_w[None, :], -1), axis=1)
    return cnt, tl.maximum(rk_e, rk_g)


@triton.jit
def _mid_terms(b_z, t, t1, F64: tl.constexpr = False):
    """Per row of t [BM]: (#{z >= t1}, #{t < z < t1}, sum (z - t) over the latter) over the
    scores b_z [BM, N] or [1, N]; absent entries hold -inf, which never counts. F64 sums
    in float64, for a sum that is later taken from a larger one."""
    m_sat = b_z >= t1[:, None]
    m_mid = (b_z > t[:, None]) & (b_z < t1[:, None])
    if F64:
        d = tl.where(m_mid, b_z.to(tl.float64) - t[:, None].to(tl.float64), 0.0)
    else:
        d = tl.where(m_mid, b_z - t[:, None], 0.0)
    return (tl.sum(m_sat.to(tl.int32), axis=1), tl.sum(m_mid.to(tl.int32), axis=1),
            tl.sum(d, axis=1))


@triton.jit
def _range_terms(z_ptr, sp_ptr, row, r_lo, r_hi, P, t, t1, BM: tl.constexpr,
                 CHX: tl.constexpr):
    """Middle-set terms of base members (position <= P) in sorted ranks [r_lo, r_hi)."""
    sat = tl.zeros([BM], tl.int32)
    mid = tl.zeros([BM], tl.int32)
    dsum = tl.zeros([BM], tl.float32)
    for r0 in range(r_lo, r_hi, CHX):
        o = r0 + tl.arange(0, CHX)
        m = o < r_hi
        b_z = tl.load(z_ptr + row + o, mask=m, other=float("-inf"))
        b_p = tl.load(sp_ptr + row + o, mask=m, other=0)
        b_z = tl.where(b_p <= P, b_z, float("-inf"))
        s_, n_, d_ = _mid_terms(b_z[None, :], t, t1)
        sat += s_
        mid += n_
        dsum += d_
    return sat, mid, dsum


@triton.jit
def _list_terms(g_ptr, u_ptr, row, n_g, t, t1, BM: tl.constexpr, CHX: tl.constexpr):
    """Middle-set terms of the first n_g entries of a gathered list."""
    sat = tl.zeros([BM], tl.int32)
    mid = tl.zeros([BM], tl.int32)
    dsum = tl.zeros([BM], tl.float32)
    for r0 in range(0, n_g, CHX):
        o = r0 + tl.arange(0, CHX)
        m = o < n_g
        pos = tl.load(g_ptr + o, mask=m, other=0)
        b_z = tl.load(u_ptr + row + pos, mask=m, other=float("-inf"))
        s_, n_, d_ = _mid_terms(b_z[None, :], t, t1)
        sat += s_
        mid += n_
        dsum += d_
    return sat, mid, dsum


@triton.jit
def sparsek_block_causal_fwd_kernel(
    z_ptr, sp_ptr, rank_ptr, u_ptr, g_ptr, bf_ptr, bi_ptr, tau_ptr, rk_ptr, cnt_ptr, flag_ptr,
    S, NBND, K, W, MAXIT, GROUPS,
    BM: tl.constexpr, BQ: tl.constexpr, NS: tl.constexpr, CHX: tl.constexpr,
    GATED: tl.constexpr,
):
    """Causal per-query selection of BQ queries of one block: tau, rk and cnt [BH, S].

    Query i's candidates are the base ``[0, P]`` (P = i0 - W) plus the extras
    ``(P, i - W]``. tau_i lies between the thresholds of boundaries b and b + 1. Inside that
    bracket most scores contribute a constant or a linear term, summed once per query;
    only the few whose clip term bends inside it are kept, in NS register slots, so the
    Newton steps read no memory. A block with more bending scores than slots takes the
    generic path, which visits them from memory on every step. GATED: only rows whose
    flag is set are done; the scan of ``triton_select_scan`` wrote the others.
    """
    i_bh, i_grp = _row_block(GROUPS)
    if GATED:
        # A row's few programs take its query groups in turn: most rows are not flagged,
        # and a program per group only to read the flag cost 0.3 ms on gpt4-4k's rows.
        if tl.load(flag_ptr + i_bh) != 0:
            n_sub = tl.cdiv(S, BM) * (BM // BQ)
            for i_sub in range(i_grp, n_sub, GROUPS):
                _block_causal(z_ptr, sp_ptr, rank_ptr, u_ptr, g_ptr, bf_ptr, bi_ptr, tau_ptr,
                              rk_ptr, cnt_ptr, i_bh, i_sub, S, NBND, K, W, MAXIT, BM, BQ, NS,
                              CHX)
    else:
        _block_causal(z_ptr, sp_ptr, rank_ptr, u_ptr, g_ptr, bf_ptr, bi_ptr, tau_ptr, rk_ptr,
                      cnt_ptr, i_bh, i_grp, S, NBND, K, W, MAXIT, BM, BQ, NS, CHX)


@triton.jit
def _block_causal(z_ptr, sp_ptr, rank_ptr, u_ptr, g_ptr, bf_ptr, bi_ptr, tau_ptr, rk_ptr,
                  cnt_ptr, i_bh, i_sub, S, NBND, K, W, MAXIT, BM: tl.constexpr,
                  BQ: tl.constexpr, NS: tl.constexpr, CHX: tl.constexpr):
    NSUB: tl.constexpr = BM // BQ
    i_blk = i_sub // NSUB
    o_q = (i_sub % NSUB) * BQ + tl.arange(0, BQ)  # query index in the block
    row = i_bh.to(tl.int64) * S
    i0 = i_blk * BM
    q_pos = i0 + o_q
    m_q = q_pos < S
    P = i0 - W
    n_base = tl.maximum(P + 1, 0)
    n_g = tl.minimum(n_base, K)
    n_c = tl.minimum(tl.maximum(q_pos - W + 1, 0), S)
    p_g = g_ptr + (i_bh.to(tl.int64) * NBND + i_blk) * K
    o_e = tl.arange(0, BM)
    e_pos = P + 1 + o_e
    m_eok = (e_pos >= 0) & (e_pos < S)
    r_e = tl.load(rank_ptr + row + e_pos, mask=m_eok, other=S + 1)
    u_e = tl.load(u_ptr + row + e_pos, mask=m_eok, other=float("-inf"))
    big = m_q & (n_c > K)
    # Query q (index in block) has the extras with index < q.
    m_e = big[:, None] & m_eok[None, :] & (o_e[None, :] < o_q[:, None])  # [BQ, BM]
    cnt, rk = _cut_from_extras(p_g, rank_ptr, row, n_g, K, m_e, r_e, BM)
    z_cut = tl.load(z_ptr + row + rk, mask=big, other=0.0)
    tau = tl.where(big, z_cut, float("-inf"))
    if tl.max(big.to(tl.int32), axis=0) > 0:
        tau = _block_causal_tau(z_ptr, sp_ptr, u_ptr, p_g, bf_ptr, bi_ptr, row, i_bh, i_blk,
                                NBND, P, n_base, n_g, K, MAXIT, big, z_cut, u_e, m_e, o_q,
                                BQ, BM, NS, CHX)
    _store_selection(tau_ptr, rk_ptr, cnt_ptr, row, q_pos, m_q, big, tau, rk, cnt, n_g, S)


@triton.jit
def _store_selection(tau_ptr, rk_ptr, cnt_ptr, row, q_pos, m_q, big, tau, rk, cnt, n_g, S):
    """Write the queries' (tau, rk, cnt). A query that is not ``big`` (at most K
    candidates) keeps every list entry and every extra: cnt n_g, a cut every rank passes."""
    cnt = tl.where(big, cnt, n_g)
    rk = tl.where(big, rk, S)
    tl.store(tau_ptr + row + q_pos, tau, mask=m_q)
    tl.store(rk_ptr + row + q_pos, rk, mask=m_q)
    tl.store(cnt_ptr + row + q_pos, cnt, mask=m_q)


@triton.jit
def _block_causal_tau(z_ptr, sp_ptr, u_ptr, p_g, bf_ptr, bi_ptr, row, i_bh, i_blk, NBND, P,
                      n_base, n_g, K, MAXIT, big, z_cut, u_e, m_e, o_q,
                      BQ: tl.constexpr, BM: tl.constexpr, NS: tl.constexpr,
                      CHX: tl.constexpr):
    """tau of the ``big`` queries: the slot path when the block fits it, else generic."""
    p_f = bf_ptr + (i_bh.to(tl.int64) * NBND + i_blk) * 2
    p_i = bi_ptr + (i_bh.to(tl.int64) * NBND + i_blk) * 4
    small = n_base <= K
    lo_b = tl.load(p_f)
    hi_b = tl.load(p_f + 2)
    c1_r = tl.load(p_i + 2)
    c2_r = tl.load(p_i + 3)
    c1_u = tl.load(p_i + 4 + 2)
    c2_u = tl.load(p_i + 4 + 3)
    lo_b = tl.where(small, 0.0, lo_b)
    ends = tl.minimum(c2_r, c1_u)
    # Extras that bend inside the bracket; the rest are constant or linear there.
    bend = (u_e > lo_b) & (u_e < hi_b + 1.0) & ((u_e <= hi_b) | (u_e >= lo_b + 1.0))
    fits = (small == 0) & (tl.sum(bend.to(tl.int32), axis=0) <= NS)
    if fits:
        tau = _causal_tau_slots(z_ptr, sp_ptr, row, P, p_f, p_i, lo_b, hi_b, c1_r, c1_u,
                                c2_u, ends, K, MAXIT, big, z_cut, u_e, m_e, bend, o_q,
                                BQ, BM, NS, CHX)
    else:
        tau = _block_causal_threshold(z_ptr, sp_ptr, u_ptr, p_g, p_f, p_i, row, P, n_g,
                                      small, lo_b, hi_b, c1_r, c2_r, c1_u, c2_u, K, MAXIT,
                                      big, z_cut, tl.where(m_e, u_e[None, :], float("-inf")),
                                      BQ, CHX)
    return tau


@triton.jit
def _causal_tau_slots(z_ptr, sp_ptr, row, P, p_f, p_i, lo_b, hi_b, c1_r, c1_u, c2_u, ends,
                      K, MAXIT, big, z_cut, u_e, m_e, bend, o_q,
                      BQ: tl.constexpr, BM: tl.constexpr, NS: tl.constexpr,
                      CHX: tl.constexpr):
    """Newton per query on f(t) = A + D - L (t - lo_b) + clip terms of the bending scores.

    For t in [lo_b, hi_b] a score y contributes 1 if y >= hi_b + 1, (y - t) if
    hi_b < y < lo_b + 1, 0 if y <= lo_b, and bends otherwise. The base's counts at lo_b
    (from its boundary) less its bending members give the base's part of A, L and D; each
    query adds its own extras' constant and linear parts. The base's bending members are
    two short rank ranges of the sort, ``[c2_u, ends)`` and ``[c1_u, c1_r)``; the extras'
    are few and live in NS register slots.
    """
    lo1 = lo_b + 1.0
    # The base's bending members' terms at lo_b, the same for every query: one row.
    tr = tl.zeros([1], tl.float32) + lo_b
    xs1, xm1, xd1 = _range_terms(z_ptr, sp_ptr, row, c2_u, ends, P, tr, tr + 1.0, 1, CHX)
    xs2, xm2, xd2 = _range_terms(z_ptr, sp_ptr, row, c1_u, c1_r, P, tr, tr + 1.0, 1, CHX)
    x_sat = tl.max(xs1 + xs2, axis=0)
    x_mid = tl.max(xm1 + xm2, axis=0)
    x_d = tl.max(xd1 + xd2, axis=0)
    # Each query's extras: constant and linear ones summed, bending ones into slots.
    sat_e = m_e & (u_e[None, :] >= hi_b + 1.0)
    lin_e = m_e & (u_e[None, :] > hi_b) & (u_e[None, :] < lo1)
    a_q = tl.load(p_i) - x_sat + tl.sum(sat_e.to(tl.int32), axis=1)
    l_q = tl.load(p_i + 1) - x_mid + tl.sum(lin_e.to(tl.int32), axis=1)
    d_q = tl.load(p_f + 1) - x_d + tl.sum(tl.where(lin_e, u_e[None, :] - lo_b, 0.0), axis=1)
    slot = tl.cumsum(bend.to(tl.int32), axis=0) - 1  # [BM]
    hot = bend[:, None] & (slot[:, None] == tl.arange(0, NS)[None, :])  # [BM, NS]
    s_u = tl.max(tl.where(hot, u_e[:, None], float("-inf")), axis=0)
    s_e = tl.min(tl.where(hot, tl.arange(0, BM)[:, None], BM), axis=0)
    ys = tl.where(big[:, None] & (s_e[None, :] < o_q[:, None]), s_u[None, :],
                  float("-inf"))  # [BQ, NS]
    lo_q = tl.maximum(z_cut - 1.0, lo_b)
    lo, hi = _outward(lo_q, tl.minimum(z_cut, hi_b))
    # The first point is lo_b when it is every query's lower bracket end (its K-th best
    # z_cut at most lo_b + 1, as on random scores), where the base's bending members'
    # terms are the ones just summed: that step reads no memory. Else hi, as the steps
    # go on from either end of [z_cut - 1, z_cut], where f is flat at K nowhere but at
    # the lower end, which is then the largest root.
    first = tl.min(tl.where(big, lo_q == lo_b, 1), axis=0) != 0
    t = tl.where(first, lo_b, hi)
    prev_s = tl.zeros([BQ], tl.int32) - 1
    prev_n = prev_s
    newton = prev_s > 0
    active = big
    it = MAXIT * 0
    while tl.max(active.to(tl.int32), axis=0) > 0:
        t1 = t + 1.0
        if first:
            s_r = tl.zeros([BQ], tl.int32) + x_sat
            n_r = tl.zeros([BQ], tl.int32) + x_mid
            d_r = tl.zeros([BQ], tl.float32) + x_d
        else:
            s_1, n_1, d_1 = _range_terms(z_ptr, sp_ptr, row, c2_u, ends, P, t, t1, BQ, CHX)
            s_2, n_2, d_2 = _range_terms(z_ptr, sp_ptr, row, c1_u, c1_r, P, t, t1, BQ, CHX)
            s_r, n_r, d_r = s_1 + s_2, n_1 + n_2, d_1 + d_2
        s_y, n_y, d_y = _mid_terms(ys, t, t1)
        s_all = a_q + s_r + s_y
        n_all = l_q + n_r + n_y
        f = (s_all.to(tl.float64) + d_q.to(tl.float64)
             - l_q.to(tl.float64) * (t - lo_b).to(tl.float64)
             + (d_r + d_y).to(tl.float64))
        t_next, lo, hi, newton, done = _newton_advance(t, f, s_all, n_all, prev_s, prev_n,
                                                       newton, lo, hi, it, K, MAXIT)
        prev_s, prev_n = s_all, n_all
        active = active & (done == 0)
        t = tl.where(active, t_next, t)
        it += 1
        first = it == 0  # only the first step starts from the terms summed at lo_b
    return tl.where(big, t, float("-inf"))


@triton.jit
def _block_causal_threshold(z_ptr, sp_ptr, u_ptr, p_g, p_f, p_i, row, P, n_g, small, t_ref,
                            t_up, c1_ref, c2_ref, c1_up, c2_up, K, MAXIT, big, z_cut, u_qe,
                            BQ: tl.constexpr, CHX: tl.constexpr):
    """Generic per-query Newton for the ``big`` queries; reads the bending base members
    (or, for a base of at most K members, the whole list) from memory on every step."""
    tr = tl.zeros([1], tl.float32) + t_ref  # the same for every query: one row
    x_sat, x_mid, x_d = _range_terms(z_ptr, sp_ptr, row, c2_up, tl.minimum(c2_ref, c1_up), P,
                                     tr, tr + 1.0, 1, CHX)
    s2_, m2_, d2_ = _range_terms(z_ptr, sp_ptr, row, c1_up, c1_ref, P, tr, tr + 1.0, 1, CHX)
    sat0 = tl.load(p_i) - tl.max(x_sat + s2_, axis=0)
    lin = tl.load(p_i + 1) - tl.max(x_mid + m2_, axis=0)
    lin_d = tl.load(p_f + 1) - tl.max(x_d + d2_, axis=0)
    sat0 = tl.where(small, 0, sat0)
    lin = tl.where(small, 0, lin)
    lin_d = tl.where(small, 0.0, lin_d)
    lo = z_cut - 1.0
    hi = z_cut
    lo = tl.where(small, lo, tl.maximum(lo, t_ref))
    hi = tl.minimum(hi, t_up)
    lo, hi = _outward(lo, hi)
    t = hi
    prev_s = tl.zeros([BQ], tl.int32) - 1
    prev_n = prev_s
    newton = prev_s > 0
    active = big
    it = MAXIT * 0
    while tl.max(active.to(tl.int32), axis=0) > 0:
        t1 = t + 1.0
        if small:
            s_x, n_x, d_x = _list_terms(p_g, u_ptr, row, n_g, t, t1, BQ, CHX)
        else:
            s_a, n_a, d_a = _range_terms(z_ptr, sp_ptr, row, c2_up, tl.minimum(c2_ref, c1_up),
                                         P, t, t1, BQ, CHX)
            s_b, n_b, d_b = _range_terms(z_ptr, sp_ptr, row, c1_up, c1_ref, P, t, t1, BQ, CHX)
            s_x, n_x, d_x = s_a + s_b, n_a + n_b, d_a + d_b
        s_e, n_e, d_e = _mid_terms(u_qe, t, t1)
        s_all = sat0 + s_x + s_e
        n_all = lin + n_x + n_e
        f = (s_all.to(tl.float64) + lin_d.to(tl.float64)
             - lin.to(tl.float64) * (t - t_ref).to(tl.float64) + (d_x + d_e).to(tl.float64))
        t_next, lo, hi, newton, done = _newton_advance(t, f, s_all, n_all, prev_s, prev_n,
                                                       newton, lo, hi, it, K, MAXIT)
        prev_s, prev_n = s_all, n_all
        active = active & (done == 0)
        t = tl.where(active, t_next, t)
        it += 1
    return tl.where(big, t, float("-inf"))
