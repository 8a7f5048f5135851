"""Attention step of the SparseK forward for Hopper (sm_90), written in Gluon.

It computes what ``triton_attn.sparsek_attn_fwd_kernel`` computes, for the same
selection and the same grid, but schedules the work itself, as FlashAttention-3 does
inside one warpgroup:

- key and value rows (gathered list rows, or the block's dense range) are copied by
  ``cp.async`` into rings of shared-memory slots, STAGES - 2 tiles ahead of the tile in
  use, together with each row's score and sort rank (the gates' inputs);
- both matrix products are asynchronous warpgroup MMAs: the logits of tile t are issued
  together with the value product of tile t - 1, and the softmax of tile t runs while
  that value product is still on the tensor cores. Inside one program the Triton kernel
  waits for each product before the softmax that follows.

Gates are computed only as far as each tile needs (``_fold_tile``), as in the Triton
kernel's runs. Only float16 and bfloat16 run here (a float32 product on the tensor cores
would be tf32); the Triton kernel serves float32, other GPUs and the CPU interpreter.
Measurements, and the variants tried and dropped, are in ``kernels/NOTES.md`` (v11).
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    async_copy,
    fence_async_shared,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from sparsek.triton_attn import dense_gate, dense_range, program_block


@gluon.jit
def _positions(t, n_t, n_list, n_sel, p_g, j_start, j_lo, j_hi, BN: gl.constexpr,
               ld: gl.constexpr):
    """Rows of tile t's keys and which of them exist (none past the last tile): list
    entries t * BN + n, or the dense positions j_start + (t - n_list) * BN + n."""
    o_n = gl.arange(0, BN, layout=gl.SliceLayout(1, ld))
    if t < n_list:
        idx = t * BN + o_n
        m = idx < n_sel
        pos = gl.load(p_g + idx, mask=m, other=0)
    else:
        pos = j_start + (t - n_list) * BN + o_n
        m = (pos >= j_lo) & (pos <= j_hi) & (t < n_t)
    return pos, m


@gluon.jit
def _sources(k_ptr, v_ptr, u_ptr, rank_ptr, g_ptr, i_bh, i_blk, S, NBG, K, D: gl.constexpr):
    """Where this program's keys come from: (k_base, v_base, u_row, rank_row, p_g), the
    (batch, kv head) row of k, v, scores and sort ranks, and the block's list."""
    kv_row = i_bh.to(gl.int64) * S
    return (k_ptr + kv_row * D, v_ptr + kv_row * D, u_ptr + kv_row, rank_ptr + kv_row,
            g_ptr + (i_bh.to(gl.int64) * NBG + i_blk) * K)


@gluon.jit
def _selection(tau_ptr, rk_ptr, cnt_ptr, i_bh, i0, o_m, S, BM: gl.constexpr):
    """The per-query selection of program rows o_m (row h * BM + i is query i0 + i):
    (q_pos, m_q, tau, rk, cnt), with m_q marking queries inside the sequence."""
    q_pos = i0 + o_m % BM
    m_q = q_pos < S
    sel = i_bh.to(gl.int64) * S + q_pos
    tau = gl.load(tau_ptr + sel, mask=m_q, other=0.0)
    rk = gl.load(rk_ptr + sel, mask=m_q, other=-1)
    cnt = gl.load(cnt_ptr + sel, mask=m_q, other=0)
    return q_pos, m_q, tau, rk, cnt


@gluon.jit
def _tile_plan(n_sel, i0, i1, S, W, CAUSAL: gl.constexpr, BM: gl.constexpr,
               BN: gl.constexpr):
    """The block's tiles: the list's first n_sel entries (the longest count of its
    queries), then the dense range [j_lo, j_hi] in tiles aligned to i0 (the first one
    starts at or below j_lo); dense tiles from t1 up to t2 lie inside every query's
    window. Returns (n_list, n_t, j_lo, j_hi, j_start, t1, t2)."""
    j_lo, j_hi, j_start, t1, t2 = dense_range(i0, i1, S, W, CAUSAL, BM, BN)
    n_list = (n_sel + BN - 1) // BN
    n_dense = gl.maximum(j_hi + 1 - j_start + BN - 1, 0) // BN
    n_t = gl.maximum(n_list + n_dense, 1)  # an empty block runs one all-masked tile
    return n_list, n_t, j_lo, j_hi, j_start, t1, t2


