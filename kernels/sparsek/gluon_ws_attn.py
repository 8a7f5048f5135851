"""Attention step of the SparseK forward for Hopper (sm_90), warp-specialized.

The same work as ``gluon_attn.sparsek_attn_fwd_gluon`` (one block of queries of HG heads,
its list tiles then its dense tiles), split among warpgroups (four warps each), as
FlashAttention-3 splits a dense attention:

- a producer first sends the block's queries into the consumers' slots by TMA, then
  gathers each list tile's key rows and value rows by ``cp.async`` into two rings of
  shared-memory slots (STAGES for keys, one more for values, which are held a step
  longer), and copies each dense tile (consecutive rows) whole by one TMA copy a ring;
  every tile's scores and sort ranks (the gates' inputs) come by ``cp.async``. A slot's
  "ready" barrier completes when each producer thread's copies have landed and the TMA
  copy's bytes have arrived;
- a consumer for each 64 of the program's rows (two for 128 rows; one for 64, and then
  two programs share an SM). Each waits for tile t's keys and tile t - 1's values, runs
  the logits of tile t and the value product of tile t - 1 on the tensor cores,
  computes tile t's gates and softmax meanwhile, then frees tile t's key slot and, once
  that value product is done, tile t - 1's value slot (their "free" barriers). At the
  end it writes o into its query slot and sends it out by TMA.

The consumers never wait on each other: while one is in its softmax, the other's
products (or the other program's) can hold the tensor cores. Registers move to where
they are used (the compiler's ``setmaxnreg`` from each partition's count): the consumers
hold the accumulators, the producer little more than addresses.

Measured on the H100 (``kernels/NOTES.md``, v16 to v22): memory does not bound this
kernel. The instructions its warps issue, the producer's included, did until v20, and are
kept few; since then neither fewer instructions nor a shorter chain in a consumer's step
has moved it by more than the spread between runs (v21). Gathered rows cost the
consumers through the copies' instructions, not their bytes (v21), and TMA copies a row
were 4x slower than ``cp.async`` (v22): only whole boxes (queries, outputs, dense
tiles) move by TMA, 5-10% less time than loading and storing them by thread (v22).
The rows' weight sums come from the tensor cores (the rounded weights times a few
columns of ones, next to the value product), weights are rounded two an instruction and
gates clipped in one, after the row maxima, a row's running maximum moves only when a
tile's exceeds it by 2 ** 8, so most steps skip the accumulator's rescaling (a vote of
each warp's lanes, no barrier), and the producer copies without predicates, each score
once. Float16 and bfloat16 only, 64 or 128 rows a program.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    async_copy,
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from sparsek.gluon_attn import (
    _clip_gate,
    _positions,
    _selection,
    _sources,
    _tile_plan,
)
from sparsek.triton_attn import program_block, window_pairs

# Keys a tile: the dense range's TMA boxes hold this many rows (see descriptors).
TILE_KEYS = 64
# The slots seen without their swizzle, as TMA copies address them: a copy swizzles by the
# shared-memory address it writes or reads, which is the slots' own swizzle (they are
# aligned to its pattern). Four dimensions, as the descriptors' boxes (see descriptors).
UNSWIZZLED = gl.constexpr(gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16,
                                               rank=4))
# Rows of a consumer warpgroup: a warpgroup product's height.
CONSUMER_ROWS = gl.constexpr(64)
# How far (log2 units) a tile's row maximum may exceed the running one before the softmax
# moves it: weights then stay below 2 ** 8 = 256, well inside float16 and bfloat16.
LAZY_MAX = gl.constexpr(8.0)


@gluon.jit
def _warp_moved(alpha):
    """1 for every row of a warp where some row of that warp has alpha != 1, else 0: a
    vote across the warp's lanes (each holds two rows of a product's layout), with no
    barrier among the warpgroup's warps."""
    return gl.inline_asm_elementwise(
        "{ .reg .pred p, q; setp.neu.f32 p, $2, 0f3F800000; "
        "setp.neu.f32 q, $3, 0f3F800000; or.pred p, p, q; "
        "vote.sync.any.pred p, p, -1; selp.b32 $0, 1, 0, p; mov.b32 $1, $0; }",
        "=r,=r,r,r", [alpha], dtype=gl.int32, is_pure=True, pack=2)


def _rescale_asm(pack: int) -> tuple[str, str]:
    """The PTX and constraints of _rescale for `pack` elements a thread: each output is
    tied to its input, so a skipping warp leaves x as it was."""
    muls = " ".join(f"mul.f32 ${i}, ${i}, ${2 * pack + i};" for i in range(pack))
    asm = (f"{{ .reg .pred p; setp.eq.b32 p, ${3 * pack}, 0; @p bra.uni SKIP${{:uid}}; "
           f"{muls} SKIP${{:uid}}: }}")
    constraints = ",".join(["=r"] * pack + [str(i) for i in range(pack)] + ["r"] * (2 * pack))
    return asm, constraints


# Elements a thread of a consumer's accumulator (64 rows x D over 128 threads: D / 2) and
# of its row sums (64 x 8: 4).
ACC64_ASM, ACC64_CONSTRAINTS = (gl.constexpr(x) for x in _rescale_asm(32))
ACC128_ASM, ACC128_CONSTRAINTS = (gl.constexpr(x) for x in _rescale_asm(64))
SUM_ASM, SUM_CONSTRAINTS = (gl.constexpr(x) for x in _rescale_asm(4))


