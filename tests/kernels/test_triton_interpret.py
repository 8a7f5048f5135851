"""The fused Triton forward on the CPU, through the Triton interpreter.

Every case runs the kernels into NaN-poisoned o and lse buffers and compares both with
the float64 reference; fp16/bf16 must also stay within twice the error of the PyTorch
reference run in the same precision (the contract's bar). The selection itself (threshold,
selected set) is checked against ``sparsek_mask`` on score patterns chosen to break it:
ties, constants, monotone and steep scores. Shapes are tiny, so the file runs in a few
minutes on two cores; the interpreter is switched on for this module only.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from sparsek.reference import sparsek_mask
from tests.kernels.triton_check import (
    check_against_reference,
    forward,
    rel,
)

# Every module with a @triton.jit kernel, dependencies first (triton_fwd imports the rest).
KERNEL_MODULES = ("sparsek.triton_select", "sparsek.triton_select_noncausal",
                  "sparsek.triton_select_scan", "sparsek.triton_attn", "sparsek.triton_fwd")
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _load_kernels(interpret: bool) -> None:
    """Import (or re-import) the kernel modules with the interpreter on or off: Triton
    decides at decoration time, so modules imported earlier in this process must be
    reloaded for the setting to reach them."""
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    for name in KERNEL_MODULES:
        if name in sys.modules:
            importlib.reload(sys.modules[name])
        else:
            importlib.import_module(name)


@pytest.fixture(scope="module", autouse=True)
def interpreter():
    if "triton.experimental.gluon" in sys.modules and not os.environ.get("TRITON_INTERPRET"):
        # Seen with Triton 3.9: after a Gluon import in compiled mode (the Hopper kernel,
        # imported by GPU tests earlier in this process), interpreted kernels fail with
        # "Cannot call @triton.jit'd outside of the scope of a kernel".
        pytest.skip("Gluon was imported before the interpreter was switched on; run "
                    "tests/kernels/test_triton_interpret.py in a process of its own")
    before = os.environ.get("TRITON_INTERPRET")
    _load_kernels(True)
    yield
    if before is None:
        _load_kernels(False)
    else:
        os.environ["TRITON_INTERPRET"] = before


# (B, Hq, Hkv, S, D, K, W, causal, dtype): S in {1, 63, 100, 257}, K in {0, 1, 7, >= S},
# W in {0, 1, 16}, GQA groups 1, 4 and 8, D 64 and 128, all three dtypes.
CASES = [
    (1, 1, 1, 1, 64, 1, 1, True, F32),
    (1, 2, 2, 1, 64, 0, 0, False, BF16),  # empty rows: o = 0, lse = -inf
    (1, 4, 1, 63, 64, 7, 16, True, BF16),
    (1, 4, 1, 63, 64, 7, 16, False, F16),
    (1, 2, 2, 100, 64, 1, 0, True, F32),
    (1, 2, 2, 100, 64, 1, 0, False, BF16),
    (1, 8, 1, 100, 128, 7, 1, True, BF16),
    (1, 8, 1, 100, 128, 7, 1, False, F16),
    (1, 1, 1, 63, 128, 0, 16, True, F16),  # window only
    (1, 1, 1, 63, 64, 0, 0, True, F32),
    (2, 2, 1, 257, 64, 7, 16, True, BF16),
    (1, 4, 1, 257, 128, 33, 1, False, BF16),
    (1, 1, 1, 257, 64, 300, 0, True, F32),  # K >= S: dense
    (1, 1, 1, 100, 64, 100, 16, False, F32),
    (1, 4, 4, 63, 64, 7, 100, False, F32),  # W >= S: dense
    # W above a block plus a key tile: the dense range has keys in every query's window,
    # which the attention kernel folds without a mask
    (1, 2, 1, 200, 64, 12, 70, True, BF16),
    (1, 2, 1, 200, 64, 12, 70, False, F32),
]


@pytest.mark.parametrize(("B", "Hq", "Hkv", "S", "D", "K", "W", "causal", "dtype"), CASES)
def test_forward_matches_reference(make_inputs, B, Hq, Hkv, S, D, K, W, causal, dtype):
    x = make_inputs(batch=B, q_heads=Hq, kv_heads=Hkv, seq_len=S, dim=D, dtype=dtype)
    check_against_reference(x, dtype, kv_budget=K, window=W, causal=causal, scale=None)


@pytest.mark.parametrize("causal", [True, False])
def test_ties_in_scores_follow_the_smaller_position(make_inputs, causal):
    x = make_inputs(q_heads=2, kv_heads=1, seq_len=100, dim=64, dtype=F32, u_levels=5)
    check_against_reference(x, F32, kv_budget=7, window=1, causal=causal, scale=0.3)


@pytest.mark.parametrize("causal", [True, False])
def test_logits_far_apart_rescale_the_running_sums(make_inputs, causal):
    # A large scale spreads the logits over a hundred log2 units, so a row's running
    # maximum keeps rising from tile to tile and the sums taken against the old one must
    # be rescaled, in the list, the dense range and the window-only tiles alike.
    x = make_inputs(q_heads=2, kv_heads=1, seq_len=200, dim=64, dtype=F32)
    check_against_reference(x, F32, kv_budget=12, window=70, causal=causal, scale=2.0)


@pytest.mark.parametrize("causal", [True, False])
def test_rows_over_one_launch_take_several(make_inputs, monkeypatch, causal):
    # Beyond ROWS_PER_LAUNCH (batch, kv head) rows (65535 on a GPU: a grid's second
    # dimension) the attention is launched once per slice of rows.
    from sparsek import triton_fwd

    monkeypatch.setattr(triton_fwd, "ROWS_PER_LAUNCH", 2)
    x = make_inputs(batch=5, q_heads=2, kv_heads=1, seq_len=40, dim=64, dtype=F32)
    check_against_reference(x, F32, kv_budget=5, window=3, causal=causal, scale=None)


@pytest.mark.parametrize("causal", [True, False])
def test_budget_at_least_length_is_dense_attention(make_inputs, causal):
    x = make_inputs(q_heads=2, kv_heads=2, seq_len=63, dim=64, dtype=F32)
    o, lse = forward(x, kv_budget=63, window=5, causal=causal, scale=None)
    x64 = x.to(torch.float64)
    want = F.scaled_dot_product_attention(x64.q, x64.k, x64.v, is_causal=causal)
    assert rel(o, want) < 1e-5


def _selected(sel, S: int, K: int, W: int, causal: bool, block: int) -> torch.Tensor:
    """The selected sets [BH, S, S] that the kernels' (lists, cnt, rk) describe."""
    rank = sel.rank.long()
    keys = torch.arange(S)
    out = torch.zeros(rank.shape[0], S, S, dtype=torch.bool)
    for i in range(S):
        b = i // block
        lo = max(b * block - W + 1, 0)
        hi = b * block + block - 1 + (0 if causal else W - 1)
        if not causal and W == 0:
            lo, hi = 0, -1
        dist = i - keys
        cand = dist >= W if causal else dist.abs() >= W
        dense = (keys >= lo) & (keys <= min(hi, S - 1)) & cand
        out[:, i] = dense[None, :] & (rank <= sel.rk[:, i, None])
        for bh in range(rank.shape[0]):
            c = int(sel.cnt[bh, i])
            if c:
                out[bh, i, sel.lists[bh, b, :c].long()] = True
    return out