@gluon.jit
def _issue(t, pos, m, k_base, v_base, u_row, rank_row, k_smem, v_smem, u_smem, r_smem,
           D: gl.constexpr, STAGES: gl.constexpr, ld: gl.constexpr):
    """Start copying tile t's key rows into key slot t % (STAGES - 1), and its value rows,
    scores and sort ranks (the gates' inputs) into slot t % STAGES; rows not in m read
    as zeros. One copy group per tile, empty or not, so groups count tiles."""
    o_d = gl.arange(0, D, layout=gl.SliceLayout(0, ld))
    off = (pos * D)[:, None] + o_d[None, :]
    slot = t % STAGES
    async_copy.async_copy_global_to_shared(k_smem.index(t % (STAGES - 1)), k_base + off,
                                           mask=m[:, None])
    async_copy.async_copy_global_to_shared(v_smem.index(slot), v_base + off, mask=m[:, None])
    # pos is spread over the threads of a row; the copy keeps one thread a row.
    async_copy.async_copy_global_to_shared(u_smem.index(slot), u_row + pos, mask=m)
    async_copy.async_copy_global_to_shared(r_smem.index(slot), rank_row + pos, mask=m)
    async_copy.commit_group()


@gluon.jit
def _advance(t, pos, m, n_t, n_list, n_sel, p_g, j_start, j_lo, j_hi, k_base, v_base, u_row,
             rank_row, k_smem, v_smem, u_smem, r_smem, BN: gl.constexpr, D: gl.constexpr,
             STAGES: gl.constexpr, ld: gl.constexpr):
    """The start of step t: wait until tile t has landed (its copy group is STAGES - 3
    behind the newest) and every warp is done with tile t - 2; start copying tile
    t + STAGES - 2 (rows pos, m) into the freed slots; return the rows of the tile after
    it."""
    async_copy.wait_group(STAGES - 3)
    fence_async_shared()
    gl.thread_barrier()
    _issue(t + STAGES - 2, pos, m, k_base, v_base, u_row, rank_row, k_smem, v_smem, u_smem,
           r_smem, D, STAGES, ld)
    return _positions(t + STAGES - 1, n_t, n_list, n_sel, p_g, j_start, j_lo, j_hi, BN, ld)


@gluon.jit
def _softmax(s, g, keep, m_i, l_i, qk_scale, dtype: gl.constexpr, GATED: gl.constexpr,
             MASKED: gl.constexpr):
    """Fold raw logits s [M, BN] into the running (m, l) (log2 units): keys where keep is
    False drop out (MASKED), the rest weigh g (GATED; else 1). Returns (m, l, alpha, p)
    with p in dtype; l sums the weights as rounded for the value product (as the Triton
    kernel)."""
    if MASKED:
        s = gl.where(keep, s, float("-inf"))
    # The scale is positive, so it commutes with the row maximum, and the exponent is one
    # fused multiply-add an element.
    m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
    m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = gl.exp2(m_i - m_use)
    p = gl.exp2(s * qk_scale - m_use[:, None])
    if GATED:
        p = p * g
    p = p.to(dtype)
    l_i = l_i * alpha + gl.sum(p.to(gl.float32), axis=1)
    return m_new, l_i, alpha, p


@gluon.jit
def _clip_gate(b_u, tau):
    """clip(u - tau, 0, 1) [M, BN] for scores b_u [BN] and thresholds tau [M], one
    instruction an element: a subtraction that saturates to [0, 1] (the compiler's own
    form takes a subtraction and a minimum, and a maximum where the sign is not known).
    Saturation sends NaN to 0, which only inf - inf could make: a gate of 0, as
    clip's."""
    return gl.inline_asm_elementwise("sub.sat.f32 $0, $1, $2;", "=r,r,r",
                                     [b_u[None, :], tau[:, None]], dtype=gl.float32,
                                     is_pure=True, pack=1)


