"""Attention kernel of the Triton SparseK forward: one gathered pass and one dense pass.

A program owns a block of BM consecutive queries of HG query heads that share one kv head
(rows ``[HG * BM, D]``). Its keys are the block's list ``G_b`` (gathered rows, best first)
and the block's dense range (contiguous rows): the two are disjoint, and together they hold
every window and selected pair of every query in the block. Each pair gets its gate from
the per-query selection (tau, rk, cnt) and enters an online softmax as ``g * exp(s)``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b in float32; UPCAST feeds float32 operands (the interpreter's bf16 dot is wrong)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), out_dtype=tl.float32,
                      input_precision="ieee")
    return tl.dot(a, b, out_dtype=tl.float32, input_precision=PREC)


@triton.jit
def _fold(x, g, m_i, l_i, acc, b_v, qk_scale, PREC: tl.constexpr, UPCAST: tl.constexpr,
          GATED: tl.constexpr):
    """Fold a tile of raw logits x [M, BN] (-inf where a pair is not attended) and its
    gates g (GATED; else every gate is 1) into the running state (m_i, l_i, acc), kept in
    log2 units: qk_scale (> 0, so the row maximum commutes with it) enters the exponent
    as one fused multiply-add."""
    m_new = tl.maximum(m_i, tl.max(x, axis=1) * qk_scale)
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(tl.fma(x, qk_scale, -m_use[:, None]))
    if GATED:
        p = p * g
    # Normalize by the weights as rounded for the value product, so a row's weights sum
    # to exactly what multiplies v (one kept pair then returns its v exactly).
    p = p.to(b_v.dtype)
    l_i = l_i * alpha + tl.sum(p.to(tl.float32), axis=1)
    acc = acc * alpha[:, None] + _dot(p, b_v, PREC, UPCAST)
    return m_new, l_i, acc


@triton.jit
def _rows(base, pos, o_d, mask, D: tl.constexpr):
    """The rows pos [BN] of a [*, D] matrix at base; zero where mask (if any) is False."""
    ptrs = base + (pos * D)[:, None] + o_d[None, :]
    # A statement if: on a constexpr (None) Triton compiles only the arm taken.
    if mask is None:  # noqa: SIM108
        rows = tl.load(ptrs)
    else:
        rows = tl.load(ptrs, mask=mask[:, None], other=0.0)
    return rows


@triton.jit
def _tile(b_q, k_base, v_base, pos, o_d, mask, D: tl.constexpr, PREC: tl.constexpr,
          UPCAST: tl.constexpr):
    """(raw logits [M, BN], values [BN, D]) of the keys at rows pos."""
    b_k = _rows(k_base, pos, o_d, mask, D)
    b_v = _rows(v_base, pos, o_d, mask, D)
    return _dot(b_q, tl.trans(b_k), PREC, UPCAST), b_v


@triton.jit
def program_block(S, Hq, Hkv, ROW0: tl.constexpr, BM: tl.constexpr, HG: tl.constexpr):
    """This program's block and rows (grid as in triton_fwd.attention_launch: blocks, rows
    from ROW0, head groups): (i_blk, i_bh, i_b, i0, i1, head0), the query block, its
    (batch, kv head) row and batch, the block's first and last query, and the first of
    the HG query heads it serves. Scalars only, so the Gluon kernels call it too."""
    i_blk = tl.program_id(0)
    i_bh = ROW0 + tl.program_id(1)
    i_hg = tl.program_id(2)
    i_b = i_bh // Hkv
    i_kv = i_bh % Hkv
    i0 = i_blk * BM
    i1 = tl.minimum(i0 + BM - 1, S - 1)
    head0 = i_kv * (Hq // Hkv) + i_hg * HG
    return i_blk, i_bh, i_b, i0, i1, head0


@triton.jit
def sparsek_attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, u_ptr, rank_ptr, g_ptr, tau_ptr, rk_ptr, cnt_ptr, o_ptr, lse_ptr,
    S, Hq, Hkv, NBG, K, W, qk_scale,
    ROW0: tl.constexpr, CAUSAL: tl.constexpr, BM: tl.constexpr, HG: tl.constexpr, BN: tl.constexpr,
    D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """o [B, Hq, S, D] and lse [B, Hq, S] (natural log) for one block of queries.

    g [B * Hkv, NBG, K] holds each block's list; tau, rk, cnt [B * Hkv, S] the per-query
    selection; qk_scale = scale * log2(e). The grid is (blocks, rows, head groups), rows
    from ROW0 (see triton_fwd.attention_launch; a constant, so the usual launch from row 0
    compiles to the code without it). PREC is the dot precision: "ieee" for float32
    inputs (checked to 1e-5, which tf32 would not meet), else unused; UPCAST is set only
    under the CPU interpreter, whose bf16 dot is wrong.
    """
    M: tl.constexpr = HG * BM
    i_blk, i_bh, i_b, i0, i1, head0 = program_block(S, Hq, Hkv, ROW0, BM, HG)
    o_m = tl.arange(0, M)
    o_d = tl.arange(0, D)
    q_pos = i0 + o_m % BM  # [M]
    m_q = q_pos < S
    # Scalar 64-bit bases, 32-bit tile offsets: S * D * HG stays far below 2**31 here.
    q_base = (i_b * Hq + head0).to(tl.int64) * S * D
    q_off = ((o_m // BM) * S + q_pos) * D  # [M]
    b_q = tl.load(q_ptr + q_base + q_off[:, None] + o_d[None, :], mask=m_q[:, None], other=0.0)
    sel_row = i_bh.to(tl.int64) * S
    tau = tl.load(tau_ptr + sel_row + q_pos, mask=m_q, other=0.0)
    rk = tl.load(rk_ptr + sel_row + q_pos, mask=m_q, other=-1)
    cnt = tl.load(cnt_ptr + sel_row + q_pos, mask=m_q, other=0)
    kv_row = i_bh.to(tl.int64) * S
    k_base = k_ptr + kv_row * D
    v_base = v_ptr + kv_row * D
    m_i = tl.zeros([M], tl.float32) + float("-inf")
    l_i = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, D], tl.float32)

    p_g = g_ptr + (i_bh.to(tl.int64) * NBG + i_blk) * K
    m_i, l_i, acc = _list_pass(b_q, k_base, v_base, u_ptr + kv_row, p_g, tau, cnt, m_q, K,
                               qk_scale, m_i, l_i, acc, BN, D, PREC, UPCAST)
    m_i, l_i, acc = _dense_pass(b_q, k_base, v_base, u_ptr + kv_row, rank_ptr + kv_row, q_pos,
                                tau, rk, i0, i1, S, W, qk_scale, m_i, l_i, acc, CAUSAL, BM, BN,
                                D, PREC, UPCAST)

    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    m_use = tl.where(m_i == float("-inf"), 0.0, m_i)
    lse = tl.where(has, (m_use + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    tl.store(o_ptr + q_base + q_off[:, None] + o_d[None, :], o.to(o_ptr.dtype.element_ty),
             mask=m_q[:, None])
    lse_base = (i_b * Hq + head0).to(tl.int64) * S
    tl.store(lse_ptr + lse_base + (o_m // BM) * S + q_pos, lse, mask=m_q)


@triton.jit
def _list_pass(b_q, k_base, v_base, u_row, p_g, tau, cnt, m_q, K, qk_scale, m_i, l_i, acc,
               BN: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Fold the block's list (positions at p_g, best first) into the running state.

    List entry n is selected by the queries with n < cnt. Tiles that every query selects
    whole need no mask: their gate is min(u - tau, 1), positive since each selected score
    is above its query's threshold."""
    o_d = tl.arange(0, D)
    n_sel = tl.max(cnt, axis=0)
    n_all = (tl.min(tl.where(m_q, cnt, K), axis=0) // BN) * BN
    for n0 in range(0, n_all, BN):
        pos = tl.load(p_g + n0 + tl.arange(0, BN))
        x, b_v = _tile(b_q, k_base, v_base, pos, o_d, None, D, PREC, UPCAST)
        b_u = tl.load(u_row + pos)
        # The lower clip is redundant here, and kept: without it the compiled loop ran
        # long-64k's attention in 8.62 ms against 8.30 (H100, same run).
        g = tl.minimum(tl.maximum(b_u[None, :] - tau[:, None], 0.0), 1.0)
        m_i, l_i, acc = _fold(x, g, m_i, l_i, acc, b_v, qk_scale, PREC, UPCAST, True)
    for n0 in range(n_all, n_sel, BN):
        o_n = n0 + tl.arange(0, BN)
        m_n = o_n < n_sel
        pos = tl.load(p_g + o_n, mask=m_n, other=0)
        x, b_v = _tile(b_q, k_base, v_base, pos, o_d, m_n, D, PREC, UPCAST)
        b_u = tl.load(u_row + pos, mask=m_n, other=0.0)
        g = tl.minimum(tl.maximum(b_u[None, :] - tau[:, None], 0.0), 1.0)
        g = tl.where(o_n[None, :] < cnt[:, None], g, 0.0)
        x = tl.where(g > 0, x, float("-inf"))
        m_i, l_i, acc = _fold(x, g, m_i, l_i, acc, b_v, qk_scale, PREC, UPCAST, True)
    return m_i, l_i, acc


@triton.jit
def dense_range(i0, i1, S, W, CAUSAL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """(j_lo, j_hi, j_start, t1, t2): the dense range [j_lo, j_hi] of the block's queries
    i0..i1, the first of its BN-key tiles aligned to i0 (j_start <= j_lo), and the bounds
    of its three runs (see _dense_pass). Scalars only, so the Gluon kernel calls it too."""
    j_lo = tl.maximum(i0 - W + 1, 0)
    if CAUSAL:
        j_hi = i1
        e_hi = i0
    else:
        j_hi = tl.where(W > 0, tl.minimum(i0 + BM + W - 2, S - 1), -1)
        e_hi = tl.minimum(i0 + W - 1, j_hi)
    j_start = i0 - ((i0 - j_lo + BN - 1) // BN) * BN
    a_lo = tl.maximum(tl.minimum(tl.maximum(i1 - W + 1, j_lo), j_hi + 1), j_start)
    t1 = j_start + ((a_lo - j_start + BN - 1) // BN) * BN
    t2 = t1 + (tl.maximum(e_hi + 1 - t1, 0) // BN) * BN
    return j_lo, j_hi, j_start, t1, t2


@triton.jit
def _dense_pass(b_q, k_base, v_base, u_row, rank_row, q_pos, tau, rk, i0, i1, S, W, qk_scale,
                m_i, l_i, acc, CAUSAL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Fold the dense range [j_lo, j_hi] of the block's queries i0..i1 into the running
    state: window pairs, and the extras above the cut. Its tiles are aligned to i0 and
    fall into three runs, cheapest in the middle:

    - [j_start, t1): keys that are candidates of some query: gates from the selection;
    - [t1, t2): keys in every query's window (j in (i1 - W, i0], non-causal also up to
      i0 + W - 1) and in range: gate 1, no mask;
    - [t2, j_hi]: causal: the diagonal, window keys only, masked by position;
      non-causal: the candidates beyond the window, as in the first run.
    """
    o_d = tl.arange(0, D)
    j_lo, j_hi, j_start, t1, t2 = dense_range(i0, i1, S, W, CAUSAL, BM, BN)
    for j0 in range(j_start, t1, BN):
        o_j = j0 + tl.arange(0, BN)
        m_j = (o_j >= j_lo) & (o_j <= j_hi)
        m_i, l_i, acc = _dense_gated(b_q, k_base, v_base, u_row, rank_row, o_j, m_j, o_d,
                                     q_pos, tau, rk, W, qk_scale, m_i, l_i, acc, CAUSAL, D,
                                     PREC, UPCAST)
    for j0 in range(t1, t2, BN):
        o_j = j0 + tl.arange(0, BN)
        x, b_v = _tile(b_q, k_base, v_base, o_j, o_d, None, D, PREC, UPCAST)
        m_i, l_i, acc = _fold(x, 0.0, m_i, l_i, acc, b_v, qk_scale, PREC, UPCAST, False)
    for j0 in range(t2, j_hi + 1, BN):
        o_j = j0 + tl.arange(0, BN)
        m_j = o_j <= j_hi
        if CAUSAL:
            x, b_v = _tile(b_q, k_base, v_base, o_j, o_d, m_j, D, PREC, UPCAST)
            keep = (q_pos[:, None] >= o_j[None, :]) & m_j[None, :]
            x = tl.where(keep, x, float("-inf"))
            m_i, l_i, acc = _fold(x, 0.0, m_i, l_i, acc, b_v, qk_scale, PREC, UPCAST, False)
        else:
            m_i, l_i, acc = _dense_gated(b_q, k_base, v_base, u_row, rank_row, o_j, m_j,
                                         o_d, q_pos, tau, rk, W, qk_scale, m_i, l_i, acc,
                                         CAUSAL, D, PREC, UPCAST)
    return m_i, l_i, acc


@triton.jit
def window_pairs(q_pos, o_j, W, CAUSAL: tl.constexpr):
    """(win, cand) [M, BN] for queries q_pos and keys o_j: the window pairs, and the
    pairs where the key is a candidate of the query. The Gluon kernels call it too."""
    dist = q_pos[:, None] - o_j[None, :]
    if CAUSAL:
        win = (dist >= 0) & (dist < W)
        cand = dist >= W
    else:
        win = (dist < W) & (dist > -W)
        cand = (dist >= W) | (dist <= -W)
    return win, cand


@triton.jit
def dense_gate(q_pos, o_j, m_j, b_u, b_r, tau, rk, W, CAUSAL: tl.constexpr):
    """Gates [M, BN] of dense-range keys o_j (in range where m_j; scores b_u, sort ranks
    b_r) for queries q_pos with selections (tau, rk): window pairs 1, candidates ranked
    within the query's cut clip(u - tau, 0, 1), the rest 0. The Gluon kernel calls it too."""
    win, cand = window_pairs(q_pos, o_j, W, CAUSAL)
    pick = cand & (b_r[None, :] <= rk[:, None]) & m_j[None, :]
    soft = tl.minimum(tl.maximum(b_u[None, :] - tau[:, None], 0.0), 1.0)
    return tl.where(win & m_j[None, :], 1.0, tl.where(pick, soft, 0.0))


@triton.jit
def _dense_gated(b_q, k_base, v_base, u_row, rank_row, o_j, m_j, o_d, q_pos, tau, rk, W,
                 qk_scale, m_i, l_i, acc, CAUSAL: tl.constexpr, D: tl.constexpr,
                 PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One tile of the dense range where some keys are candidates: window pairs get gate 1,
    candidates ranked within a query's cut get clip(u - tau, 0, 1), the rest nothing."""
    x, b_v = _tile(b_q, k_base, v_base, o_j, o_d, m_j, D, PREC, UPCAST)
    b_u = tl.load(u_row + o_j, mask=m_j, other=0.0)
    b_r = tl.load(rank_row + o_j, mask=m_j, other=2**31 - 1)
    g = dense_gate(q_pos, o_j, m_j, b_u, b_r, tau, rk, W, CAUSAL)
    x = tl.where(g > 0, x, float("-inf"))
    return _fold(x, g, m_i, l_i, acc, b_v, qk_scale, PREC, UPCAST, True)


# Tuned per shape on a GPU: keys per step and the launch (warps, pipeline stages, and a
# cap on registers per thread). The query tile (BM, HG) is not tuned here: the
# selection's block lists are built for it. Left to itself the compiler gives 8 warps
# over 200 registers each, so one program fills an SM; capped at 128, two programs fit
# its 64K registers and hide each other's gathers (a few spilled registers cost less:
# on the H100, gpt4-4k's attention 9.26 -> 8.28 ms at 32 keys and 3 stages). Seed's
# 16-key tile at 96 registers fits five programs instead of four (0.443 -> 0.382 ms), and
# gpt4-4k's 64-query blocks run best at 4 warps capped at 128 (7.21 ms; 64 queries x 4
# warps uncapped spill and take the forward from 11.34 to 15.26 ms).
ATTN_CONFIGS = [
    triton.Config({"BN": bn}, num_warps=warps, num_stages=stages, maxnreg=cap)
    for bn, warps, stages, cap in ((32, 4, 2, None), (64, 4, 2, None), (16, 4, 2, None),
                                   (32, 8, 2, 128), (32, 8, 3, 128), (16, 4, 2, 96),
                                   (32, 4, 2, 128))
]
sparsek_attn_fwd_tuned = triton.autotune(
    configs=ATTN_CONFIGS, key=["S", "Hq", "Hkv", "K", "W", "CAUSAL", "BM", "HG", "D"],
)(sparsek_attn_fwd_kernel)

