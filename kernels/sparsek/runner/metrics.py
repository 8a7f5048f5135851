"""Work and traffic of one case: FLOPs, the fewest bytes that must move, and rates.

SparseK is charged for the pairs it attends (``|Wi ∪ Ti|`` per query), dense SDPA for
every allowed pair, so TFLOP/s compares useful work. Counts are exact integers in
closed form: they are needed for 64k-token shapes where a per-query loop in Python
would dominate the report.
"""

from __future__ import annotations

from sparsek_remote.jobspec import Case, SdpaImpl, SparsekImpl

BYTES_PER_ELEMENT = {"bfloat16": 2, "float16": 2, "float32": 4}
SCORE_BYTES = 4  # u is float32 whatever the case dtype


def dense_pairs(S: int, causal: bool) -> int:
    """Number of (query, key) pairs dense attention evaluates."""
    return S * (S + 1) // 2 if causal else S * S


def attended_pairs(S: int, kv_budget: int, window: int, causal: bool) -> int:
    """``sum_i |Wi ∪ Ti|`` over all queries i of one (batch, head): ``|Wi| + min(K, |Ci|)``.

    ``Ti`` is drawn from the candidates ``Ci``, which exclude the window, so the union
    is disjoint.
    """
    if causal:
        return _causal_window_sum(S, window) + _sum_min(kv_budget, S - window)
    if window == 0:
        return S * min(kv_budget, S)
    return _window_sum_noncausal(S, window) + _candidate_sum_noncausal(S, kv_budget, window)


def _sum_min(cap: int, n: int) -> int:
    """``sum_{t=1..n} min(cap, t)``; 0 when n <= 0 or cap <= 0."""
    if n <= 0 or cap <= 0:
        return 0
    if cap >= n:
        return n * (n + 1) // 2
    return cap * (cap + 1) // 2 + (n - cap) * cap


def _causal_window_sum(S: int, W: int) -> int:
    # |Wi| = min(W, i + 1): the window is cut at position 0.
    return _sum_min(W, S)


def _window_sum_noncausal(S: int, W: int) -> int:
    # |Wi| = 1 + min(i, W-1) + min(S-1-i, W-1); the two sides sum alike by symmetry.
    return S + 2 * _sum_min(W - 1, S - 1)


def _candidate_sum_noncausal(S: int, K: int, W: int) -> int:
    """``sum_i min(K, |Ci|)`` for W >= 1, where ``|Ci| = L(i) + R(i)``.

    ``L(i) = max(0, i-W+1)`` candidates lie left of the window and ``R(i) = max(0, S-i-W)``
    right of it. Where both sides are non-empty their sum is the constant S-2W+1;
    where only one is, it moves by one per query, so each stretch is a ``_sum_min``.
    """
    both = max(0, S - 2 * W)
    total = both * min(K, S - 2 * W + 1)
    # Only the left side: i from max(W, S-W) to S-1, |Ci| = i-W+1.
    first_left = max(W, S - W)
    if first_left <= S - 1:
        total += _sum_min(K, S - W) - _sum_min(K, first_left - W)
    # Only the right side: i from 0 to min(W-1, S-W-1), |Ci| = S-i-W.
    last_right = min(W - 1, S - W - 1)
    if last_right >= 0:
        total += _sum_min(K, S - W) - _sum_min(K, S - W - last_right - 1)
    return total


def case_flops(case: Case, impl: SparsekImpl | SdpaImpl) -> int:
    """Forward FLOPs: two matrix products of 2 FLOPs per multiply-add, per attended pair."""
    if isinstance(impl, SparsekImpl):
        pairs = attended_pairs(case.S, case.kv_budget, case.window, case.causal)
    else:
        pairs = dense_pairs(case.S, case.causal)
    return 4 * case.B * case.Hq * case.D * pairs


def case_bytes(case: Case, impl: SparsekImpl | SdpaImpl) -> int:
    """Fewest bytes that must move: q, k, v (and u) read once, o written once."""
    size = BYTES_PER_ELEMENT[case.dtype]
    q_and_o = 2 * case.B * case.Hq * case.S * case.D * size
    k_and_v = 2 * case.B * case.Hkv * case.S * case.D * size
    scores = case.B * case.Hkv * case.S * SCORE_BYTES if isinstance(impl, SparsekImpl) else 0
    return q_and_o + k_and_v + scores


def rates(flops: int, nbytes: int, median_ms: float) -> tuple[float | None, float | None]:
    """(TFLOP/s, GB/s) at the median time; (None, None) when the time is not positive."""
    if median_ms <= 0:
        return None, None
    seconds = median_ms * 1e-3
    return flops / seconds / 1e12, nbytes / seconds / 1e9