@gluon.jit
def _list_gate(b_u, tau, o_n, t, cnt, BN: gl.constexpr, WHOLE: gl.constexpr):
    """Gates of list tile t (entries t * BN + o_n, scores b_u): clip(u - tau, 0, 1) for
    the queries whose count covers the entry, else 0; WHOLE where every count covers the
    tile (no mask)."""
    if WHOLE:
        return _clip_gate(b_u, tau)
    return gl.where((t * BN + o_n)[None, :] < cnt[:, None], _clip_gate(b_u, tau), 0.0)


@gluon.jit
def _fold_tile(t, s, m_i, l_i, u_smem, r_smem, q_pos, tau, rk, cnt, n_all, n_list, j_start,
               j_lo, j_hi, t1, t2, W, qk_scale, OUT: gl.constexpr, CAUSAL: gl.constexpr,
               BN: gl.constexpr, STAGES: gl.constexpr, s_layout: gl.constexpr,
               dtype: gl.constexpr):
    """Wait for tile t's logits s (until OUT products are in flight) and fold them in.

    The gates are computed only as far as the tile needs, while the product runs: list
    tiles that every query selects whole take clip(u - tau, 0, 1) with no mask; dense
    tiles inside every query's window take nothing; the causal diagonal a mask by
    position; the rest the general gate (window -> 1, selected -> clip(u - tau, 0, 1),
    else 0)."""
    col: gl.constexpr = gl.SliceLayout(0, s_layout)
    o_n = gl.arange(0, BN, layout=col)
    slot = t % STAGES
    if t < n_all:
        g = _list_gate(u_smem.index(slot).load(col), tau, o_n, t, cnt, BN, True)
        x = warpgroup_mma_wait(num_outstanding=OUT, deps=(s,))
        m_i, l_i, alpha, p = _softmax(x, g, g, m_i, l_i, qk_scale, dtype, True, False)
    elif t < n_list:
        g = _list_gate(u_smem.index(slot).load(col), tau, o_n, t, cnt, BN, False)
        x = warpgroup_mma_wait(num_outstanding=OUT, deps=(s,))
        m_i, l_i, alpha, p = _softmax(x, g, g > 0, m_i, l_i, qk_scale, dtype, True, True)
    else:
        j0 = j_start + (t - n_list) * BN
        o_j = j0 + o_n
        if (j0 >= t1) & (j0 < t2):
            x = warpgroup_mma_wait(num_outstanding=OUT, deps=(s,))
            m_i, l_i, alpha, p = _softmax(x, x, x, m_i, l_i, qk_scale, dtype, False, False)
        elif CAUSAL & (j0 >= t2):
            keep = (q_pos[:, None] >= o_j[None, :]) & (o_j <= j_hi)[None, :]
            x = warpgroup_mma_wait(num_outstanding=OUT, deps=(s,))
            m_i, l_i, alpha, p = _softmax(x, x, keep, m_i, l_i, qk_scale, dtype, False, True)
        else:
            m_j = (o_j >= j_lo) & (o_j <= j_hi)
            b_u = u_smem.index(slot).load(col)
            b_r = r_smem.index(slot).load(col)
            g = dense_gate(q_pos, o_j, m_j, b_u, b_r, tau, rk, W, CAUSAL)
            x = warpgroup_mma_wait(num_outstanding=OUT, deps=(s,))
            m_i, l_i, alpha, p = _softmax(x, g, g > 0, m_i, l_i, qk_scale, dtype, True, True)
    return m_i, l_i, alpha, p


