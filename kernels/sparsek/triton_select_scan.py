"""Causal selection by one sequential scan per (batch, kv head) row.

Query i's candidates are the prefix ``[0, i - W]``, so walking the positions in order adds
one candidate per query. Two facts make that walk cheap:

- tau never decreases along the row, so a score at or below the current tau contributes
  nothing now and never will again. Only the *alive* scores (``z > tau``) matter, and a
  new score that is not alive changes neither tau nor the cut.
- A new alive score raises ``f(t) = sum clip(z - t, 0, 1)`` by at most 1, so the new root
  lies just above the old one, most often on the same linear piece. The scan keeps that
  piece as scalars (``f(t) = A + D - M (t - t_ref)``: A saturated scores, M in the middle,
  D their sum above t_ref) with its two ends: the lowest alive score, which drops out when
  t reaches it, and the lowest saturated one, which enters the middle when t + 1 does.
  A new score updates the piece in O(1); only crossing an end needs the next score up.

The scores walked so far are a bitmap over their global sort ranks (``S / 32`` words in
registers). The sort orders scores descending, so "the next score above the lowest alive
one" is the previous set bit below that rank, one short reduction over the words, and its
value one load from the sort. The top K are always alive (their scores are at least
z_K > tau), so the cut (the global rank of the K-th best candidate) moves to the previous
set bit when a new score enters them, and each query's list count follows from how many of
the block's extras are among them.

The first threshold (at K + 1 candidates) is solved beforehand by a small kernel of its own,
over those scores held in registers. A row whose walk crosses more than MAXENDS piece ends
for one new score raises its flag, and the per-query kernels of ``triton_select`` redo that
row; random scores never come near.
"""

from __future__ import annotations

import triton
import triton.language as tl

from sparsek.triton_select import _newton_advance, _outward


@triton.jit
def _alive_threshold(a_z, valid, lo, hi, K, MAXIT):
    """Root of ``sum clip(z - t, 0, 1) = K`` over the valid scores, in [lo, hi]."""
    lo, hi = _outward(lo, hi)
    t = lo
    zero = (K * 0).to(tl.int32)
    prev_s, prev_n = zero - 1, zero - 1
    newton = zero != 0
    it = zero
    go = zero == 0
    while go:
        t1 = t + 1.0
        m_sat = valid & (a_z >= t1)
        m_mid = valid & (a_z > t) & (a_z < t1)
        n_sat = tl.sum(m_sat.to(tl.int32), axis=0)
        n_mid = tl.sum(m_mid.to(tl.int32), axis=0)
        # float64 terms, each exact: the sum does not depend on the reduction's order
        # (so not on the register layout, the warps or the vector's length).
        d_mid = tl.sum(tl.where(m_mid, a_z.to(tl.float64) - t.to(tl.float64), 0.0), axis=0)
        f = n_sat.to(tl.float64) + d_mid
        t_next, lo, hi, newton, done = _newton_advance(t, f, n_sat, n_mid, prev_s, prev_n,
                                                       newton, lo, hi, it, K, MAXIT)
        prev_s, prev_n = n_sat, n_mid
        t = tl.where(done, t, t_next)
        it += 1
        go = done == 0
    return t


@triton.jit
def _piece_at(a_z, a_r, valid, t):
    """The linear piece of f at t: (A, M, D, lowest alive score and its rank, lowest
    saturated score and its rank); a missing end is (+inf, -1)."""
    m_sat = valid & (a_z - 1.0 >= t)
    m_alive = valid & (a_z > t)
    m_mid = m_alive & (m_sat == 0)
    n_sat = tl.sum(m_sat.to(tl.int32), axis=0)
    n_mid = tl.sum(m_mid.to(tl.int32), axis=0)
    d_mid = tl.sum(tl.where(m_mid, a_z.to(tl.float64) - t.to(tl.float64), 0.0), axis=0)
    # Ranks order scores descending, so the lowest score of a set is its highest rank.
    b_lo = tl.min(tl.where(m_alive, a_z, float("inf")), axis=0)
    rb = tl.max(tl.where(m_alive, a_r, -1), axis=0)
    s_lo = tl.min(tl.where(m_sat, a_z, float("inf")), axis=0)
    rs = tl.max(tl.where(m_sat, a_r, -1), axis=0)
    return n_sat, n_mid, d_mid, b_lo, rb, s_lo, rs