SCORE_PATTERNS = {
    "ties": lambda g, s: torch.randint(0, 4, (2, 1, s), generator=g).float() * 0.5,
    "constant": lambda g, s: torch.full((2, 1, s), 0.3),
    "increasing": lambda g, s: torch.arange(s).float().expand(2, 1, s) * 0.05,
    "decreasing": lambda g, s: -torch.arange(s).float().expand(2, 1, s) * 0.05,
    "steep": lambda g, s: torch.arange(s).float().expand(2, 1, s) * 3.0,
    "wide": lambda g, s: torch.randn(2, 1, s, generator=g) * 100,
}


def _check_selection(u: torch.Tensor, K: int, W: int, causal: bool, block_m: int = 64) -> None:
    """select() on scores u [B, 1, S] (blocks of block_m) gives exactly the mask's selected
    sets, and its thresholds within float32 rounding of the float64 ones."""
    from sparsek.triton_fwd import ForwardConfig, select

    S = u.shape[-1]
    cfg = ForwardConfig(block_m=block_m, heads=1, block_n=16, chunk=16, num_warps=4,
                        num_stages=1)
    sel = select(u, K, W, causal, cfg)
    mask = sparsek_mask(u, kv_budget=K, window=W, causal=causal)
    assert torch.equal(_selected(sel, S, K, W, causal, block_m),
                       mask.selected.reshape(-1, S, S))
    want = mask.tau.reshape(-1, S)
    kept_all = torch.isneginf(want)
    assert torch.equal(torch.isneginf(sel.tau), kept_all)
    scale = u.abs().max().clamp(min=1.0)
    assert float((sel.tau.double() - want)[~kept_all].abs().max()) <= 4e-7 * float(scale)


