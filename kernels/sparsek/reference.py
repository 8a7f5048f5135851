"""Pure-PyTorch SparseK attention: the executable form of the semantics.

This module is the oracle the Triton kernels are checked against, so it favours
plain, vectorized tensor code over speed: it builds the dense gate matrix for a
chunk of queries and runs masked softmax attention on it. Memory is bounded by
processing queries in chunks, never by approximating.

Selection per (batch, kv head, query i), with candidates ``Ci`` and window ``Wi``:
if ``|Ci| <= K`` every candidate is kept with gate 1; otherwise ``tau_i`` solves
``sum_{j in Ci} clip(u_j - tau_i, 0, 1) = K`` exactly (largest solution, so
``tau_i`` lies in ``[z_K - 1, z_K)``), the ``K`` best candidates (ties: smaller
position first) get gate ``clip(u_j - tau_i, 0, 1)``, and window pairs get gate 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparsek._checks import (
    check_attention_inputs,
    check_causal,
    check_non_negative_int,
    check_query_index,
    check_scores_alone,
)

# Elements of one chunk's [B, Hq, chunk, S] logits; bounds the reference's memory.
CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class SparsekMask:
    """The selection for a set of query rows, per kv head (shared by its query heads).

    Attributes:
        selected: bool [B, Hkv, Sq, S], the selected set Ti (a subset of the candidates).
        window: bool [B, Hkv, Sq, S], the window set Wi.
        gates: float64 [B, Hkv, Sq, S], g: 1 on Wi, clip(u - tau, 0, 1) on Ti, 0 elsewhere.
        tau: float64 [B, Hkv, Sq], the threshold. ``-inf`` where ``|Ci| <= K`` (every
            candidate kept with gate 1); ``+inf`` where ``K == 0 < |Ci|`` (nothing selected).
    """

    selected: torch.Tensor
    window: torch.Tensor
    gates: torch.Tensor
    tau: torch.Tensor


def _position_sets(
    positions: torch.Tensor, seq_len: int, window: int, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Window and candidate sets for query positions [Sq] -> (bool [Sq, S], bool [Sq, S])."""
    keys = torch.arange(seq_len, device=positions.device)
    dist = positions[:, None] - keys[None, :]
    if causal:
        return (dist >= 0) & (dist < window), dist >= window
    return dist.abs() < window, dist.abs() >= window


def _pieces(asc: torch.Tensor, asc_minus_one: torch.Tensor, t: torch.Tensor, strict: bool):
    """Counts at points t [R, m] over sorted scores z: (#{z - 1 >= t}, #{z > t} or #{z >= t}).

    ``asc`` [R, n] holds z ascending and ``asc_minus_one`` holds z - 1 ascending; the
    first count is the number of entries clipped at 1, the second the number above t.
    """
    n = asc.shape[-1]
    at_one = n - torch.searchsorted(asc_minus_one, t, side="left")
    above = n - torch.searchsorted(asc, t, side="right" if strict else "left")
    return at_one, above


def capped_simplex_threshold(desc: torch.Tensor, budget: int) -> torch.Tensor:
    """Largest tau with sum_j clip(z_j - tau, 0, 1) = budget, exactly; rows independent.

    ``sum_j clip(z_j - tau, 0, 1)`` is piecewise linear in tau with breakpoints at z_j and
    z_j - 1. Evaluate it at every breakpoint from prefix sums, take the last breakpoint
    where it is still >= budget, and solve the linear piece to its right in closed form.

    Args:
        desc: float64 [R, n], scores sorted descending; requires 1 <= budget < n per row.
        budget: K.

    Returns:
        float64 [R], tau in [z_K - 1, z_K).
    """
    minus_one = desc - 1
    asc, asc_minus_one = desc.flip(-1).contiguous(), minus_one.flip(-1).contiguous()
    prefix = F.pad(desc.cumsum(-1), (1, 0))  # [R, n + 1]
    breaks = torch.cat([desc, minus_one], -1).sort(-1).values  # [R, 2n] ascending
    at_one, above = _pieces(asc, asc_minus_one, breaks, strict=True)
    partial = prefix.gather(-1, above) - prefix.gather(-1, at_one)
    total = at_one + partial - (above - at_one) * breaks  # the sum at each breakpoint
    order = torch.arange(breaks.shape[-1], device=desc.device)
    last = torch.where(total >= budget, order, -1).amax(-1, keepdim=True)  # [R, 1]
    right = breaks.gather(-1, (last + 1).clamp(max=breaks.shape[-1] - 1))
    at_one, above = _pieces(asc, asc_minus_one, right, strict=False)
    partial = prefix.gather(-1, above) - prefix.gather(-1, at_one)
    slope = (above - at_one).clamp(min=1)
    return ((partial + at_one - budget) / slope).squeeze(-1)