@triton.jit
def _set_rank(bm, o_w, r):
    """The bitmap with rank r added: word r // 32, bit 31 - r % 32 (so that a word's
    highest rank is its lowest set bit)."""
    bit = tl.full([], 1, tl.uint32) << (31 - (r & 31)).to(tl.uint32)
    return bm | tl.where(o_w == (r >> 5), bit, tl.zeros_like(bm))


@triton.jit
def _prev_rank(bm, o_w, x):
    """The highest rank below x in the bitmap, or -1."""
    w = x >> 5
    b = (x & 31).to(tl.uint32)
    full = tl.full([], 0xFFFFFFFF, tl.uint32)
    part = tl.where(b == 0, tl.zeros_like(full), full << (32 - tl.maximum(b, 1)))
    mw = bm & tl.where(o_w < w, full, tl.where(o_w == w, part, tl.zeros_like(full)))
    low = mw & (~mw + 1)  # the lowest set bit, a power of two: exact as a float
    e = (low.to(tl.float32).to(tl.int32, bitcast=True) >> 23) - 127
    return tl.max(tl.where(mw != 0, o_w * 32 + 31 - e, -1), axis=0)


@triton.jit
def _tie_group(bm, o_w, z_ptr, row, r, z_r):
    """From rank r (in the bitmap, score z_r) down: how many ranks in the bitmap hold z_r
    (ties sit next to each other in the sort), and the next rank above them with its
    score (-1, +inf if none)."""
    n_at = (r * 0 + 1).to(tl.int32)
    nxt = _prev_rank(bm, o_w, r)
    z_n = tl.load(z_ptr + row + nxt, mask=nxt >= 0, other=float("inf"))
    while z_n == z_r:
        n_at += 1
        nxt = _prev_rank(bm, o_w, nxt)
        z_n = tl.load(z_ptr + row + nxt, mask=nxt >= 0, other=float("inf"))
    return n_at, nxt, z_n


@triton.jit
def _walk_pieces(bm, o_w, z_ptr, row, tau, t_ref, n_sat, n_mid, d_mid, b_lo, rb, s_lo, rs,
                 K, MAXENDS):
    """The largest root of f at or above tau, walking the pieces from the current one.

    Returns (root, A, M, D, lowest alive score and rank, lowest saturated score and rank,
    ok); ``ok`` is false only if MAXENDS ends were crossed.
    """
    t = tau  # the start of the current piece
    it = (K * 0).to(tl.int32)
    go = it == 0
    while go:
        b_hi = s_lo - 1.0
        excess = n_sat.to(tl.float64) + d_mid - K
        t_lin = t_ref.to(tl.float64) + excess / tl.maximum(n_mid, 1).to(tl.float64)
        # On a flat piece (no middle scores) f is the integer A: the root is the piece's
        # far end when A = K (the largest root), its start when A < K.
        t_flat = tl.where(excess > 0, float("inf"), tl.where(excess == 0, b_hi, t))
        t_root = tl.where(n_mid > 0, t_lin.to(tl.float32), t_flat)
        # A root at the lowest alive score drops it (z > t keeps a score alive); one at the
        # lowest saturated score's end keeps it saturated (z - 1 >= t). Every comparison of
        # a score with t + 1 is written ``z - 1 >= t``, so a score tied with one that
        # already entered the middle is classified the same way.
        found = (t_root < b_lo) & (t_root <= b_hi)
        drop = (found == 0) & (b_lo <= b_hi)  # the lowest alive score leaves the middle
        enter = (found == 0) & (b_lo > b_hi)  # the lowest saturated one enters it
        if found:
            t = tl.maximum(t_root, tau)
        if drop:
            n_at, rb, nxt = _tie_group(bm, o_w, z_ptr, row, rb, b_lo)
            n_mid -= n_at
            d_mid -= n_at.to(tl.float64) * (b_lo.to(tl.float64) - t_ref.to(tl.float64))
            t = b_lo
            b_lo = nxt
        if enter:
            n_at, rs, nxt = _tie_group(bm, o_w, z_ptr, row, rs, s_lo)
            n_sat -= n_at
            n_mid += n_at
            d_mid += n_at.to(tl.float64) * (s_lo.to(tl.float64) - t_ref.to(tl.float64))
            t = b_hi
            s_lo = nxt
        d_mid = tl.where(n_mid > 0, d_mid, 0.0)  # exactly 0, not a rounding residue
        it += 1
        go = (found == 0) & (it < MAXENDS)
    return t, n_sat, n_mid, d_mid, b_lo, rb, s_lo, rs, it < MAXENDS


