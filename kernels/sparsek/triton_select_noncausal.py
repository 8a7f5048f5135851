"""Non-causal selection kernel of the Triton SparseK forward.

Query i's candidates are every position outside its window ``(i - W, i + W)``: the whole
sort minus at most 2W - 1 scores. So its threshold equation is the all-positions sum
(counts of the sort above t, and float64 prefix sums) minus the window's terms, solved per
query by the safeguarded Newton iteration of ``triton_select``; the cut (rank of the K-th
best candidate) is a fixed point on the window's ranks. A count is a binary search inside
one value bucket of the sort (``triton_fwd.score_buckets``), a few ranks instead of the
row. A first kernel sorts, sums and buckets each short row in one program.
"""

from __future__ import annotations

import triton
import triton.language as tl

from sparsek.triton_select import (
    _above,
    _mid_terms,
    _newton_advance,
    _outward,
    _row_block,
    _store_selection,
)


@triton.jit
def sparsek_noncausal_prep_kernel(
    u_ptr, z_ptr, sp_ptr, rank_ptr, zpre_ptr, first_ptr, inv_ptr, fullest_ptr, S,
    P2: tl.constexpr, NBIN: tl.constexpr,
):
    """Everything the block kernel reads about one row of scores u [S] (S <= P2), in one
    program: the stable descending sort (z, positions sp, inverse rank), the float64
    prefix sums of z (S + 1 entries from 0), and the value buckets of
    ``triton_fwd.score_buckets``, one a score (first [S + 2], inv_h, fullest).

    The sort is one bitonic sort of 64-bit keys: the score's bits, mapped so that
    integer order is float order, above the complement of its position, so that equal
    scores keep the smaller position first (the contract's tie order)."""
    row = tl.program_id(0).to(tl.int64)
    o = tl.arange(0, P2)
    m = o < S
    u = tl.load(u_ptr + row * S + o, mask=m, other=0.0) + 0.0  # -0.0 ties with 0.0
    bits = u.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    key = (ordered.to(tl.int64) << 32) | (0xFFFFFFFF - o.to(tl.int64))
    key = tl.sort(tl.where(m, key, -(1 << 63)), descending=True)
    pos = (0xFFFFFFFF - (key & 0xFFFFFFFF)).to(tl.int32)
    high = (key >> 32).to(tl.int32)
    z = tl.where(high >= 0, high, high ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)
    tl.store(z_ptr + row * S + o, z, mask=m)
    tl.store(sp_ptr + row * S + o, pos, mask=m)
    tl.store(rank_ptr + row * S + pos, o, mask=m)
    p_pre = zpre_ptr + row * (S + 1)
    tl.store(p_pre + 1 + o, tl.cumsum(tl.where(m, z, 0.0).to(tl.float64), axis=0), mask=m)
    tl.store(p_pre, 0.0)
    zmax = tl.max(tl.where(m, z, float("-inf")), axis=0)
    span = zmax - tl.min(tl.where(m, z, float("inf")), axis=0)
    inv_h = S / tl.where(span > 0, span, 1.0)
    # One value in the whole row (or a span too small to divide by): one bucket.
    inv_h = tl.where((span > 0) & (inv_h < float("inf")), inv_h, 0.0)
    b = tl.where(m, _bucket(z, zmax, inv_h, S), S + 1)
    o_b = tl.arange(0, NBIN)
    hist = tl.histogram(b, NBIN)
    tl.store(first_ptr + row * (S + 2) + o_b, tl.cumsum(hist, axis=0) - hist,
             mask=o_b < S + 2)
    tl.store(inv_ptr + row, inv_h)
    tl.store(fullest_ptr + row, tl.max(tl.where(o_b <= S, hist, 0), axis=0))