@gluon.jit
def _rescale(x, alpha, moved, ASM: gl.constexpr, CONSTRAINTS: gl.constexpr,
             PACK: gl.constexpr):
    """x * alpha[:, None], skipped by the warps whose rows all have alpha 1 (moved 0): a
    branch on the warp's vote around the multiplies, PACK elements of a thread at a time
    (each thread's whole share of x, so one branch a step)."""
    return gl.inline_asm_elementwise(ASM, CONSTRAINTS, [x, alpha[:, None], moved[:, None]],
                                     dtype=gl.float32, is_pure=True, pack=PACK)


@gluon.jit
def _rescale_acc(acc, alpha, moved, D: gl.constexpr):
    """_rescale of a consumer's accumulator [64, D] (D = 64 or 128)."""
    if D == 128:
        return _rescale(acc, alpha, moved, ACC128_ASM, ACC128_CONSTRAINTS, 64)
    else:
        return _rescale(acc, alpha, moved, ACC64_ASM, ACC64_CONSTRAINTS, 32)


@gluon.jit
def _tiles(cnt_ptr, i_bh, i0, i1, S, W, CAUSAL: gl.constexpr, BM: gl.constexpr,
           BN: gl.constexpr, lay: gl.constexpr):
    """The block's tile plan, the same in every partition: (n_sel, n_list, n_t, j_lo,
    j_hi, j_start, t1, t2), with n_sel the longest list count of the block's queries
    (see gluon_attn._tile_plan)."""
    q_pos = i0 + gl.arange(0, BM, layout=lay)
    cnt = gl.load(cnt_ptr + i_bh.to(gl.int64) * S + q_pos, mask=q_pos < S, other=0)
    n_sel = gl.max(cnt, axis=0)
    n_list, n_t, j_lo, j_hi, j_start, t1, t2 = _tile_plan(n_sel, i0, i1, S, W, CAUSAL, BM,
                                                          BN)
    return n_sel, n_list, n_t, j_lo, j_hi, j_start, t1, t2


@gluon.jit
def _rows(t, n_t, n_list, n_sel, p_g, j_start, j_lo, j_hi, BN: gl.constexpr,
          lay: gl.constexpr):
    """The rows tile t copies (see gluon_attn._positions), row 0 in place of those that
    do not exist: the consumers' gates and masks drop those keys, so the copies need no
    predicate (a masked copy costs the producer instructions a row and copy)."""
    pos, m = _positions(t, n_t, n_list, n_sel, p_g, j_start, j_lo, j_hi, BN, lay)
    return gl.where(m, pos, 0)


@gluon.jit
def _round_pairs(p, dtype: gl.constexpr):
    """p (float32) rounded to dtype two elements an instruction (the compiler's own
    conversion takes one, plus a byte permute to pack the pair)."""
    if dtype == gl.bfloat16:
        return gl.inline_asm_elementwise("cvt.rn.bf16x2.f32 $0, $2, $1;", "=r,r,r", [p],
                                         dtype=gl.bfloat16, is_pure=True, pack=2)
    else:
        return gl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $2, $1;", "=r,r,r", [p],
                                         dtype=gl.float16, is_pure=True, pack=2)


@gluon.jit
def _lazy_max(x, keep, m_i, qk_scale, MASKED: gl.constexpr):
    """Tile logits x [64, BN] with the keys outside keep dropped (MASKED), the rows' new
    running maximum, the one the weights are taken against, and alpha (log2 units).

    A row's maximum moves only when the tile's exceeds it by more than LAZY_MAX: weights
    stay below 2 ** LAZY_MAX, o and lse are the same (both are taken against the maximum
    used), and a row whose maximum stays has alpha exactly 1 (an empty row's -inf
    included), which lets its warp skip the rescaling."""
    if MASKED:
        x = gl.where(keep, x, float("-inf"))
    # The scale is positive, so it commutes with the row maximum, and the exponent is one
    # fused multiply-add an element.
    m_new = gl.maximum(m_i, gl.max(x, axis=1) * qk_scale)
    m_new = gl.where(m_new > m_i + LAZY_MAX, m_new, m_i)
    m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = gl.where(m_new == m_i, 1.0, gl.exp2(m_i - m_use))
    return x, m_new, m_use, alpha


@gluon.jit
def _weights(x, g, m_use, qk_scale, dtype: gl.constexpr, GATED: gl.constexpr):
    """The tile's weights g * exp2(x * qk_scale - m_use) (g = 1 unless GATED), rounded to
    dtype two an instruction; a dropped key's logit is -inf, so its weight is 0 whatever
    its gate."""
    p = gl.exp2(x * qk_scale - m_use[:, None])
    if GATED:
        p = p * g
    return _round_pairs(p, dtype)