@triton.jit
def _store_state(st_i_ptr, st_f_ptr, st_d_ptr, p_rec, rk, sel, n_sat, n_mid, rb, rs, p_k,
                 tau, b_lo, s_lo, d_mid):
    """Write one (row, chunk) record of the scan's state: st_i [.., 8] (rk, sel, A, M,
    rank of the lowest alive, rank of the lowest saturated, position of the K-th best),
    st_f [.., 4] (tau, lowest alive score, lowest saturated score), st_d (D)."""
    p_i = st_i_ptr + p_rec * 8
    tl.store(p_i, rk)
    tl.store(p_i + 1, sel)
    tl.store(p_i + 2, n_sat)
    tl.store(p_i + 3, n_mid)
    tl.store(p_i + 4, rb)
    tl.store(p_i + 5, rs)
    tl.store(p_i + 6, p_k)
    p_f = st_f_ptr + p_rec * 4
    tl.store(p_f, tau)
    tl.store(p_f + 1, b_lo)
    tl.store(p_f + 2, s_lo)
    tl.store(st_d_ptr + p_rec, d_mid)


@triton.jit
def _load_state(st_i_ptr, st_f_ptr, st_d_ptr, p_rec):
    """The record ``_store_state`` wrote -> (rk, sel, A, M, rb, rs, p_k, tau, b_lo, s_lo,
    D)."""
    p_i = st_i_ptr + p_rec * 8
    p_f = st_f_ptr + p_rec * 4
    return (tl.load(p_i), tl.load(p_i + 1), tl.load(p_i + 2), tl.load(p_i + 3),
            tl.load(p_i + 4), tl.load(p_i + 5), tl.load(p_i + 6), tl.load(p_f),
            tl.load(p_f + 1), tl.load(p_f + 2), tl.load(st_d_ptr + p_rec))


