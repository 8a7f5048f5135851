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
  A new score updates the piece in O(1); only crossing an end needs a pass (a count and a
  minimum) over the alive set, which stays in registers.

The top K are always alive (their scores are at least z_K > tau), so the cut (the global
rank of the K-th best candidate) moves by one masked maximum when a new score enters them,
and each query's list count follows from how many of the block's extras are among them.

The alive set is held in ``CAP`` register slots. A row whose alive set ever needs more
(scores packed within a width of 1, such as long runs of ties) raises its flag, and the
per-query kernels of ``triton_select`` redo that row; on random scores the alive set of
K = 256 at S = 4096 holds about 560 scores.
"""

from __future__ import annotations

import triton
import triton.language as tl

from sparsek.triton_select import _newton_advance, _outward


@triton.jit
def _alive_threshold(a_z, valid, lo, hi, K, MAXIT):
    """Root of ``sum clip(z - t, 0, 1) = K`` over the valid alive scores, in [lo, hi]."""
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
        d_mid = tl.sum(tl.where(m_mid, a_z - t, 0.0), axis=0)
        f = n_sat.to(tl.float64) + d_mid.to(tl.float64)
        t_next, lo, hi, newton, done = _newton_advance(t, f, n_sat, n_mid, prev_s, prev_n,
                                                       newton, lo, hi, it, K, MAXIT)
        prev_s, prev_n = n_sat, n_mid
        t = tl.where(done, t, t_next)
        it += 1
        go = done == 0
    return t


@triton.jit
def _lowest_above(a_z, z):
    """(#{slots holding z}, the lowest score above z or +inf), for z above tau: unused
    slots (-inf) and scores at or below tau never count."""
    n_at = tl.sum((a_z == z).to(tl.int32), axis=0)
    nxt = tl.min(tl.where(a_z > z, a_z, float("inf")), axis=0)
    return n_at, nxt


@triton.jit
def _piece_at(a_z, valid, t):
    """The linear piece of f at t: (A, M, D, lowest alive, lowest saturated)."""
    m_sat = valid & (a_z - 1.0 >= t)
    m_mid = valid & (a_z > t) & (m_sat == 0)
    n_sat = tl.sum(m_sat.to(tl.int32), axis=0)
    n_mid = tl.sum(m_mid.to(tl.int32), axis=0)
    d_mid = tl.sum(tl.where(m_mid, a_z.to(tl.float64) - t.to(tl.float64), 0.0), axis=0)
    b_lo = tl.min(tl.where(valid & (a_z > t), a_z, float("inf")), axis=0)
    s_lo = tl.min(tl.where(m_sat, a_z, float("inf")), axis=0)
    return n_sat, n_mid, d_mid, b_lo, s_lo


@triton.jit
def _walk_pieces(a_z, tau, t_ref, n_sat, n_mid, d_mid, b_lo, s_lo, K, MAXIT):
    """The largest root of f at or above tau, walking the pieces from the current one.

    Returns (root, A, M, D, lowest alive, lowest saturated, ok); ``ok`` is false only if
    MAXIT ends were crossed, which random scores never come near.
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
            n_at, nxt = _lowest_above(a_z, b_lo)
            n_mid -= n_at
            d_mid -= n_at.to(tl.float64) * (b_lo.to(tl.float64) - t_ref.to(tl.float64))
            t = b_lo
            b_lo = nxt
        if enter:
            n_at, nxt = _lowest_above(a_z, s_lo)
            n_sat -= n_at
            n_mid += n_at
            d_mid += n_at.to(tl.float64) * (s_lo.to(tl.float64) - t_ref.to(tl.float64))
            t = b_hi
            s_lo = nxt
        d_mid = tl.where(n_mid > 0, d_mid, 0.0)  # exactly 0, not a rounding residue
        it += 1
        go = (found == 0) & (it < MAXIT)
    return t, n_sat, n_mid, d_mid, b_lo, s_lo, it < MAXIT


@triton.jit
def _compact(z_ptr, row, a_z, a_r, tau, rk, CAP: tl.constexpr):
    """Pack the alive scores (above tau, or among the top K) into the first slots, in
    rank order; their scores come back from the sort. -> (a_z, a_r, slots in use)."""
    alive = (a_r >= 0) & ((a_z > tau) | (a_r <= rk))
    keys = tl.sort(tl.where(alive, a_r, 2147483647), 0)
    a_r = tl.where(keys < 2147483647, keys, -1)
    a_z = tl.load(z_ptr + row + a_r, mask=a_r >= 0, other=float("-inf"))
    return a_z, a_r, tl.sum(alive.to(tl.int32), axis=0)


@triton.jit
def sparsek_causal_scan_kernel(
    u_ptr, z_ptr, sp_ptr, rank_ptr, tau_ptr, rk_ptr, cnt_ptr, flag_ptr,
    S, K, W, MAXIT,
    BM: tl.constexpr, CAP: tl.constexpr, CH: tl.constexpr,
):
    """tau, rk and cnt [BH, S] of every query of one row; flag [BH] = 1 if the alive set
    overflowed its CAP slots (the row's outputs are then not to be used).

    Query i (block b = i // BM, base ``[0, P]`` with P = b * BM - W) selects the top K of
    ``[0, i - W]``: ``rk`` is the global rank of the K-th of them and ``cnt`` how many come
    from the block's list, i.e. K less the selected extras ``(P, i - W]``. A query with at
    most K candidates keeps them all: tau = -inf, rk = S, cnt = the list's length.

    Slots are filled in order; a score that falls to tau stays in its slot, where it no
    longer counts, until the slots run out and ``_compact`` packs the live ones.
    """
    i_bh = tl.program_id(0)
    row = i_bh.to(tl.int64) * S
    o = tl.arange(0, CAP)
    o_ch = tl.arange(0, CH)
    o_bm = tl.arange(0, BM)
    a_z = tl.zeros([CAP], tl.float32) + float("-inf")  # scores; -inf in unused slots
    a_r = tl.zeros([CAP], tl.int32) - 1  # global sort ranks; -1 in unused slots
    fzero = tl.sum(tl.zeros([CH], tl.float32), axis=0)
    izero = tl.sum(tl.zeros([CH], tl.int32), axis=0)
    n_used = izero
    tau = fzero + float("-inf")
    rk = izero + S
    sel = izero  # selected extras of the current block
    over = izero
    # The current piece of f (see the module's docstring).
    t_ref = fzero
    n_sat = izero
    n_mid = izero
    d_mid = fzero.to(tl.float64)
    b_lo = fzero
    s_lo = fzero
    n_w = tl.minimum(W, S)
    for q0 in range(0, n_w, CH):  # queries with no candidate at all
        q = q0 + o_ch
        m_q = q < n_w
        tl.store(tau_ptr + row + q, tl.zeros([CH], tl.float32) + float("-inf"), mask=m_q)
        tl.store(rk_ptr + row + q, tl.zeros([CH], tl.int32) + S, mask=m_q)
        tl.store(cnt_ptr + row + q, tl.zeros([CH], tl.int32), mask=m_q)
    n_pos = S - n_w
    for c0 in range(0, n_pos, CH):  # position p = c0 + k is the last candidate of i = p + W
        p_c = c0 + o_ch
        m_c = p_c < n_pos
        u_c = tl.load(u_ptr + row + p_c, mask=m_c, other=0.0)
        r_c = tl.load(rank_ptr + row + p_c, mask=m_c, other=0)
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
            u_p = tl.sum(tl.where(o_ch == k, u_c, 0.0), axis=0)
            r_p = tl.sum(tl.where(o_ch == k, r_c, 0), axis=0)
            i = p + W
            base_end = (i // BM) * BM - W  # P of the query's block
            sel = tl.where(i % BM == 0, 0, sel)
            n = p + 1
            if (n <= K + 1) | (u_p > tau):  # the new score is alive
                if n_used == CAP:
                    a_z, a_r, n_used = _compact(z_ptr, row, a_z, a_r, tau, rk, CAP)
                    over = over | (n_used == CAP).to(tl.int32)
                hit = o == n_used
                a_z = tl.where(hit, u_p, a_z)
                a_r = tl.where(hit, r_p, a_r)
                n_used = tl.minimum(n_used + 1, CAP)
                if n == K + 1:  # the first query with more than K candidates
                    valid = a_r >= 0
                    r_max = tl.max(a_r, axis=0)
                    rk = tl.max(tl.where(a_r < r_max, a_r, -1), axis=0)
                    # Its selected extras: positions (P, p] ranked within the top K.
                    x_pos = base_end + 1 + o_bm
                    m_x = (x_pos >= 0) & (x_pos <= p)
                    x_r = tl.load(rank_ptr + row + x_pos, mask=m_x, other=S)
                    sel = tl.sum((x_r <= rk).to(tl.int32), axis=0)
                    z_k = tl.max(tl.where(a_r == rk, a_z, float("-inf")), axis=0)
                    tau = _alive_threshold(a_z, valid, z_k - 1.0, z_k, K, MAXIT)
                    t_ref = tau
                    n_sat, n_mid, d_mid, b_lo, s_lo = _piece_at(a_z, valid, tau)
                elif n > K + 1:
                    if r_p < rk:  # it enters the top K and the K-th best leaves
                        p_out = tl.load(sp_ptr + row + rk)
                        sel += (p > base_end).to(tl.int32) - (p_out > base_end).to(tl.int32)
                        rk = tl.max(tl.where(a_r < rk, a_r, -1), axis=0)
                    sat = u_p - 1.0 >= tau
                    n_sat += sat.to(tl.int32)
                    n_mid += (sat == 0).to(tl.int32)
                    d_mid += tl.where(sat, 0.0, u_p.to(tl.float64) - t_ref.to(tl.float64))
                    s_lo = tl.where(sat, tl.minimum(s_lo, u_p), s_lo)
                    b_lo = tl.minimum(b_lo, u_p)
                    tau, n_sat, n_mid, d_mid, b_lo, s_lo, ok = _walk_pieces(
                        a_z, tau, t_ref, n_sat, n_mid, d_mid, b_lo, s_lo, K, MAXIT)
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
    tl.store(flag_ptr + i_bh, over)