@gluon.jit
def _fold_tile(t, s, m_i, u_smem, r_smem, q_pos, tau, rk, cnt, n_all, n_list, j_start,
               j_lo, j_hi, t1, t2, W, qk_scale, OUT: gl.constexpr, CAUSAL: gl.constexpr,
               BN: gl.constexpr, STAGES: gl.constexpr, s_layout: gl.constexpr,
               dtype: gl.constexpr):
    """Wait for tile t's logits s (until OUT products are in flight) and fold them in:
    (m, alpha, p). The row sums are the caller's (p times ones on the tensor cores).

    Which keys a row keeps is decided before its maximum (a comparison an element); their
    gates are computed after it, from scores read after it, so no tile of gates is live
    across the reduction (7% fewer instructions than gates first, NOTES v21). List tiles
    that every query selects whole keep every key; dense tiles inside every query's
    window take no gate; the causal diagonal a mask by position; the rest the general
    gate (window 1, selected clip(u - tau, 0, 1)). A key a query selects has u > tau, so
    keeping it by its list count or sort rank keeps exactly what a gate above 0 would."""
    col: gl.constexpr = gl.SliceLayout(0, s_layout)
    o_n = gl.arange(0, BN, layout=col)
    slot = t % STAGES
    x = warpgroup_mma_wait(num_outstanding=OUT, deps=(s,))
    if t < n_all:
        x, m_new, m_use, alpha = _lazy_max(x, x, m_i, qk_scale, False)
        b_u = u_smem.index(slot).load(col)
        p = _weights(x, _clip_gate(b_u, tau), m_use, qk_scale, dtype, True)
    elif t < n_list:
        keep = (t * BN + o_n)[None, :] < cnt[:, None]
        x, m_new, m_use, alpha = _lazy_max(x, keep, m_i, qk_scale, True)
        b_u = u_smem.index(slot).load(col)
        p = _weights(x, _clip_gate(b_u, tau), m_use, qk_scale, dtype, True)
    else:
        j0 = j_start + (t - n_list) * BN
        o_j = j0 + o_n
        if (j0 >= t1) & (j0 < t2):
            x, m_new, m_use, alpha = _lazy_max(x, x, m_i, qk_scale, False)
            p = _weights(x, x, m_use, qk_scale, dtype, False)
        elif CAUSAL & (j0 >= t2):
            keep = (q_pos[:, None] >= o_j[None, :]) & (o_j <= j_hi)[None, :]
            x, m_new, m_use, alpha = _lazy_max(x, keep, m_i, qk_scale, True)
            p = _weights(x, x, m_use, qk_scale, dtype, False)
        else:
            b_r = r_smem.index(slot).load(col)
            keep = _dense_keep(q_pos, o_j, b_r, rk, j_lo, j_hi, W, CAUSAL)
            x, m_new, m_use, alpha = _lazy_max(x, keep, m_i, qk_scale, True)
            b_u = u_smem.index(slot).load(col)
            p = _weights(x, _dense_gate(q_pos, o_j, b_u, tau, W, CAUSAL), m_use, qk_scale,
                         dtype, True)
    return m_new, alpha, p


@gluon.jit
def _dense_keep(q_pos, o_j, b_r, rk, j_lo, j_hi, W, CAUSAL: gl.constexpr):
    """Which dense-range keys o_j (sort ranks b_r, inside [j_lo, j_hi]) queries q_pos
    with cut ranks rk keep [M, BN]: their window pairs, and the candidates ranked within
    the cut (as triton_attn.dense_gate)."""
    win, cand = window_pairs(q_pos, o_j, W, CAUSAL)
    return ((win | (cand & (b_r[None, :] <= rk[:, None])))
            & ((o_j >= j_lo) & (o_j <= j_hi))[None, :])


@gluon.jit
def _dense_gate(q_pos, o_j, b_u, tau, W, CAUSAL: gl.constexpr):
    """Gates [M, BN] of the dense-range keys a query keeps (_dense_keep): 1 inside its
    window, clip(u - tau, 0, 1) outside. Keys it drops get a value too, which their
    weight of 0 ignores, so the window test here can be one comparison (causal)."""
    dist = q_pos[:, None] - o_j[None, :]
    win = dist < W if CAUSAL else (dist < W) & (dist > -W)
    return gl.where(win, 1.0, _clip_gate(b_u, tau))