@triton.jit
def sparsek_scan_start_kernel(
    u_ptr, sp_ptr, rank_ptr, st_i_ptr, st_f_ptr, st_d_ptr, S, K, W, MAXIT, C,
    BM: tl.constexpr, KP: tl.constexpr,
):
    """The scan's state at its first query with more than K candidates (i = K + W, whose
    candidates are positions 0..K), one row a program: the first threshold, solved over
    those K + 1 scores in registers, and the piece of f there.

    Writes chunk 0's record (see ``_store_state``) of st_i [BH, C, 8], st_f [BH, C, 4] and
    st_d [BH, C]. KP: a power of two above K. Kept apart from the scan so that the scan's
    registers hold only its walk.
    """
    i_bh = tl.program_id(0)
    row = i_bh.to(tl.int64) * S
    o_k = tl.arange(0, KP)
    valid = (o_k <= K) & (o_k < S)
    a_z = tl.load(u_ptr + row + o_k, mask=valid, other=float("-inf"))
    a_r = tl.load(rank_ptr + row + o_k, mask=valid, other=-1)
    r_max = tl.max(a_r, axis=0)
    rk = tl.max(tl.where(a_r < r_max, a_r, -1), axis=0)
    # Its selected extras: positions (P, K] ranked within the top K.
    base_end = ((K + W) // BM) * BM - W
    x_pos = base_end + 1 + tl.arange(0, BM)
    m_x = (x_pos >= 0) & (x_pos <= K) & (x_pos < S)
    x_r = tl.load(rank_ptr + row + x_pos, mask=m_x, other=S)
    sel = tl.sum((x_r <= rk).to(tl.int32), axis=0)
    z_k = tl.max(tl.where(a_r == rk, a_z, float("-inf")), axis=0)
    tau = _alive_threshold(a_z, valid, z_k - 1.0, z_k, K, MAXIT)
    n_sat, n_mid, d_mid, b_lo, rb, s_lo, rs = _piece_at(a_z, a_r, valid, tau)
    p_k = tl.load(sp_ptr + row + rk, mask=rk >= 0, other=0)
    _store_state(st_i_ptr, st_f_ptr, st_d_ptr, i_bh.to(tl.int64) * C, rk, sel, n_sat, n_mid,
                 rb, rs, p_k, tau, b_lo, s_lo, d_mid)


@triton.jit
def sparsek_scan_resume_kernel(
    z_ptr, sp_ptr, rank_ptr, g_ptr, bf_ptr, bi_ptr, st_i_ptr, st_f_ptr, st_d_ptr, bmw_ptr,
    S, NBND, K, W, STRIDE,
    BM: tl.constexpr, NW: tl.constexpr, NWC: tl.constexpr,
):
    """The scan's state where its chunk c >= 1 starts, one (row, chunk) a program.

    Chunk c starts at block b0 = c * STRIDE, whose base ``[0, P]`` (P = b0 * BM - W) has
    more than K members; its first query's candidates are that base. The boundary kernel
    solved its threshold tau and counted the sort's scores above it (c1) and wrote its
    list, whose last entry is the K-th best. The alive scores are the base members among
    the sort's first c1 ranks: their bitmap goes to bmw [BH, C, NW] and the piece of f at
    tau to chunk c's records (as ``sparsek_scan_start_kernel`` writes chunk 0's), with
    sel = 0 (no extras at a block's first query).
    """
    i_bh = tl.program_id(0)
    c = tl.program_id(1) + 1
    C = tl.num_programs(1) + 1
    row = i_bh.to(tl.int64) * S
    b0 = c * STRIDE
    P = b0 * BM - W
    p_bnd = i_bh.to(tl.int64) * NBND + b0
    tau = tl.load(bf_ptr + p_bnd * 2)
    c1 = tl.load(bi_ptr + p_bnd * 4 + 2)
    p_k = tl.load(g_ptr + p_bnd * K + K - 1)
    rk = tl.load(rank_ptr + row + p_k)
    o_w = tl.arange(0, NWC)
    o_b = tl.arange(0, 32)
    zero = (c1 * 0).to(tl.int32)
    n_sat = zero
    n_mid = zero
    rb = zero - 1
    rs = zero - 1
    d_mid = zero.to(tl.float64)
    p_rec = i_bh.to(tl.int64) * C + c
    for w0 in range(0, NW, NWC):
        r = (w0 + o_w)[:, None] * 32 + o_b[None, :]
        m_r = (r < c1) & (r < S)
        b_z = tl.load(z_ptr + row + r, mask=m_r, other=float("-inf"))
        b_p = tl.load(sp_ptr + row + r, mask=m_r, other=S)
        alive = m_r & (b_p <= P)
        sat = alive & (b_z - 1.0 >= tau)
        mid = alive & (sat == 0)
        n_sat += tl.sum(tl.sum(sat.to(tl.int32), axis=1), axis=0)
        n_mid += tl.sum(tl.sum(mid.to(tl.int32), axis=1), axis=0)
        d = tl.where(mid, b_z.to(tl.float64) - tau.to(tl.float64), 0.0)
        d_mid += tl.sum(tl.sum(d, axis=1), axis=0)
        rb = tl.maximum(rb, tl.max(tl.max(tl.where(alive, r, -1), axis=1), axis=0))
        rs = tl.maximum(rs, tl.max(tl.max(tl.where(sat, r, -1), axis=1), axis=0))
        bits = tl.full([NWC, 32], 1, tl.uint32) << (31 - o_b[None, :]).to(tl.uint32)
        words = tl.sum(tl.where(alive, bits, tl.zeros_like(bits)), axis=1)  # distinct bits
        tl.store(bmw_ptr + p_rec * NW + w0 + o_w, words.to(tl.int32, bitcast=True))
    b_lo = tl.load(z_ptr + row + rb, mask=rb >= 0, other=float("inf"))
    s_lo = tl.load(z_ptr + row + rs, mask=rs >= 0, other=float("inf"))
    _store_state(st_i_ptr, st_f_ptr, st_d_ptr, p_rec, rk, zero, n_sat, n_mid, rb, rs, p_k, tau,
                 b_lo, s_lo, d_mid)


@triton.jit
def sparsek_causal_scan_kernel(
    u_ptr, z_ptr, sp_ptr, rank_ptr, tau_ptr, rk_ptr, cnt_ptr, flag_ptr,
    st_i_ptr, st_f_ptr, st_d_ptr, bmw_ptr, S, K, W, MAXENDS, STRIDE,
    BM: tl.constexpr, NW: tl.constexpr, CH: tl.constexpr,
):
    """tau, rk and cnt [BH, S] of every query of one row; flag [BH] (zero before) set to 1 if a
    walk crossed MAXENDS piece ends (the row's outputs are then not to be used).

    Query i (block b = i // BM, base ``[0, P]`` with P = b * BM - W) selects the top K of
    ``[0, i - W]``: ``rk`` is the global rank of the K-th of them and ``cnt`` how many come
    from the block's list, i.e. K less the selected extras ``(P, i - W]``. A query with at
    most K candidates keeps them all: tau = -inf, rk = S, cnt = the list's length.

    A row is walked in C chunks of STRIDE blocks each (grid [BH, C]), so that more
    programs share an SM. Chunk 0 starts at the row's start, and takes the state at its
    first query with more than K candidates from ``sparsek_scan_start_kernel``; chunk c >= 1
    starts from the state ``sparsek_scan_resume_kernel`` wrote for its first query. NW: a
    power of two of at least S / 32 (the bitmap's words).
    """
    i_bh = tl.program_id(0)
    ch = tl.program_id(1)
    C = tl.num_programs(1)
    p_rec = i_bh.to(tl.int64) * C + ch
    row = i_bh.to(tl.int64) * S
    o_w = tl.arange(0, NW)
    o_ch = tl.arange(0, CH)
    bm = tl.zeros([NW], tl.uint32)  # the global ranks of the alive scores walked so far
    fzero = tl.sum(tl.zeros([CH], tl.float32), axis=0)
    izero = tl.sum(tl.zeros([CH], tl.int32), axis=0)
    tau = fzero + float("-inf")
    rk = izero + S
    sel = izero  # selected extras of the current block
    over = izero
    # The current piece of f (see the module's docstring), its ends' scores and ranks.
    t_ref = fzero
    n_sat = izero
    n_mid = izero
    d_mid = fzero.to(tl.float64)
    b_lo = fzero
    s_lo = fzero
    rb = izero
    rs = izero
    p_k = izero  # the position of the K-th best (global rank rk)
    n_w = tl.minimum(W, S)
    n_pos = S - n_w
    p_begin = izero
    p_end = tl.where(ch == C - 1, n_pos, tl.minimum((ch + 1) * STRIDE * BM - W, n_pos))
    if ch > 0:  # resume at the chunk's first query, P0 + W
        p_begin = ch * STRIDE * BM - W
        rk, sel, n_sat, n_mid, rb, rs, p_k, tau, b_lo, s_lo, d_mid = _load_state(
            st_i_ptr, st_f_ptr, st_d_ptr, p_rec)
        t_ref = tau
        bm = tl.load(bmw_ptr + p_rec * NW + o_w).to(tl.uint32, bitcast=True)
        q = p_begin + W  # its candidates are the base: all K selected from the list
        tl.store(tau_ptr + row + q, tau)
        tl.store(rk_ptr + row + q, rk)
        tl.store(cnt_ptr + row + q, K)
        p_begin += 1
        n_w = izero
    for q0 in range(0, n_w, CH):  # queries with no candidate at all
        q = q0 + o_ch
        m_q = q < n_w
        tl.store(tau_ptr + row + q, tl.zeros([CH], tl.float32) + float("-inf"), mask=m_q)
        tl.store(rk_ptr + row + q, tl.zeros([CH], tl.int32) + S, mask=m_q)
        tl.store(cnt_ptr + row + q, tl.zeros([CH], tl.int32), mask=m_q)
    for c0 in range(p_begin, p_end, CH):  # position p = c0 + k: last candidate of i = p + W
        p_c = c0 + o_ch
        m_c = p_c < p_end
        u_c = tl.load(u_ptr + row + p_c, mask=m_c, other=0.0)
        # Events: a position whose score may be alive (tau only rises, so a score at or
        # below the current tau never is again) or whose query starts a block (sel starts
        # over there). Any other position changes nothing, so its query repeats the state
        # of the event before it: each event writes its state to the rest of the chunk,
        # and the walk jumps from event to event.
        ev = m_c & ((p_c <= K) | (u_c > tau) | ((p_c + W) % BM == 0))
        o_tau = tl.zeros([CH], tl.float32) + tau
        o_rk = tl.zeros([CH], tl.int32) + rk
        o_cnt = tl.zeros([CH], tl.int32) + (K - sel)
        k = tl.min(tl.where(ev, o_ch, CH), axis=0)
        while k < CH:
            p = c0 + k
            u_p = tl.load(u_ptr + row + p)
            r_p = tl.load(rank_ptr + row + p)
            i = p + W
            base_end = (i // BM) * BM - W  # P of the query's block
            sel = tl.where(i % BM == 0, 0, sel)
            n = p + 1
            if (n <= K + 1) | (u_p > tau):  # the new score is alive
                bm = _set_rank(bm, o_w, r_p)
                if n == K + 1:  # the first query with more than K candidates
                    rk, sel, n_sat, n_mid, rb, rs, p_k, tau, b_lo, s_lo, d_mid = _load_state(
                        st_i_ptr, st_f_ptr, st_d_ptr, p_rec)
                    t_ref = tau
                elif n > K + 1:
                    if r_p < rk:  # it enters the top K and the K-th best leaves
                        sel += (p > base_end).to(tl.int32) - (p_k > base_end).to(tl.int32)
                        rk = _prev_rank(bm, o_w, rk)
                        p_k = tl.load(sp_ptr + row + rk)  # not needed before the next move
                    sat = u_p - 1.0 >= tau
                    n_sat += sat.to(tl.int32)
                    n_mid += (sat == 0).to(tl.int32)
                    d_mid += tl.where(sat, 0.0, u_p.to(tl.float64) - t_ref.to(tl.float64))
                    s_lo = tl.where(sat, tl.minimum(s_lo, u_p), s_lo)
                    rs = tl.where(sat, tl.maximum(rs, r_p), rs)
                    b_lo = tl.minimum(b_lo, u_p)
                    rb = tl.maximum(rb, r_p)
                    tau, n_sat, n_mid, d_mid, b_lo, rb, s_lo, rs, ok = _walk_pieces(
                        bm, o_w, z_ptr, row, tau, t_ref, n_sat, n_mid, d_mid, b_lo, rb,
                        s_lo, rs, K, MAXENDS)
                    over = over | (ok == 0).to(tl.int32)
            big = n > K
            n_g = tl.minimum(tl.maximum(base_end + 1, 0), K)
            after = o_ch >= k
            o_tau = tl.where(after, tl.where(big, tau, float("-inf")), o_tau)
            o_rk = tl.where(after, tl.where(big, rk, S), o_rk)
            o_cnt = tl.where(after, tl.where(big, K - sel, n_g), o_cnt)
            k = tl.min(tl.where(ev & (o_ch > k), o_ch, CH), axis=0)
        q = p_c + W
        tl.store(tau_ptr + row + q, o_tau, mask=m_c)
        tl.store(rk_ptr + row + q, o_rk, mask=m_c)
        tl.store(cnt_ptr + row + q, o_cnt, mask=m_c)
    tl.store(flag_ptr + i_bh, over, mask=over != 0)  # chunks only raise it (zeroed before)