@gluon.jit
def sparsek_attn_fwd_gluon(
    q_ptr, k_ptr, v_ptr, u_ptr, rank_ptr, g_ptr, tau_ptr, rk_ptr, cnt_ptr, o_ptr, lse_ptr,
    S, Hq, Hkv, NBG, K, W, qk_scale,
    ROW0: gl.constexpr, CAUSAL: gl.constexpr, BM: gl.constexpr, HG: gl.constexpr, BN: gl.constexpr,
    D: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr,
):
    """o [B, Hq, S, D] and lse [B, Hq, S] for one block of queries; arguments as in
    ``triton_attn.sparsek_attn_fwd_kernel``. STAGES >= 3 shared-memory slots."""
    M: gl.constexpr = HG * BM
    dtype: gl.constexpr = q_ptr.dtype.element_ty
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BN, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    # Copies move 16 bytes a thread along D.
    ld: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (D // 8), D // 8], [num_warps, 1],
                                        [1, 0])
    smem: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16,
                                              rank=2)

    i_blk, i_bh, i_b, i0, i1, head0 = program_block(S, Hq, Hkv, ROW0, BM, HG)
    q_base = (i_b * Hq + head0).to(gl.int64) * S * D
    k_base, v_base, u_row, rank_row, p_g = _sources(k_ptr, v_ptr, u_ptr, rank_ptr, g_ptr,
                                                    i_bh, i_blk, S, NBG, K, D)

    # The block's queries, rows h * BM + i, in the copy layout (q and o) ...
    o_m_ld = gl.arange(0, M, layout=gl.SliceLayout(1, ld))
    o_d_ld = gl.arange(0, D, layout=gl.SliceLayout(0, ld))
    q_pos_ld = i0 + o_m_ld % BM
    q_off = (((o_m_ld // BM) * S + q_pos_ld) * D)[:, None] + o_d_ld[None, :]
    m_q_ld = (q_pos_ld < S)[:, None]
    b_q = gl.load(q_ptr + q_base + q_off, mask=m_q_ld, other=0.0)
    q_smem = gl.allocate_shared_memory(dtype, [M, D], smem, value=b_q)
    # ... and in the logits' layout (per-query selection).
    o_m = gl.arange(0, M, layout=row_s)
    q_pos, m_q, tau, rk, cnt = _selection(tau_ptr, rk_ptr, cnt_ptr, i_bh, i0, o_m, S, BM)

    # The tiles (see _tile_plan); list tiles below n_all are selected whole by every query.
    n_sel = gl.max(cnt, axis=0)
    n_list, n_t, j_lo, j_hi, j_start, t1, t2 = _tile_plan(n_sel, i0, i1, S, W, CAUSAL, BM,
                                                          BN)
    n_all = gl.min(gl.where(m_q, cnt, K), axis=0) // BN

    # Keys are done with one step before values (the logits of tile t are waited for in
    # step t, its value product in step t + 1), so their ring has one slot less.
    k_smem = gl.allocate_shared_memory(dtype, [STAGES - 1, BN, D], smem)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BN, D], smem)
    flat: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])
    u_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BN], flat)
    r_smem = gl.allocate_shared_memory(gl.int32, [STAGES, BN], flat)
    # Tiles 0 .. STAGES - 3 start copying now; tile STAGES - 2 in the first step below.
    # Each tile's rows are read one step before its copy starts, so that read is never
    # waited for.
    for t in gl.static_range(STAGES - 2):
        pos, m = _positions(t, n_t, n_list, n_sel, p_g, j_start, j_lo, j_hi, BN, ld)
        _issue(t, pos, m, k_base, v_base, u_row, rank_row, k_smem, v_smem, u_smem, r_smem,
               D, STAGES, ld)
    pos, m = _positions(STAGES - 2, n_t, n_list, n_sel, p_g, j_start, j_lo, j_hi, BN, ld)

    m_i = gl.full([M], float("-inf"), gl.float32, row_s)
    l_i = gl.zeros([M], gl.float32, row_s)
    acc = gl.zeros([M, D], gl.float32, o_layout)
    s_zero = gl.zeros([M, BN], gl.float32, s_layout)

    # Step t: wait for tile t and start tile t + STAGES - 2 (into the slots of tile t - 2,
    # and of tile t - 1 for the keys),
    # then the logits of tile t and the value product of tile t - 1 (p, from the step
    # before) on the tensor cores while the gates of tile t are computed; then tile t's
    # softmax while the value product runs. Step 0 has no value product.
    pos, m = _advance(0, pos, m, n_t, n_list, n_sel, p_g, j_start, j_lo, j_hi, k_base,
                      v_base, u_row, rank_row, k_smem, v_smem, u_smem, r_smem, BN, D,
                      STAGES, ld)
    s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False,
                      is_async=True)
    m_i, l_i, alpha, p = _fold_tile(0, s, m_i, l_i, u_smem, r_smem, q_pos, tau, rk, cnt,
                                    n_all, n_list, j_start, j_lo, j_hi, t1, t2, W, qk_scale,
                                    0, CAUSAL, BN, STAGES, s_layout, dtype)
    for t in range(1, n_t):
        pos, m = _advance(t, pos, m, n_t, n_list, n_sel, p_g, j_start, j_lo, j_hi, k_base,
                          v_base, u_row, rank_row, k_smem, v_smem, u_smem, r_smem, BN, D,
                          STAGES, ld)
        s = warpgroup_mma(q_smem, k_smem.index(t % (STAGES - 1)).permute((1, 0)), s_zero,
                          use_acc=False, is_async=True)
        acc = warpgroup_mma(gl.convert_layout(p, p_layout),
                            v_smem.index((t - 1) % STAGES), acc, is_async=True)
        m_i, l_i, alpha, p = _fold_tile(t, s, m_i, l_i, u_smem, r_smem, q_pos, tau, rk, cnt,
                                        n_all, n_list, j_start, j_lo, j_hi, t1, t2, W,
                                        qk_scale, 1, CAUSAL, BN, STAGES, s_layout, dtype)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]

    acc = warpgroup_mma(gl.convert_layout(p, p_layout), v_smem.index((n_t - 1) % STAGES), acc,
                        is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    async_copy.wait_group(0)

    has = l_i > 0
    l_o = gl.convert_layout(gl.where(has, l_i, 1.0), gl.SliceLayout(1, o_layout))
    o = gl.convert_layout((acc / l_o[:, None]).to(dtype), ld)
    gl.store(o_ptr + q_base + q_off, o, mask=m_q_ld)
    m_use = gl.where(m_i == float("-inf"), 0.0, m_i)
    lse = gl.where(has, (m_use + gl.log2(gl.where(has, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    lse_base = (i_b * Hq + head0).to(gl.int64) * S
    gl.store(lse_ptr + lse_base + (o_m // BM) * S + q_pos, lse, mask=m_q)


# (keys per tile, shared-memory slots, register cap or None), tuned per shape; the warps
# follow the rows (16 a warp). Measured on the H100 (bench_attn.py --gluon): seed's best
# is 32 x 3 at 128 registers (three programs an SM), gpt4-4k's 64 x 3 or 32 x 3 at 168.
GLUON_CONFIGS = [(32, 3, 128), (32, 3, 168), (64, 3, None), (32, 4, 128)]
ROWS = (64, 128)  # rows a program: one or two warpgroups of 64


def supported(q: torch.Tensor, rows: int) -> bool:
    """Whether this kernel serves q with programs of `rows` rows: float16 or bfloat16 on
    a Hopper GPU (sm_90: its warpgroup products exist nowhere else)."""
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and rows in ROWS
            and torch.cuda.get_device_capability(q.device) == (9, 0))


def kernel_args(fixed: dict) -> dict:
    """This kernel's constexpr arguments from the Triton kernel's (``fixed`` of
    ``triton_fwd.attention_launch``): all but the dot precision switches, which the
    warpgroup products here do not take."""
    return {name: value for name, value in fixed.items() if name not in ("PREC", "UPCAST")}


def launch_kwargs(block_n: int, stages: int, max_registers: int | None, rows: int) -> dict:
    """Launch options of one tile: block_n keys a step, stages (>= 3) shared-memory slots,
    an optional cap on registers per thread, one warp per 16 of the program's rows."""
    if stages < 3:
        raise ValueError(f"the Gluon attention kernel needs at least 3 shared-memory slots "
                         f"(num_stages); got {stages}")
    extra = {} if max_registers is None else {"maxnreg": max_registers}
    return dict(BN=block_n, STAGES=stages, num_warps=rows // 16, **extra)


_TUNED: dict[int, triton.runtime.Autotuner] = {}


def tuned(rows: int):
    """The kernel tuned over GLUON_CONFIGS for programs of `rows` rows."""
    if rows not in _TUNED:
        _TUNED[rows] = triton.autotune(
            configs=[triton.Config({"BN": bn, "STAGES": st}, num_warps=rows // 16,
                                   maxnreg=cap) for bn, st, cap in GLUON_CONFIGS],
            key=["S", "Hq", "Hkv", "K", "W", "CAUSAL", "BM", "HG", "D"],
        )(sparsek_attn_fwd_gluon)
    return _TUNED[rows]


def tuners() -> list:
    """The tuned kernels made so far (one per program size)."""
    return list(_TUNED.values())