@gluon.jit
def _box(desc, i_bh, j0, dst, bar, BN: gl.constexpr, D: gl.constexpr):
    """Rows j0 .. j0 + BN - 1 of (batch, kv head) row i_bh into the slot dst by one TMA
    copy; rows outside the sequence read as zeros. desc views the row as [D // 64, S, 64]
    (see descriptors), so the box lands 64-column line by line in the slot's order; dst
    is viewed UNSWIZZLED."""
    gl.static_assert((desc.block_shape[1] == D // 64) & (desc.block_shape[2] == BN),
                     "the descriptors' box is one tile of keys")
    box = dst._reinterpret(dst.dtype, [1, D // 64, BN, 64], UNSWIZZLED)
    tma.async_copy_global_to_shared(desc, [i_bh, 0, j0, 0], bar, box)


@gluon.jit
def _fill(is_list, src, desc, i_bh, j0, dst, ready, BN: gl.constexpr, D: gl.constexpr):
    """A ring slot's rows: a list tile's gathered by cp.async from src (each thread's
    own arrival on ready follows; here one plain arrival more), a dense tile's by one TMA
    box (the arrival more carries its bytes)."""
    if is_list:
        async_copy.async_copy_global_to_shared(dst, src)
        mbarrier.arrive(ready, count=1)
    else:
        mbarrier.expect(ready, BN * D * 2)
        _box(desc, i_bh, j0, dst, ready, BN, D)


@gluon.jit
def _query_boxes(desc, q_smem, bar, i_b, i0, head0, Hq, WG: gl.constexpr, LOAD: gl.constexpr,
                 BM: gl.constexpr, HG: gl.constexpr, D: gl.constexpr):
    """TMA copies between the block's queries' rows of q or o (desc) and the consumers'
    slots q_smem: LOAD, every slot's rows from q, completing on bar; else consumer WG's
    rows to o. A box is QB = min(BM, 64) queries of one head by 64 columns (queries past
    S are not read, read as zeros, or not written). Row h * BM + i (query i0 + i of head
    head0 + h) is row (h * BM + i) % 64 of consumer (h * BM + i) // 64's slot, so a box
    never straddles two slots; the slots are viewed UNSWIZZLED."""
    M2: gl.constexpr = CONSUMER_ROWS
    QB: gl.constexpr = BM if BM < M2 else M2
    gl.static_assert((desc.block_shape[1] == 1) & (desc.block_shape[2] == QB),
                     "the query and output descriptors' box is min(BM, 64) rows by 64 columns")
    lines = q_smem._reinterpret(q_smem.dtype, [HG * BM // M2, D // 64, M2, 64], UNSWIZZLED)
    if LOAD:
        mbarrier.expect(bar, HG * BM * D * 2)
    for h in gl.static_range(HG):
        for part in gl.static_range(BM // QB):
            if LOAD or ((h * BM + part * QB) // M2 == WG):
                for c in gl.static_range(D // 64):
                    box = lines.slice((h * BM + part * QB) // M2, 1, dim=0).slice(
                        c, 1, dim=1).slice((h * BM + part * QB) % M2, QB, dim=2)
                    coord = [i_b * Hq + head0 + h, c, i0 + part * QB, 0]
                    if LOAD:
                        tma.async_copy_global_to_shared(desc, coord, bar, box)
                    else:
                        tma.async_copy_shared_to_global(desc, coord, box)


@gluon.jit
def _producer(q_desc, q_smem, q_bar, k_ptr, v_ptr, k_desc, v_desc, u_ptr, rank_ptr, g_ptr,
              cnt_ptr, rings, S, Hq, Hkv, NBG, K, W, ROW0: gl.constexpr,
              CAUSAL: gl.constexpr, BM: gl.constexpr, HG: gl.constexpr, BN: gl.constexpr,
              D: gl.constexpr, STAGES: gl.constexpr):
    """Start the block's queries on their way (_query_boxes), then copy tile t's keys (with
    their scores and sort ranks) into slot t % STAGES of their ring and its values into
    slot t % (STAGES + 1) of theirs, each once the consumers have freed it.

    The producer shares each scheduler with the consumers, and its instructions showed in
    their time (NOTES v18), so it issues few: keys and values move 16 bytes a thread
    along D, and a row's score and sort rank are copied only by the threads that hold the
    row in a layout of one row a thread (in the copy layout sixteen threads hold each
    row, and all of them copied it). A dense tile's keys and values take one TMA copy
    each instead of a row a thread (0.7-2.8% less time, NOTES v22); a slot's ready
    barrier then counts one arrival more, with the copy's bytes (without them on a list
    tile)."""
    k_smem, v_smem, u_smem, r_smem, k_ready, k_free, v_ready, v_free = rings
    ld: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (D // 8), D // 8], [4, 1], [1, 0])
    by_row: gl.constexpr = gl.BlockedLayout([1, 1], [32, 1], [4, 1], [1, 0])
    i_blk, i_bh, i_b, i0, i1, head0 = program_block(S, Hq, Hkv, ROW0, BM, HG)
    _query_boxes(q_desc, q_smem, q_bar, i_b, i0, head0, Hq, 0, True, BM, HG, D)
    n_sel, n_list, n_t, j_lo, j_hi, j_start, t1, t2 = _tiles(
        cnt_ptr, i_bh, i0, i1, S, W, CAUSAL, BM, BN, gl.SliceLayout(1, ld))
    k_base, v_base, u_row, rank_row, p_g = _sources(k_ptr, v_ptr, u_ptr, rank_ptr, g_ptr,
                                                    i_bh, i_blk, S, NBG, K, D)
    o_d = gl.arange(0, D, layout=gl.SliceLayout(0, ld))

    # Each tile's rows are read before waiting for its slots, so that read overlaps the
    # wait. They are read twice, once in each layout: the second read hits the cache,
    # where converting between the layouts would go through shared memory and a barrier
    # of the four warps.
    pos = _rows(0, n_t, n_list, n_sel, p_g, j_start, j_lo, j_hi, BN, ld)
    pos_r = _rows(0, n_t, n_list, n_sel, p_g, j_start, j_lo, j_hi, BN, by_row)
    for t in range(n_t):
        slot = t % STAGES
        v_slot = t % (STAGES + 1)
        off = (pos * D)[:, None] + o_d[None, :]
        j0 = j_start + (t - n_list) * BN  # a dense tile's first row
        # A fresh barrier counts as freed once: round 0 passes at once.
        mbarrier.wait(k_free.index(slot), ((t // STAGES) & 1) ^ 1)
        _fill(t < n_list, k_base + off, k_desc, i_bh, j0, k_smem.index(slot),
              k_ready.index(slot), BN, D)
        async_copy.async_copy_global_to_shared(u_smem.index(slot), u_row + pos_r)
        async_copy.async_copy_global_to_shared(r_smem.index(slot), rank_row + pos_r)
        # Every thread's arrival fires when its own copies so far have landed.
        async_copy.mbarrier_arrive(k_ready.index(slot), increment_count=False)
        mbarrier.wait(v_free.index(v_slot), ((t // (STAGES + 1)) & 1) ^ 1)
        _fill(t < n_list, v_base + off, v_desc, i_bh, j0, v_smem.index(v_slot),
              v_ready.index(v_slot), BN, D)
        async_copy.mbarrier_arrive(v_ready.index(v_slot), increment_count=False)
        pos = _rows(t + 1, n_t, n_list, n_sel, p_g, j_start, j_lo, j_hi, BN, ld)
        pos_r = _rows(t + 1, n_t, n_list, n_sel, p_g, j_start, j_lo, j_hi, BN, by_row)


@gluon.jit
def _consumer(q_bar, q_smem, ones_smem, rings, tau_ptr, rk_ptr, cnt_ptr, o_desc, lse_ptr, S,
              Hq, Hkv, K, W, qk_scale, WG: gl.constexpr, ROW0: gl.constexpr, CAUSAL: gl.constexpr,
              BM: gl.constexpr, HG: gl.constexpr, BN: gl.constexpr, D: gl.constexpr,
              STAGES: gl.constexpr):
    """Rows WG * M2 .. WG * M2 + M2 - 1 of the program (M2 = 64; row h * BM + i is query
    i0 + i of the group's head h): their online softmax over every tile, then o and
    lse."""
    k_smem, v_smem, u_smem, r_smem, k_ready, k_free, v_ready, v_free = rings
    M2: gl.constexpr = CONSUMER_ROWS
    dtype: gl.constexpr = q_smem.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    # The row sums: p times a [BN, NL] matrix of ones, every column of it the same sum.
    NL: gl.constexpr = ones_smem.shape[0]
    l_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, NL, 16])
    pl_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=l_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    row_l: gl.constexpr = gl.SliceLayout(1, l_layout)
    flat: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])

    i_blk, i_bh, i_b, i0, i1, head0 = program_block(S, Hq, Hkv, ROW0, BM, HG)
    n_sel, n_list, n_t, j_lo, j_hi, j_start, t1, t2 = _tiles(
        cnt_ptr, i_bh, i0, i1, S, W, CAUSAL, BM, BN, flat)

    o_m = WG * M2 + gl.arange(0, M2, layout=row_s)
    q_pos, m_q, tau, rk, cnt = _selection(tau_ptr, rk_ptr, cnt_ptr, i_bh, i0, o_m, S, BM)
    # List tiles below n_all are selected whole by each of this warpgroup's queries.
    n_all = gl.min(gl.where(m_q, cnt, K), axis=0) // BN

    q_w = q_smem.index(WG)
    m_i = gl.full([M2], float("-inf"), gl.float32, row_s)
    acc = gl.zeros([M2, D], gl.float32, o_layout)
    l_acc = gl.zeros([M2, NL], gl.float32, l_layout)
    ones = ones_smem.permute((1, 0))
    s_zero = gl.zeros([M2, BN], gl.float32, s_layout)

    # Step 0: the logits of tile 0 and their softmax; no value product yet.
    mbarrier.wait(q_bar, 0)
    mbarrier.wait(k_ready.index(0), 0)
    fence_async_shared()  # cp.async wrote the slot; the products read it
    s = warpgroup_mma(q_w, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False,
                      is_async=True)
    m_i, alpha, p = _fold_tile(0, s, m_i, u_smem, r_smem, q_pos, tau, rk, cnt, n_all,
                               n_list, j_start, j_lo, j_hi, t1, t2, W, qk_scale, 0, CAUSAL,
                               BN, STAGES, s_layout, dtype)
    mbarrier.arrive(k_free.index(0), count=1)
    # Step t: logits of tile t and the value product of tile t - 1 on the tensor cores,
    # tile t's gates and softmax meanwhile; then free tile t's keys and tile t - 1's
    # values.
    for t in range(1, n_t):
        slot = t % STAGES
        prev = (t - 1) % (STAGES + 1)
        mbarrier.wait(k_ready.index(slot), (t // STAGES) & 1)
        mbarrier.wait(v_ready.index(prev), ((t - 1) // (STAGES + 1)) & 1)
        fence_async_shared()
        s = warpgroup_mma(q_w, k_smem.index(slot).permute((1, 0)), s_zero, use_acc=False,
                          is_async=True)
        acc = warpgroup_mma(gl.convert_layout(p, p_layout), v_smem.index(prev), acc,
                            is_async=True)
        l_acc = warpgroup_mma(gl.convert_layout(p, pl_layout), ones, l_acc, is_async=True)
        m_i, alpha, p = _fold_tile(t, s, m_i, u_smem, r_smem, q_pos, tau, rk, cnt, n_all,
                                   n_list, j_start, j_lo, j_hi, t1, t2, W, qk_scale, 2,
                                   CAUSAL, BN, STAGES, s_layout, dtype)
        mbarrier.arrive(k_free.index(slot), count=1)
        acc, l_acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, l_acc))
        mbarrier.arrive(v_free.index(prev), count=1)
        # The running maxima move lazily (_lazy_max), so most steps leave every
        # alpha of a warp's rows at 1, and the warp skips the rescaling.
        moved = _warp_moved(alpha)
        acc = _rescale_acc(acc, gl.convert_layout(alpha, row_o),
                           gl.convert_layout(moved, row_o), D)
        l_acc = _rescale(l_acc, gl.convert_layout(alpha, row_l),
                         gl.convert_layout(moved, row_l), SUM_ASM, SUM_CONSTRAINTS, 4)

    last = (n_t - 1) % (STAGES + 1)
    mbarrier.wait(v_ready.index(last), ((n_t - 1) // (STAGES + 1)) & 1)
    fence_async_shared()
    acc = warpgroup_mma(gl.convert_layout(p, p_layout), v_smem.index(last), acc,
                        is_async=True)
    l_acc = warpgroup_mma(gl.convert_layout(p, pl_layout), ones, l_acc, is_async=True)
    acc, l_acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, l_acc))

    # o through this consumer's query slot (its last product has read it) and TMA: the
    # product's layout gives each thread pairs of columns of 16 rows, and without their
    # direct stores the kernel took 3-12% less time (NOTES v22). lse straight from
    # registers.
    l_i = gl.convert_layout(gl.max(l_acc, axis=1), row_s)
    has = l_i > 0
    l_o = gl.convert_layout(gl.where(has, l_i, 1.0), row_o)
    q_w.store((acc / l_o[:, None]).to(dtype))
    fence_async_shared()
    _query_boxes(o_desc, q_smem, q_bar, i_b, i0, head0, Hq, WG, False, BM, HG, D)
    q_base = (i_b * Hq + head0).to(gl.int64) * S
    m_use = gl.where(m_i == float("-inf"), 0.0, m_i)
    lse = gl.where(has, (m_use + gl.log2(gl.where(has, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    gl.store(lse_ptr + q_base + (o_m // BM) * S + q_pos, lse, mask=m_q)
    tma.store_wait(0)  # the slot is read before the program ends


@gluon.jit
def sparsek_attn_fwd_ws(
    q_ptr, k_ptr, v_ptr, u_ptr, rank_ptr, g_ptr, tau_ptr, rk_ptr, cnt_ptr, o_ptr, lse_ptr,
    S, Hq, Hkv, NBG, K, W, qk_scale, k_desc, v_desc, q_desc, o_desc,
    ROW0: gl.constexpr, CAUSAL: gl.constexpr, BM: gl.constexpr, HG: gl.constexpr,
    BN: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr,
    PRODUCER_REGS: gl.constexpr, num_warps: gl.constexpr,
):
    """o [B, Hq, S, D] and lse [B, Hq, S] for one block of queries; arguments as in
    ``triton_attn.sparsek_attn_fwd_kernel``, then the TMA descriptors of k, v, q and o
    (see descriptors). q and o move through their descriptors only: q_ptr gives the
    dtype, and o_ptr stays so that the three attention kernels share one argument list.
    num_warps = 4 (the first consumer); a second consumer (128 rows) and the producer add
    four warps each. With one consumer, its registers are what the producer leaves of the
    kernel's cap."""
    M: gl.constexpr = HG * BM
    M2: gl.constexpr = CONSUMER_ROWS
    CONSUMERS: gl.constexpr = M // M2
    NL: gl.constexpr = 8
    dtype: gl.constexpr = q_ptr.dtype.element_ty
    ld: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (D // 8), D // 8], [num_warps, 1],
                                        [1, 0])
    smem: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16,
                                              rank=2)
    flat: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])

    # The block's queries, each consumer's rows in its own slot, copied by the producer
    # (_query_boxes): 2.8-3.6% less time than loading them here before the partitions
    # start (NOTES v22). Each consumer's slot holds its o at the end.
    q_smem = gl.allocate_shared_memory(dtype, [CONSUMERS, M2, D], smem)
    q_bar = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout()).index(0)
    mbarrier.init(q_bar, count=1)

    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BN, D], smem)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES + 1, BN, D], smem)
    u_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BN], flat)
    r_smem = gl.allocate_shared_memory(gl.int32, [STAGES, BN], flat)
    # NL rows of ones, times which p gives the rows' sums on the tensor cores.
    ones_smem = gl.allocate_shared_memory(
        dtype, [NL, BN], gl.NVMMASharedLayout.get_default_for([NL, BN], dtype),
        value=gl.full([NL, BN], 1.0, dtype, ld))
    # Two barriers a slot of either ring: its tile ready (one arrival per producer thread,
    # and one more: a list tile's plain, a dense tile's with its TMA copy's bytes) and free
    # (one per consumer). Each kind is an allocation of its own: the compiler's
    # shared-memory hazard analysis sees one allocation as one buffer, so with all four in
    # one, every wait after an arrive (on any slot) took a barrier of the partition's warps
    # (four a tile in the producer, down to one).
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES + 1, 1], mbarrier.MBarrierLayout())
    v_free = gl.allocate_shared_memory(gl.int64, [STAGES + 1, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=128 + 1)
        mbarrier.init(k_free.index(i), count=CONSUMERS)
    for i in gl.static_range(STAGES + 1):
        mbarrier.init(v_ready.index(i), count=128 + 1)
        mbarrier.init(v_free.index(i), count=CONSUMERS)
    gl.thread_barrier()

    # The rings and their barriers, as every partition takes them.
    rings = (k_smem, v_smem, u_smem, r_smem, k_ready, k_free, v_ready, v_free)
    # The partitions' arguments are written out in each call: constexprs packed into a
    # tuple variable would lose their constness.
    if CONSUMERS == 2:
        gl.warp_specialize([
            (_consumer, (q_bar, q_smem, ones_smem, rings, tau_ptr, rk_ptr, cnt_ptr, o_desc,
                         lse_ptr, S, Hq, Hkv, K, W, qk_scale, 0, ROW0, CAUSAL, BM, HG, BN, D,
                         STAGES)),
            (_consumer, (q_bar, q_smem, ones_smem, rings, tau_ptr, rk_ptr, cnt_ptr, o_desc,
                         lse_ptr, S, Hq, Hkv, K, W, qk_scale, 1, ROW0, CAUSAL, BM, HG, BN, D,
                         STAGES)),
            (_producer, (q_desc, q_smem, q_bar, k_ptr, v_ptr, k_desc, v_desc, u_ptr, rank_ptr,
                         g_ptr, cnt_ptr, rings, S, Hq, Hkv, NBG, K, W, ROW0, CAUSAL, BM, HG,
                         BN, D, STAGES)),
        ], [4, 4], [CONSUMER_REGS, PRODUCER_REGS])
    else:
        gl.warp_specialize([
            (_consumer, (q_bar, q_smem, ones_smem, rings, tau_ptr, rk_ptr, cnt_ptr, o_desc,
                         lse_ptr, S, Hq, Hkv, K, W, qk_scale, 0, ROW0, CAUSAL, BM, HG, BN, D,
                         STAGES)),
            (_producer, (q_desc, q_smem, q_bar, k_ptr, v_ptr, k_desc, v_desc, u_ptr, rank_ptr,
                         g_ptr, cnt_ptr, rings, S, Hq, Hkv, NBG, K, W, ROW0, CAUSAL, BM, HG,
                         BN, D, STAGES)),
        ], [4], [PRODUCER_REGS])


# Per rows a program: (keys per tile, key ring slots (the value ring has one more),
# consumer registers, producer registers), tuned per shape. The kernel's register cap
# (maxnreg) is what its warpgroups share:
# 65536 registers an SM over 384 threads (128 rows, one program an SM), rounded down to
# 8 -> 168 (2 x 216 + 72 = 3 x 168); over 2 x 256 threads for 64 rows (two programs an
# SM) -> 128, where the one consumer gets what the producer leaves (208 + 48 = 2 x 128).
# Measured on the H100 (NOTES v16 to v21): long-64k 64 x 4 at 216/72 7.24-7.43 ms, at
# 224/56 7.47-7.59 while its producer spilled (v17, v18); since v18's leaner producer it
# no longer spills but only ties 216/72 (6.62-6.79 against 6.65-6.70 ms, v19), so it is
# not tried; 232/40 made the producer spill (v16); 128 keys a tile spill in the
# consumers and took 8.4 (v16), and still spill with the gates after the row maximum
# (7.39-8.79 ms against 6.36-6.74, v21). Two programs of 64 rows an SM need two sets
# of rings in shared memory: at most 2 key slots of 64 keys (D = 128, 100596 bytes a
# program). gpt4-4k: 64 x 2 at 208/48 6.81 ms, 200/56 6.88, 216/40 7.01 (the producer
# spills), 64 x 3 (one program an SM) 9.97; 32-key tiles (4 slots) took 7.70 and are no
# longer offered: the dense range's TMA box is one tile of TILE_KEYS keys. Since the
# queries and outputs move by TMA (v22), 216/40 no longer spills and ties 208/48 (0.994),
# and long-64k's 224/56 ties 216/72 (0.998).
WS_CONFIGS = {128: [(64, 4, 216, 72), (64, 3, 216, 72)],
              64: [(64, 2, 208, 48), (64, 2, 200, 56)]}
WS_MAXNREG = {128: 168, 64: 128}
ROWS = tuple(sorted(WS_CONFIGS))  # rows a program: 64 a consumer warpgroup (a product's height)


def warps(rows: int) -> int:
    """Warps of a program of `rows` rows: four a consumer, and four for the producer."""
    return 4 * (rows // 64 + 1)


def supported(q: torch.Tensor, rows: int) -> bool:
    """Whether this kernel serves q with programs of `rows` rows: float16 or bfloat16 on
    a Hopper GPU, 64 or 128 rows a program."""
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and rows in ROWS
            and torch.cuda.get_device_capability(q.device) == (9, 0))


def launch_kwargs(block_n: int, stages: int, consumer_regs: int | None = None,
                  producer_regs: int | None = None, rows: int = 128) -> dict:
    """Launch options of one tile for programs of `rows` rows (64 or 128): block_n keys a
    step (TILE_KEYS), stages (>= 2) key ring slots (the value ring gets one more), and the
    registers of each consumer and of the producer (the first tuned tile's when not given):
    multiples of 8 from 24 to 256 (setmaxnreg's range), every warpgroup together within
    the kernel's cap, consumers * consumer_regs + producer_regs <= (consumers + 1) *
    WS_MAXNREG[rows], exactly that with one consumer (it gets what the producer leaves)."""
    if rows not in ROWS:
        raise ValueError(f"the warp-specialized attention kernel runs programs of "
                         f"{' or '.join(map(str, ROWS))} rows; got {rows}")
    if block_n != TILE_KEYS:
        raise ValueError(f"the warp-specialized attention kernel takes tiles of "
                         f"block_n={TILE_KEYS} keys (its TMA box); got {block_n}")
    if stages < 2:
        raise ValueError(f"the warp-specialized attention kernel needs at least 2 "
                         f"shared-memory slots; got {stages}")
    first = WS_CONFIGS[rows][0]
    consumer_regs = first[2] if consumer_regs is None else consumer_regs
    producer_regs = first[3] if producer_regs is None else producer_regs
    for name, regs in (("consumer_regs", consumer_regs), ("producer_regs", producer_regs)):
        if regs % 8 or not 24 <= regs <= 256:
            raise ValueError(f"{name} must be a multiple of 8 from 24 to 256; got {regs}")
    consumers, cap = rows // 64, WS_MAXNREG[rows]
    if consumers * consumer_regs + producer_regs > (consumers + 1) * cap:
        raise ValueError(f"{consumers} x consumer_regs + producer_regs must be at most "
                         f"{(consumers + 1) * cap} ({consumers + 1} warpgroups under the "
                         f"kernel's cap of {cap} a thread); got {consumers} x "
                         f"{consumer_regs} + {producer_regs}")
    if consumers == 1 and consumer_regs + producer_regs != 2 * cap:
        # The one consumer is the kernel's first partition, which gets what the producer
        # leaves: a smaller count would be a label the kernel does not run with.
        raise ValueError(f"with one consumer, consumer_regs is what the producer leaves: "
                         f"2 x {cap} - {producer_regs} = {2 * cap - producer_regs}; got "
                         f"{consumer_regs}")
    return dict(BN=block_n, STAGES=stages, CONSUMER_REGS=consumer_regs,
                PRODUCER_REGS=producer_regs, num_warps=4, maxnreg=cap)


def descriptors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                block_m: int) -> tuple:
    """The kernel's TMA descriptors of contiguous k, v [B, Hkv, S, D] and q, o [B, Hq, S,
    D], 16-byte aligned (TMA's rule; kernel_args sees to it for q, k and v, the caller
    for o). Each (batch, head) row is seen as [D // 64, S, 64] (64-column lines, then
    positions). A box of k or v is one tile: TILE_KEYS positions by every line, written
    line after line, the order of the kernel's swizzled slots; a box of q or o is
    min(block_m, 64) queries (at most one consumer's rows) by one line. Positions outside
    [0, S) read as zeros and are not written."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    bits = torch.finfo(q.dtype).bits
    layout = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=bits, rank=4)

    def lines(x, rows, per_box):
        batch, heads, seq, dim = x.shape
        return TensorDescriptor(x, [batch * heads, dim // 64, seq, 64],
                                [seq * dim, 64, dim, 1], [1, per_box, rows, 64], layout)

    dim = q.shape[-1]
    rows = min(block_m, CONSUMER_ROWS.value)
    return (lines(k, TILE_KEYS, dim // 64), lines(v, TILE_KEYS, dim // 64),
            lines(q, rows, 1), lines(o, rows, 1))


def kernel_args(args: tuple, block_m: int) -> tuple:
    """This kernel's positional arguments from the Triton kernel's (``args`` of
    ``triton_fwd.attention_launch``, blocks of block_m queries): the same, then k, v, q
    and o's descriptors. A q, k or v that does not start on a 16-byte boundary (a view
    into its storage) is copied: TMA and the 16-byte row copies both need the alignment.
    o must start on one (ValueError otherwise; launch_forward writes such an o through
    a buffer of its own)."""
    q, k, v = (x if x.data_ptr() % 16 == 0 else x.clone() for x in args[:3])
    o = args[9]
    if o.data_ptr() % 16:
        raise ValueError("the warp-specialized kernel writes o by TMA, which needs o to "
                         "start on a 16-byte boundary; pass a buffer that does")
    return (q, k, v, *args[3:]) + descriptors(q, k, v, o, block_m)


_TUNED: dict = {}


def tuned(rows: int = 128):
    """The kernel tuned over WS_CONFIGS[rows]."""
    if rows not in _TUNED:
        _TUNED[rows] = triton.autotune(
            configs=[triton.Config({"BN": bn, "STAGES": st, "CONSUMER_REGS": c,
                                    "PRODUCER_REGS": p}, num_warps=4,
                                   maxnreg=WS_MAXNREG[rows])
                     for bn, st, c, p in WS_CONFIGS[rows]],
            key=["S", "Hq", "Hkv", "K", "W", "CAUSAL", "BM", "HG", "D"],
        )(sparsek_attn_fwd_ws)
    return _TUNED[rows]


def tuners() -> list:
    """The tuned kernels made so far (one per program size)."""
    return list(_TUNED.values())
