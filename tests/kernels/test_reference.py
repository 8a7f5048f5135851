"""The pure-PyTorch reference against a deliberately naive float64 reading of the semantics.

The naive oracle below loops over queries and keys in Python and finds the threshold by
bisection, so it shares no code and no algorithm with the reference it checks.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import sparsek
from sparsek import reference

BIG = 64  # larger than every S used with it: K >= S or W >= S


def naive_selection(u: list[float], i: int, kv_budget: int, window: int, causal: bool):
    """One query row: (window positions, {selected position: gate}, tau)."""
    n = len(u)
    if causal:
        in_window = [j for j in range(n) if i - window < j <= i]
        candidates = [j for j in range(n) if j <= i - window]
    else:
        in_window = [j for j in range(n) if abs(i - j) < window]
        candidates = [j for j in range(n) if abs(i - j) >= window]
    if len(candidates) <= kv_budget:
        return in_window, {j: 1.0 for j in candidates}, -math.inf
    if kv_budget == 0:
        return in_window, {}, math.inf
    top = sorted(candidates, key=lambda j: (-u[j], j))[:kv_budget]

    def mass(t: float) -> float:
        return sum(min(max(u[j] - t, 0.0), 1.0) for j in candidates)

    # mass is non-increasing, >= K at z_K - 1 and < K at z_K: bisect to the last float.
    lo, hi = u[top[-1]] - 1.0, u[top[-1]]
    while (mid := (lo + hi) / 2) not in (lo, hi):
        lo, hi = (mid, hi) if mass(mid) >= kv_budget else (lo, mid)
    return in_window, {j: min(max(u[j] - lo, 0.0), 1.0) for j in top}, lo


def naive_attention(x, kv_budget: int, window: int, causal: bool, scale: float):
    """Loops over every (b, query head, i); returns o, lse, selected, window, gates, tau."""
    batch, q_heads, seq_len, _ = x.q.shape
    kv_heads = x.k.shape[1]
    o = torch.zeros_like(x.q, dtype=torch.float64)
    lse = torch.full((batch, q_heads, seq_len), -math.inf, dtype=torch.float64)
    rows = (batch, kv_heads, seq_len, seq_len)
    selected, in_window = torch.zeros(rows, dtype=torch.bool), torch.zeros(rows, dtype=torch.bool)
    gates, tau = torch.zeros(rows, dtype=torch.float64), torch.zeros(rows[:3], dtype=torch.float64)
    for b in range(batch):
        for h in range(q_heads):
            kvh = h // (q_heads // kv_heads)
            u = x.u[b, kvh].double().tolist()
            for i in range(seq_len):
                win, top, t = naive_selection(u, i, kv_budget, window, causal)
                tau[b, kvh, i] = t
                weights = {j: 1.0 for j in win} | top
                for j, g in weights.items():
                    gates[b, kvh, i, j] = g
                    selected[b, kvh, i, j] = j in top
                    in_window[b, kvh, i, j] = j in win
                if not weights:
                    continue
                q, k, v = x.q[b, h, i].double(), x.k[b, kvh].double(), x.v[b, kvh].double()
                num, den = torch.zeros_like(q), 0.0
                for j, g in weights.items():
                    w = g * math.exp(scale * float(q @ k[j]))
                    num, den = num + w * v[j], den + w
                o[b, h, i], lse[b, h, i] = num / den, math.log(den)
    return o, lse, sparsek.SparsekMask(selected, in_window, gates, tau)


def run_reference(x, kv_budget, window, causal, scale=None, **kw):
    return sparsek.sparsek_attention_reference(
        x.q, x.k, x.v, x.u, kv_budget=kv_budget, window=window, causal=causal, scale=scale, **kw
    )


def assert_matches_naive(x, kv_budget, window, causal):
    scale = x.q.shape[-1] ** -0.5
    want_o, want_lse, want = naive_attention(x, kv_budget, window, causal, scale)
    o, lse = run_reference(x, kv_budget, window, causal)
    got = sparsek.sparsek_mask(x.u, kv_budget=kv_budget, window=window, causal=causal)
    assert torch.equal(got.selected, want.selected)
    assert torch.equal(got.window, want.window)
    torch.testing.assert_close(got.gates, want.gates, rtol=0, atol=1e-12)
    torch.testing.assert_close(got.tau, want.tau, rtol=0, atol=1e-12)
    torch.testing.assert_close(o, want_o, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("window", [0, 1, 5, BIG])
@pytest.mark.parametrize("kv_budget", [0, 1, 7, BIG])
@pytest.mark.parametrize("seq_len", [1, 7, 33])
@pytest.mark.parametrize("causal", [True, False])
def test_matches_naive(make_inputs, causal, seq_len, kv_budget, window):
    x = make_inputs(batch=2, q_heads=4, kv_heads=2, seq_len=seq_len, dim=12)
    assert_matches_naive(x, kv_budget, window, causal)


@pytest.mark.parametrize("window", [0, 3])
@pytest.mark.parametrize("kv_budget", [3, 7])
@pytest.mark.parametrize("causal", [True, False])
def test_ties_break_to_smaller_position(make_inputs, causal, kv_budget, window):
    x = make_inputs(seq_len=33, u_levels=4)
    assert len(torch.unique(x.u)) <= 4
    assert_matches_naive(x, kv_budget, window, causal)


@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("causal", [True, False])
def test_gqa_groups(make_inputs, causal, group):
    x = make_inputs(q_heads=2 * group, kv_heads=2, seq_len=20, dim=8)
    assert_matches_naive(x, 5, 3, causal)


@pytest.mark.parametrize("causal", [True, False])
def test_gates_on_candidates_sum_to_budget(make_inputs, causal):
    x = make_inputs(batch=2, seq_len=60)
    kv_budget, window = 6, 4
    mask = sparsek.sparsek_mask(x.u, kv_budget=kv_budget, window=window, causal=causal)
    keys = torch.arange(60)
    dist = keys[:, None] - keys[None, :]
    candidate = dist >= window if causal else dist.abs() >= window
    soft = (x.u.double()[:, :, None, :] - mask.tau[..., None]).clamp(0, 1)
    crowded = candidate.sum(-1) > kv_budget  # [S]: rows where the threshold is finite
    assert crowded.any() and (crowded.all() != causal)  # causal: the first rows are not
    total = (soft * candidate).sum(-1)[..., crowded]
    torch.testing.assert_close(total, torch.full_like(total, kv_budget), rtol=0, atol=1e-12)
    assert (mask.selected.sum(-1)[..., crowded] == kv_budget).all()
    assert (mask.gates[mask.selected] > 0).all()
    assert torch.isneginf(mask.tau[..., ~crowded]).all()


@pytest.mark.parametrize("limit", ["kv_budget", "window"])
@pytest.mark.parametrize("causal", [True, False])
def test_budget_or_window_at_least_s_is_dense_attention(make_inputs, causal, limit):
    x = make_inputs(batch=2, q_heads=8, kv_heads=2, seq_len=37, dim=16)
    settings = {"kv_budget": 3, "window": 2, limit: 37}
    o, lse = run_reference(x, causal=causal, **settings)
    want = F.scaled_dot_product_attention(x.q, x.k, x.v, is_causal=causal, enable_gqa=True)
    torch.testing.assert_close(o, want, rtol=1e-10, atol=1e-12)
    logits = x.q @ x.k.repeat_interleave(4, dim=1).transpose(-1, -2) / 4.0
    if causal:
        logits = logits.masked_fill(torch.ones(37, 37, dtype=torch.bool).triu(1), -math.inf)
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
def test_nothing_to_attend_gives_zero_and_minus_inf(make_inputs, causal, dtype):
    x = make_inputs(seq_len=9, dtype=dtype)
    o, lse = run_reference(x, kv_budget=0, window=0, causal=causal)
    assert o.dtype == dtype and torch.equal(o, torch.zeros_like(o))
    assert torch.isneginf(lse).all()


def test_first_causal_rows_with_window_only_are_not_empty(make_inputs):
    x = make_inputs(seq_len=9)
    o, lse = run_reference(x, kv_budget=0, window=1, causal=True)
    torch.testing.assert_close(o, x.v.repeat_interleave(2, dim=1), rtol=0, atol=0)
    assert torch.isfinite(lse).all()


@pytest.mark.parametrize("kv_budget,window", [(0, 0), (1, 0), (8, 0), (32, 16)])
def test_tau_never_decreases_along_a_causal_sequence(make_inputs, kv_budget, window):
    x = make_inputs(batch=3, kv_heads=4, seq_len=300)
    tau = sparsek.sparsek_mask(x.u, kv_budget=kv_budget, window=window, causal=True).tau
    assert (tau[..., 1:] >= tau[..., :-1]).all()
    assert math.isfinite(tau[0, 0, -1]) or kv_budget == 0


@pytest.mark.parametrize("causal", [True, False])
def test_query_index_gives_the_same_rows(make_inputs, causal):
    x = make_inputs(batch=2, seq_len=50)
    rows = torch.tensor([49, 0, 17, 17, 3, 31])
    o_all, lse_all = run_reference(x, 6, 4, causal)
    o, lse = run_reference(x, 6, 4, causal, query_index=rows)
    torch.testing.assert_close(o, o_all[:, :, rows], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(lse, lse_all[:, :, rows], rtol=1e-12, atol=1e-14)
    mask_all = sparsek.sparsek_mask(x.u, kv_budget=6, window=4, causal=causal)
    mask = sparsek.sparsek_mask(x.u, kv_budget=6, window=4, causal=causal, query_index=rows)
    assert torch.equal(mask.selected, mask_all.selected[:, :, rows])
    torch.testing.assert_close(mask.gates, mask_all.gates[:, :, rows], rtol=0, atol=1e-14)


def test_chunking_over_queries_changes_nothing(make_inputs, monkeypatch):
    x = make_inputs(batch=2, seq_len=41)
    whole = run_reference(x, 5, 3, True)
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 1)
    for got, want in zip(run_reference(x, 5, 3, True), whole, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


@pytest.mark.parametrize(
    "dtype,low,high",
    [
        (torch.bfloat16, 1e-4, 1e-2),
        (torch.float16, 1e-5, 1e-2),
        (torch.float32, 1e-9, 1e-5),
    ],
)
def test_low_precision_error_is_small_but_real(make_inputs, dtype, low, high):
    x = make_inputs(batch=2, q_heads=4, kv_heads=2, seq_len=64, dim=64)
    want_o, want_lse = run_reference(x, 8, 8, True)
    o, lse = run_reference(x.to(dtype), 8, 8, True)
    assert o.dtype == dtype and lse.dtype == torch.float32
    assert low < relative_error(o, want_o) < high
    assert relative_error(lse, want_lse) < high


def test_public_attention_writes_into_out(make_inputs, poisoned):
    x = make_inputs(seq_len=19, dtype=torch.bfloat16)
    out = poisoned(x.q)
    o, lse = sparsek.sparsek_attention(
        x.q, x.k, x.v, x.u, kv_budget=4, window=2, impl="reference", return_lse=True, out=out
    )
    want_o, want_lse = run_reference(x, 4, 2, True)
    assert o is out and torch.equal(out, want_o) and torch.equal(lse, want_lse)


def test_scorer_is_linear_in_x_plus_a_position_slope(seed):
    gen = torch.Generator().manual_seed(seed)
    scorer = sparsek.SparseKScorer(d_model=24, kv_heads=3)
    with torch.no_grad():
        scorer.slope.copy_(torch.tensor([0.5, -0.25, 0.0]))
    x = torch.randn(2, 11, 24, generator=gen, dtype=torch.bfloat16)
    u = scorer(x)
    assert u.shape == (2, 3, 11) and u.dtype == torch.float32
    position = torch.arange(11.0)
    want = torch.einsum("bsd,dh->bhs", x.float(), scorer.w_score) + scorer.slope[:, None] * position
    torch.testing.assert_close(u, want)
    shifted = scorer(x, positions=torch.arange(100, 111))
    torch.testing.assert_close(shifted - u, (100 * scorer.slope)[None, :, None].expand_as(u))
    u.sum().backward()
    assert scorer.w_score.grad is not None and scorer.slope.grad is not None