# Causal selection runs two ways: the per-row scan, or (scan off) the per-query
# kernels that also redo any row the scan gives back.
PATHS = [(False, "per-block"), (True, "scan"), (True, "scan in chunks"), (True, "per-query")]


@pytest.mark.parametrize(("causal", "path"), PATHS)
@pytest.mark.parametrize("pattern", sorted(SCORE_PATTERNS))
def test_selection_matches_the_mask(seed, monkeypatch, pattern, causal, path):
    from sparsek import triton_fwd

    block_m = 64
    if path == "per-query":
        monkeypatch.setattr(triton_fwd, "SCAN_MAX_BUDGET", -1)
    if path == "scan in chunks":  # blocks of 16, so that 100 positions make 3 chunks
        monkeypatch.setattr(triton_fwd, "SCAN_CHUNKS", 3)
        block_m = 16
    u = SCORE_PATTERNS[pattern](torch.Generator().manual_seed(seed), 100).contiguous()
    _check_selection(u, 9, 4, causal, block_m)


@pytest.mark.parametrize("pattern", ["ties", "wide", "constant", "increasing", "decreasing"])
def test_per_query_cut_with_lists_longer_than_a_block_matches_the_mask(seed, monkeypatch,
                                                                       pattern):
    # With K above the block's length, the per-query kernel reads only the lists' last
    # block_m entries to rank each query's extras: extras above all of them, inside them
    # and below them, and lists shorter than K (early blocks), must cut as the mask does.
    from sparsek import triton_fwd

    monkeypatch.setattr(triton_fwd, "SCAN_MAX_BUDGET", -1)
    u = SCORE_PATTERNS[pattern](torch.Generator().manual_seed(seed), 150).contiguous()
    _check_selection(u, 40, 4, True, 16)


