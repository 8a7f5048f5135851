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
def _softmax_update(s, g, m_i, l_i, acc, b_v, PREC: tl.constexpr, UPCAST: tl.constexpr,
                    MASKED: tl.constexpr):
    """Fold a tile of scores s [M, BN] (log2 units) with gates g into the running state.
    MASKED: some gates are 0, and their scores must not raise the running maximum."""
    if MASKED:
        s = tl.where(g > 0, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    # Normalize by the weights as rounded for the value product, so a row's weights sum
    # to exactly what multiplies v (one kept pair then returns its v exactly).
    p = (tl.exp2(s - m_use[:, None]) * g).to(b_v.dtype)
    l_i = l_i * alpha + tl.sum(p.to(tl.float32), axis=1)
    acc = acc * alpha[:, None] + _dot(p, b_v, PREC, UPCAST)
    return m_new, l_i, acc


@triton.jit
def sparsek_attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, u_ptr, rank_ptr, g_ptr, tau_ptr, rk_ptr, cnt_ptr, o_ptr, lse_ptr,
    S, Hq, Hkv, NBG, K, W, qk_scale,
    CAUSAL: tl.constexpr, BM: tl.constexpr, HG: tl.constexpr, BN: tl.constexpr,
    D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """o [B, Hq, S, D] and lse [B, Hq, S] (natural log) for one block of queries.

    g [B * Hkv, NBG, K] holds each block's list; tau, rk, cnt [B * Hkv, S] the per-query
    selection; qk_scale = scale * log2(e). PREC is the dot precision: "ieee" for float32
    inputs (checked to 1e-5, which tf32 would not meet), else unused; UPCAST is set only
    under the CPU interpreter, whose bf16 dot is wrong.
    """
    M: tl.constexpr = HG * BM
    i_blk = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_hg = tl.program_id(2)
    i_b = i_bh // Hkv
    i_kv = i_bh % Hkv
    i0 = i_blk * BM
    o_m = tl.arange(0, M)
    o_d = tl.arange(0, D)
    q_pos = i0 + o_m % BM  # [M]
    m_q = q_pos < S
    head0 = i_kv * (Hq // Hkv) + i_hg * HG
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
    # Gathered pass: list entry n is selected by the queries with n < cnt. Tiles that every
    # query selects whole need no mask: their gate is min(u - tau, 1), positive since each
    # selected score is above its query's threshold.
    p_g = g_ptr + (i_bh.to(tl.int64) * NBG + i_blk) * K
    n_sel = tl.max(cnt, axis=0)
    n_all = (tl.min(tl.where(m_q, cnt, K), axis=0) // BN) * BN
    for n0 in range(0, n_all, BN):
        o_n = n0 + tl.arange(0, BN)
        pos = tl.load(p_g + o_n)
        kv_off = pos * D
        b_k = tl.load(k_base + kv_off[:, None] + o_d[None, :])
        b_v = tl.load(v_base + kv_off[:, None] + o_d[None, :])
        b_u = tl.load(u_ptr + kv_row + pos)
        s = _dot(b_q, tl.trans(b_k), PREC, UPCAST) * qk_scale
        g = tl.minimum(tl.maximum(b_u[None, :] - tau[:, None], 0.0), 1.0)
        m_i, l_i, acc = _softmax_update(s, g, m_i, l_i, acc, b_v, PREC, UPCAST, False)
    for n0 in range(n_all, n_sel, BN):
        o_n = n0 + tl.arange(0, BN)
        m_n = o_n < n_sel
        pos = tl.load(p_g + o_n, mask=m_n, other=0)
        kv_off = pos * D
        b_k = tl.load(k_base + kv_off[:, None] + o_d[None, :], mask=m_n[:, None], other=0.0)
        b_v = tl.load(v_base + kv_off[:, None] + o_d[None, :], mask=m_n[:, None], other=0.0)
        b_u = tl.load(u_ptr + kv_row + pos, mask=m_n, other=0.0)
        s = _dot(b_q, tl.trans(b_k), PREC, UPCAST) * qk_scale
        g = tl.minimum(tl.maximum(b_u[None, :] - tau[:, None], 0.0), 1.0)
        g = tl.where(o_n[None, :] < cnt[:, None], g, 0.0)
        m_i, l_i, acc = _softmax_update(s, g, m_i, l_i, acc, b_v, PREC, UPCAST, True)
    # Dense pass over the block's range: window pairs, and extras above the cut.
    j_lo = tl.maximum(i0 - W + 1, 0)
    if CAUSAL:
        j_hi = tl.minimum(i0 + BM - 1, S - 1)
    else:
        j_hi = tl.where(W > 0, tl.minimum(i0 + BM + W - 2, S - 1), -1)
    for j0 in range(j_lo, j_hi + 1, BN):
        o_j = j0 + tl.arange(0, BN)
        m_j = o_j <= j_hi
        kv_off = o_j * D
        b_k = tl.load(k_base + kv_off[:, None] + o_d[None, :], mask=m_j[:, None], other=0.0)
        b_v = tl.load(v_base + kv_off[:, None] + o_d[None, :], mask=m_j[:, None], other=0.0)
        b_u = tl.load(u_ptr + kv_row + o_j, mask=m_j, other=0.0)
        b_r = tl.load(rank_ptr + kv_row + o_j, mask=m_j, other=S)
        s = _dot(b_q, tl.trans(b_k), PREC, UPCAST) * qk_scale
        dist = q_pos[:, None] - o_j[None, :]
        if CAUSAL:
            win = (dist >= 0) & (dist < W)
            cand = dist >= W
        else:
            win = (dist < W) & (dist > -W)
            cand = (dist >= W) | (dist <= -W)
        pick = cand & (b_r[None, :] <= rk[:, None]) & m_j[None, :]
        soft = tl.minimum(tl.maximum(b_u[None, :] - tau[:, None], 0.0), 1.0)
        g = tl.where(win & m_j[None, :], 1.0, tl.where(pick, soft, 0.0))
        m_i, l_i, acc = _softmax_update(s, g, m_i, l_i, acc, b_v, PREC, UPCAST, True)
    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    m_use = tl.where(m_i == float("-inf"), 0.0, m_i)
    lse = tl.where(has, (m_use + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    tl.store(o_ptr + q_base + q_off[:, None] + o_d[None, :], o.to(o_ptr.dtype.element_ty),
             mask=m_q[:, None])
    lse_base = (i_b * Hq + head0).to(tl.int64) * S
    tl.store(lse_ptr + lse_base + (o_m // BM) * S + q_pos, lse, mask=m_q)


# Tuned per shape on a GPU: keys per step and the launch (warps, pipeline stages). The
# query tile (BM, HG) is not tuned here: the selection's block lists are built for it.
ATTN_CONFIGS = [
    triton.Config({"BN": bn}, num_warps=warps, num_stages=stages)
    for bn, warps, stages in ((32, 4, 2), (64, 4, 2), (64, 8, 2), (64, 8, 3), (32, 8, 3),
                              (128, 8, 2))
]
sparsek_attn_fwd_tuned = triton.autotune(
    configs=ATTN_CONFIGS, key=["S", "Hq", "Hkv", "K", "W", "CAUSAL", "BM", "HG", "D"],
)(sparsek_attn_fwd_kernel)