def _mask_rows(
    u: torch.Tensor, positions: torch.Tensor, kv_budget: int, window: int, causal: bool
) -> SparsekMask:
    """The selection of query rows ``positions`` [Sq] from scores u [B, Hkv, S]; unchecked."""
    batch, heads, seq_len = u.shape
    in_window, candidate = _position_sets(positions, seq_len, window, causal)
    scores = u.double()[:, :, None, :]  # [B, Hkv, 1, S]
    low = scores.min()
    # Padding sorts after every candidate and sits more than 1 below all of them, so it
    # never counts near the threshold, which is >= z_K - 1.
    padded = torch.where(candidate, scores, low - 2 - low.abs())  # [B, Hkv, Sq, S]
    desc, order = padded.sort(dim=-1, descending=True, stable=True)
    selected = torch.zeros_like(padded, dtype=torch.bool)
    selected.scatter_(-1, order[..., : min(kv_budget, seq_len)], True)
    selected &= candidate
    rows = (batch, heads, positions.numel())
    if kv_budget == 0:
        tau = torch.full(rows, torch.inf, dtype=torch.float64, device=u.device)
    else:
        tau = capped_simplex_threshold(desc.reshape(-1, seq_len), kv_budget).view(rows)
    tau = torch.where(candidate.sum(-1) <= kv_budget, -torch.inf, tau)
    soft = (scores - tau[..., None]).clamp(0, 1)
    gates = torch.where(in_window, 1.0, torch.where(selected, soft, 0.0))
    return SparsekMask(selected, in_window.expand_as(selected), gates, tau)


def sparsek_mask(
    u: torch.Tensor,
    *,
    kv_budget: int,
    window: int,
    causal: bool,
    query_index: torch.Tensor | None = None,
) -> SparsekMask:
    """The SparseK selection, window and gates for every query row (or those in query_index).

    Args:
        u: float32 or float64 [B, Hkv, S], importance scores of the kv pairs.
        kv_budget: K >= 0, selected pairs per query.
        window: W >= 0, local pairs per query.
        causal: whether a query sees only keys at or before its position.
        query_index: optional integer [Sq] of query positions; default all S positions.

    Returns:
        SparsekMask with tensors [B, Hkv, Sq, S] (tau [B, Hkv, Sq]); threshold in float64.
    """
    u = check_scores_alone(u)
    kv_budget = check_non_negative_int("kv_budget", kv_budget)
    window = check_non_negative_int("window", window)
    causal = check_causal(causal)
    positions = _positions(query_index, u.shape[-1], u.device)
    return _mask_rows(u, positions, kv_budget, window, causal)


def _positions(query_index: torch.Tensor | None, seq_len: int, device: torch.device):
    if query_index is None:
        return torch.arange(seq_len, device=device)
    return check_query_index(query_index, seq_len, device)


def _attend_rows(q, k, v, u, positions, kv_budget, window, causal, scale):
    """Gated softmax attention for query rows ``positions`` [c] -> (o [B, Hq, c, D], lse)."""
    batch, q_heads, _, dim = q.shape
    kv_heads = k.shape[1]
    group = q_heads // kv_heads
    gates = _mask_rows(u, positions, kv_budget, window, causal).gates
    # Query head h reads kv head h // group: view the query heads as [Hkv, group].
    q_rows = q[:, :, positions].reshape(batch, kv_heads, group, -1, dim)
    logits = (q_rows @ k.unsqueeze(2).transpose(-1, -2)) * scale  # [B, Hkv, G, c, S]
    # g * exp(s) = exp(s + log g); log 0 = -inf drops a pair exactly.
    logits = logits + gates.log().to(q.dtype).unsqueeze(2)
    lse = torch.logsumexp(logits, -1)  # [B, Hkv, G, c]
    o = torch.softmax(logits, -1) @ v.unsqueeze(2)  # [B, Hkv, G, c, D]
    # An empty row is all -inf: softmax gives NaN there, and the contract says 0.
    o = o.masked_fill(torch.isneginf(lse)[..., None], 0)
    return o.reshape(batch, q_heads, -1, dim), lse.reshape(batch, q_heads, -1)


def sparsek_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
    *,
    kv_budget: int,
    window: int,
    causal: bool,
    scale: float | None = None,
    query_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseK attention in pure PyTorch, computed in the inputs' dtype.

    Logits, softmax and the value product run in q's dtype (so bf16 inputs give the
    PyTorch error in bf16, and float64 inputs give the oracle); the threshold and the
    gates are always computed in float64 from u.

    Args:
        q: [B, Hq, S, D]; k, v: [B, Hkv, S, D] with Hq % Hkv == 0; u: [B, Hkv, S].
        kv_budget, window, causal, scale: as in ``sparsek_attention``.
        query_index: optional integer [Sq]; only those query rows are computed (keys
            still range over all S).

    Returns:
        o [B, Hq, Sq, D] in q's dtype, and lse [B, Hq, Sq] (float32, or float64 for
        float64 inputs); an empty row has o = 0 and lse = -inf.
    """
    scale = check_attention_inputs(
        q, k, v, u, kv_budget=kv_budget, window=window, causal=causal, scale=scale
    )
    batch, q_heads, seq_len, _ = q.shape
    positions = _positions(query_index, seq_len, q.device)
    step = max(1, CHUNK_ELEMENTS // (batch * q_heads * seq_len))
    parts = [
        _attend_rows(q, k, v, u, positions[i : i + step], kv_budget, window, causal, scale)
        for i in range(0, positions.numel(), step)
    ]
    o = torch.cat([p[0] for p in parts], dim=2)
    lse = torch.cat([p[1] for p in parts], dim=2)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return o, lse.to(lse_dtype)