@triton.jit
def sparsek_block_noncausal_fwd_kernel(
    z_ptr, sp_ptr, rank_ptr, zpre_ptr, first_ptr, inv_ptr, fullest_ptr, u_ptr, g_ptr,
    tau_ptr, rk_ptr, cnt_ptr, S, NBLK, K, W, MAXIT,
    BM: tl.constexpr, NW: tl.constexpr, NR: tl.constexpr, CH: tl.constexpr,
):
    """Non-causal selection of one block: list g [BH, NBLK, K], tau, rk and cnt [BH, S].

    Query i's candidates are every position outside its window ``(i - W, i + W)``, so its
    threshold equation is the all-positions sum (from the sort's prefix sums) minus at
    most 2W - 1 window terms. The block's base is everything outside the union of its
    windows, ``[i0 - W + 1, i0 + BM + W - 2]``. One program a block, which also writes
    the block's list. The counts of the sort read the value buckets of
    ``triton_fwd.score_buckets`` (first, inv_h, and the fullest bucket's size).
    """
    i_bh, i_blk = _row_block(NBLK)
    row = i_bh.to(tl.int64) * S
    i0 = i_blk * BM
    q_pos = i0 + tl.arange(0, BM)
    m_q = q_pos < S
    has_w = W > 0
    r_lo = tl.where(has_w, tl.maximum(i0 - W + 1, 0), 0)
    r_hi = tl.where(has_w, tl.minimum(i0 + BM + W - 2, S - 1), -1)
    n_g = tl.minimum(S - (r_hi - r_lo + 1), K)
    p_g = g_ptr + (i_bh.to(tl.int64) * NBLK + i_blk) * K
    _walk_outside(z_ptr, sp_ptr, p_g, row, r_lo, r_hi, n_g, S, CH)
    w_lo = tl.maximum(q_pos - W + 1, 0)
    w_hi = tl.minimum(q_pos + W - 1, S - 1)
    n_c = S - tl.maximum(w_hi - w_lo + 1, 0)
    big = m_q & (n_c > K)
    # Window members of each query, as a [BM, NW] tile of positions.
    w_pos = q_pos[:, None] - W + 1 + tl.arange(0, NW)[None, :]
    m_w = big[:, None] & (w_pos >= w_lo[:, None]) & (w_pos <= w_hi[:, None])
    r_w = tl.load(rank_ptr + row + w_pos, mask=m_w, other=S + 1)
    # The cut: smallest r with r + 1 - #{window ranks <= r} = K.
    rk = tl.zeros([BM], tl.int32) + K - 1
    go = tl.max(big.to(tl.int32), axis=0) > 0
    while go:
        r_new = K - 1 + tl.sum((r_w <= rk[:, None]).to(tl.int32), axis=1)
        go = tl.max((r_new != rk).to(tl.int32), axis=0) > 0
        rk = r_new
    rk = tl.minimum(rk, S - 1)
    o_r = r_lo + tl.arange(0, NR)
    r_in = tl.load(rank_ptr + row + o_r, mask=o_r <= r_hi, other=S + 1)
    cnt = rk + 1 - tl.sum((r_in[None, :] <= rk[:, None]).to(tl.int32), axis=1)
    z_cut = tl.load(z_ptr + row + rk, mask=big, other=0.0)
    u_w = tl.load(u_ptr + row + w_pos, mask=m_w, other=float("-inf"))
    row1 = i_bh.to(tl.int64) * (S + 1)
    p_first = first_ptr + i_bh.to(tl.int64) * (S + 2)
    zmax = tl.load(z_ptr + row)
    inv_h = tl.load(inv_ptr + i_bh)
    # A search inside one bucket takes as many halvings as its fullest bucket's size has
    # bits.
    fullest = tl.load(fullest_ptr + i_bh)
    steps = fullest * 0
    while (1 << steps) <= fullest:
        steps += 1
    tau = _noncausal_threshold(z_ptr, zpre_ptr, row, row1, p_first, zmax, inv_h, S, steps,
                               K, MAXIT, big, z_cut, u_w, BM)
    _store_selection(tau_ptr, rk_ptr, cnt_ptr, row, q_pos, m_q, big, tau, rk, cnt, n_g, S)