def _boundary_case(seed, pattern):
    """Scores of 257 positions in one row, with K = 9, W = 4 and blocks of 16: every
    boundary is solved when the scan is off. Returns (u, K, W, cfg, written): written
    [boundaries, K] marks the entries each boundary's list holds."""
    from sparsek import triton_fwd

    u = SCORE_PATTERNS[pattern](torch.Generator().manual_seed(seed), 257).contiguous()
    K, W, block_m = 9, 4, 16
    cfg = triton_fwd.ForwardConfig(block_m=block_m, heads=1, block_n=16, chunk=16,
                                   num_warps=4, num_stages=1)
    n_list = (torch.arange(-(-257 // block_m) + 1) * block_m - W + 1).clamp(0, K)
    return u, K, W, cfg, torch.arange(K)[None, :] < n_list[:, None]


def _assert_same_selection(got, want, written, variant):
    """Two selections agree bit for bit: thresholds, cuts, list counts, written lists."""
    for name in ("tau", "rk", "cnt"):
        assert torch.equal(getattr(got, name), getattr(want, name)), (variant, name)
    assert torch.equal(got.lists[:, written], want.lists[:, written]), variant


@pytest.mark.parametrize("pattern", ["ties", "wide", "constant", "decreasing"])
def test_causal_boundaries_select_the_same_from_the_prefix_tables(seed, monkeypatch, pattern):
    # A boundary walks the shortest prefix table holding its base (the sort's entries at
    # positions below some NL) instead of the whole sort: the same members in the same
    # order, so the same lists and thresholds, bit for bit, whatever the tables.
    from sparsek import triton_fwd

    monkeypatch.setattr(triton_fwd, "SCAN_MAX_BUDGET", -1)  # every boundary is solved
    u, K, W, cfg, written = _boundary_case(seed, pattern)
    # (longest table, shortest at least): none; the rule's two tables (64, 128); one
    # table of 16; six tables, 4 to 128; four from 100 down (100, 50, 25, 12 -> 12 .. 96).
    variants = [(0, 64), (None, 64), (16, 64), (None, 4), (100, 8)]
    runs = {}
    for n_l, shortest in variants:
        monkeypatch.setattr(triton_fwd, "PREFIX_LEN", n_l)
        monkeypatch.setattr(triton_fwd, "PREFIX_MIN_LEN", shortest)
        runs[n_l, shortest] = triton_fwd.select(u, K, W, True, cfg)
    monkeypatch.setattr(triton_fwd, "PREFIX_LEN", 100)
    monkeypatch.setattr(triton_fwd, "PREFIX_MIN_LEN", 8)
    assert triton_fwd.prefix_levels(257) == (12, 4)  # 100 halved while at least 8: 12
    monkeypatch.setattr(triton_fwd, "PREFIX_LEN", None)
    assert triton_fwd.prefix_levels(257) == (8, 5)  # the rule: S / 2 or less, halved to 8
    monkeypatch.setattr(triton_fwd, "PREFIX_MIN_LEN", 64)
    assert triton_fwd.prefix_levels(257) == (64, 2)
    want = runs.pop((0, 64))
    for variant, got in runs.items():
        _assert_same_selection(got, want, written, variant)


@pytest.mark.parametrize("pattern", ["ties", "wide", "constant", "steep"])
def test_chained_boundaries_solve_as_each_alone(seed, monkeypatch, pattern):
    # A program of the boundary kernel solves several consecutive boundaries, each
    # threshold from the one before: the same lists and thresholds as solving each
    # boundary afresh, bit for bit, and the mask's selection.
    from sparsek import triton_fwd

    monkeypatch.setattr(triton_fwd, "SCAN_MAX_BUDGET", -1)  # every boundary is solved
    u, K, W, cfg, written = _boundary_case(seed, pattern)
    runs = {}
    for chain in (1, 3, 17):  # 17: every boundary of a row but the last in one program
        monkeypatch.setattr(triton_fwd, "BOUNDARY_CHAIN", chain)
        runs[chain] = triton_fwd.select(u, K, W, True, cfg)
    want = runs.pop(1)
    for chain, got in runs.items():
        _assert_same_selection(got, want, written, chain)
    _check_selection(u, K, W, True, cfg.block_m)


@pytest.mark.parametrize("pattern", ["randn", "ties"])
def test_noncausal_window_half_the_row_keeps_the_threshold_exact(seed, pattern):
    # W = S / 2 leaves a middle query a handful of candidates: its equation is the whole
    # row's sum less a window sum of 599 terms, which must not lose the difference.
    g = torch.Generator().manual_seed(seed)
    u = (torch.randn(2, 1, 600, generator=g) if pattern == "randn"
         else torch.randint(0, 3, (2, 1, 600), generator=g).float() * 0.5)
    _check_selection(u, 9, 300, False)


@pytest.mark.parametrize("pattern", ["wide", "ties", "constant", "signed zeros"])
def test_noncausal_rows_too_long_for_one_program_select_the_same(seed, monkeypatch, pattern):
    # Rows longer than PREP_MAX_LEN are sorted and bucketed by torch instead of the fused
    # program: the same sort and sums, so the same selection. Signed zeros: the fused
    # sort compares bits, and -0.0 must still tie with 0.0 (position order), as in torch.
    from sparsek import triton_fwd

    gen = torch.Generator().manual_seed(seed)
    u = (torch.where(torch.rand(2, 1, 150, generator=gen) < 0.5, -0.0, 0.0)
         if pattern == "signed zeros" else SCORE_PATTERNS[pattern](gen, 150)).contiguous()
    cfg = triton_fwd.ForwardConfig(block_m=64, heads=1, block_n=16, chunk=16, num_warps=4,
                                   num_stages=1)
    fused = triton_fwd.select(u, 9, 4, False, cfg)
    fused_tables = triton_fwd._noncausal_tables(u.reshape(-1, 150))
    monkeypatch.setattr(triton_fwd, "PREP_MAX_LEN", 0)
    for name in ("lists", "rank", "tau", "rk", "cnt"):
        assert torch.equal(getattr(triton_fwd.select(u, 9, 4, False, cfg), name),
                           getattr(fused, name)), name
    # The sort and the prefix sums are the same numbers either way.
    for got, want in zip(triton_fwd._noncausal_tables(u.reshape(-1, 150))[:4], fused_tables):
        assert torch.equal(got, want)


def test_custom_op_passes_opcheck(make_inputs):
    from sparsek import op

    x = make_inputs(q_heads=2, kv_heads=1, seq_len=20, dim=64, dtype=F32)
    torch.library.opcheck(op.attention_fwd, (x.q, x.k, x.v, x.u, 4, 2, True, 0.125))


@pytest.mark.parametrize("slots", [2, 32])
def test_causal_selection_when_bending_extras_overflow_the_slots(seed, monkeypatch, slots):
    # Few register slots push blocks onto the generic path; both paths must select
    # exactly the same sets.
    from sparsek import triton_fwd

    monkeypatch.setattr(triton_fwd, "SLOTS", slots)
    monkeypatch.setattr(triton_fwd, "SCAN_MAX_BUDGET", -1)
    u = torch.randn(2, 1, 257, generator=torch.Generator().manual_seed(seed))
    _check_selection(u, 20, 8, True)


def _scan_flags(u, K, W, max_ends, monkeypatch):
    """The scan's flags for rows u [rows, 1, S] (one chunk a row, blocks of 64)."""
    from sparsek import triton_fwd

    monkeypatch.setattr(triton_fwd, "SCAN_MAX_ENDS", max_ends)
    scores = u.reshape(u.shape[0], -1).contiguous()
    z, sp, rank = triton_fwd._sort(scores)
    tau, rk, cnt = triton_fwd._per_query(scores)
    flag = torch.zeros(scores.shape[0], dtype=torch.int32)
    triton_fwd.scan_rows(scores, z, sp, rank, tau, rk, cnt, flag, K, W, 64, 1,
                         scores.shape[1], 1)
    return flag.tolist()


def test_the_scan_holds_rows_of_ties_and_redoes_rows_it_gives_up_on(seed, monkeypatch):
    # The scan keeps every walked score (a bitmap over sort ranks), so rows whose scores
    # all sit within 1 of tau (constant, three levels) are its own, like a random row.
    # A row it gives up on (more piece ends crossed for one new score than allowed) is
    # flagged and redone by the per-query kernels: the selection is the mask's either way.
    S, K, W = 257, 7, 4
    gen = torch.Generator().manual_seed(seed)
    u = torch.stack([torch.randn(S, generator=gen), torch.full((S,), 0.3),
                     torch.randint(0, 3, (S,), generator=gen).float()]).reshape(3, 1, S)
    assert _scan_flags(u, K, W, 100, monkeypatch) == [0, 0, 0]
    _check_selection(u, K, W, True)
    # One end a new score: a random row soon needs two (the one it drops, then the root).
    assert _scan_flags(u, K, W, 1, monkeypatch)[0] == 1  # and SCAN_MAX_ENDS stays 1
    _check_selection(u, K, W, True)


def test_scan_register_cap_fits_every_row_in_one_wave():
    from sparsek.triton_fwd import scan_register_cap

    # gpt4-4k on an H100: 1536 one-warp rows on 132 SMs, 12 a SM, so 168 registers
    assert scan_register_cap(1536, 1, 132) == 168
    # rows that fit uncapped get no cap; so many rows that the cap would spill get none
    assert scan_register_cap(128, 4, 132) is None
    assert scan_register_cap(132 * 32, 1, 132) is None
    for rows in range(100, 4000, 37):
        for warps in (1, 4):
            cap = scan_register_cap(rows, warps, 132)
            if cap is not None:
                assert cap % 8 == 0 and 128 <= cap < 255
                assert -(-rows // 132) * warps * 32 * cap <= 65536


@pytest.mark.parametrize(("kernel", "dtype", "message"), [
    ("gluon", torch.bfloat16, "needs float16 or bfloat16 on a Hopper GPU"),
    ("gluon", torch.float32, "needs float16 or bfloat16 on a Hopper GPU"),
    ("ws", torch.bfloat16, "needs float16 or bfloat16 on a Hopper GPU"),
    ("ws", torch.float16, "128 rows a program"),
    ("cuda", torch.bfloat16, "must be 'triton', 'gluon' or 'ws'"),
])
def test_an_explicit_attention_kernel_that_cannot_serve_the_input_is_refused(
        make_inputs, kernel, dtype, message):
    from sparsek.triton_fwd import ForwardConfig, launch_forward

    x = make_inputs(batch=1, q_heads=2, kv_heads=1, seq_len=70, dim=64, dtype=dtype)
    cfg = ForwardConfig(block_m=64, heads=1, block_n=32, chunk=16, num_warps=4,
                        num_stages=3, kernel=kernel)
    o, lse = torch.full_like(x.q, float("nan")), torch.empty(x.q.shape[:3])
    with pytest.raises(ValueError, match=message):
        launch_forward(x.q, x.k, x.v, x.u, 7, 4, True, 0.125, o, lse, config=cfg)
    assert o.isnan().all(), "nothing runs before the refusal"


@pytest.mark.parametrize(("times", "want"), [
    ({"triton": 10.0, "gluon": 8.0}, "gluon"),     # clearly faster: taken
    ({"triton": 10.0, "gluon": 9.8}, "triton"),    # within the margin: the default stays
    ({"triton": 10.0, "gluon": 12.0}, "triton"),
    ({"triton": 10.0}, "triton"),                  # one candidate: not timed at all
])
def test_attention_pick_keeps_the_default_unless_a_candidate_is_clearly_faster(
        monkeypatch, times, want):
    import triton.testing

    from sparsek import triton_fwd

    launched = []
    runs = {name: (lambda name=name: launched.append(name)) for name in times}

    def fake_bench(run, return_mode):
        run()
        return times[launched[-1]]

    if len(times) == 1:
        monkeypatch.setattr(triton.testing, "do_bench", lambda *a, **k: pytest.fail("timed"))
    else:
        monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    monkeypatch.setattr(triton_fwd, "_ATTENTION_PICKS", {})
    assert triton_fwd._pick_attention(("shape",), runs) == want
    n_launched = len(launched)
    assert triton_fwd._pick_attention(("shape",), runs) == want
    assert len(launched) == n_launched, "a shape is timed once per process"