@triton.jit
def _walk_outside(z_ptr, sp_ptr, p_g, row, r_lo, r_hi, n_g, S, CH: tl.constexpr):
    """Write the first n_g positions of the sort that lie outside [r_lo, r_hi]."""
    cnt = n_g * 0
    r0 = n_g * 0
    while cnt < n_g:
        o = r0 + tl.arange(0, CH)
        m_in = o < S
        b_p = tl.load(sp_ptr + row + o, mask=m_in, other=0)
        m_base = m_in & ((b_p < r_lo) | (b_p > r_hi))
        idx = cnt + tl.cumsum(m_base.to(tl.int32), axis=0) - 1
        tl.store(p_g + idx, b_p, mask=m_base & (idx < n_g))
        cnt += tl.sum(m_base.to(tl.int32), axis=0)
        r0 += CH


@triton.jit
def _bucket(t, zmax, inv_h, NB):
    """The bucket of value t (see ``triton_fwd.score_buckets``), clamped to [0, NB]."""
    b = tl.floor((zmax - t) * inv_h)
    return tl.minimum(tl.maximum(b, 0.0), NB * 1.0).to(tl.int32)


@triton.jit
def _count_above(z_ptr, row, t, p_first, zmax, inv_h, NB, steps, STRICT: tl.constexpr,
                 BM: tl.constexpr):
    """#{z > t} (STRICT) or #{z >= t} for each t [BM]: the sort's entries in buckets
    before t's are all above t, those after it all below, so the count lies between
    t's bucket's first rank and the next bucket's; a binary search finds it there."""
    b = _bucket(t, zmax, inv_h, NB)
    lo = tl.load(p_first + b)
    hi = tl.load(p_first + b + 1)
    for _ in range(steps):
        m_act = lo < hi
        mid = (lo + hi) // 2
        b_z = tl.load(z_ptr + row + mid, mask=m_act, other=0.0)
        right = m_act & _above(b_z, t, STRICT)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(m_act & (right == 0), mid, hi)
    return lo


@triton.jit
def _noncausal_threshold(z_ptr, zpre_ptr, row, row1, p_first, zmax, inv_h, NB, steps, K,
                         MAXIT, big, z_cut, u_w, BM: tl.constexpr):
    """Per-query Newton on f_all(t) - f_window(t) for the queries marked ``big``; the
    prefix sums of the sort start at row1 (S + 1 entries per row)."""
    lo, hi = _outward(z_cut - 1.0, z_cut)
    t = hi
    prev_s = tl.zeros([BM], tl.int32) - 1
    prev_n = prev_s
    newton = prev_s > 0
    active = big
    it = MAXIT * 0
    while tl.max(active.to(tl.int32), axis=0) > 0:
        t1 = t + 1.0
        c_gt = _count_above(z_ptr, row, t, p_first, zmax, inv_h, NB, steps, True, BM)
        c_ge1 = _count_above(z_ptr, row, t1, p_first, zmax, inv_h, NB, steps, False, BM)
        zsum = (tl.load(zpre_ptr + row1 + c_gt, mask=active, other=0.0)
                - tl.load(zpre_ptr + row1 + c_ge1, mask=active, other=0.0))
        # The window's terms are taken from the whole row's: summed in float32 they would
        # lose the difference where the window holds most of the row (W near S / 2).
        s_w, n_w, d_w = _mid_terms(u_w, t, t1, True)
        s_all = c_ge1 - s_w
        n_all = c_gt - c_ge1 - n_w
        f = (s_all.to(tl.float64) + zsum - (c_gt - c_ge1).to(tl.float64) * t.to(tl.float64)
             - d_w.to(tl.float64))
        t_next, lo, hi, newton, done = _newton_advance(t, f, s_all, n_all, prev_s, prev_n,
                                                       newton, lo, hi, it, K, MAXIT)
        prev_s, prev_n = s_all, n_all
        active = active & (done == 0)
        t = tl.where(active, t_next, t)
        it += 1
    return tl.where(big, t, float("-inf"))
