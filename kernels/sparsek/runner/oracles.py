"""What each implementation is checked against, evaluated on selected query rows.

Every function takes one slice of the problem (some batch elements, some kv heads
with their query heads) and ``rows``, the query positions to evaluate (None: all),
and returns ``o [b, hq, len(rows), D]``. Computing only those rows keeps the float64
oracle affordable on long sequences.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from sparsek.runner.inputs import Inputs
from sparsek_remote.jobspec import Case


def _positions(rows: torch.Tensor | None, S: int, device: torch.device) -> torch.Tensor:
    if rows is None:
        return torch.arange(S, device=device)
    return rows.to(device)


def _allowed(positions: torch.Tensor, S: int) -> torch.Tensor:
    """Causal mask ``[nq, S]``: True where key j may be attended by the query at ``positions``."""
    keys = torch.arange(S, device=positions.device)
    return keys[None, :] <= positions[:, None]


def dense_rows(x: Inputs, case: Case, rows: torch.Tensor | None) -> torch.Tensor:
    """Dense softmax attention in the inputs' dtype (the oracle on float64 inputs), with
    an explicit mask row per query position so any subset of rows can be evaluated."""
    q, k, v = x.q, x.k, x.v
    b, hq, S, D = q.shape
    hkv = k.shape[1]
    positions = _positions(rows, S, q.device)
    nq = positions.numel()
    # Group the query heads by the kv head they read, so k and v are never expanded.
    q_rows = q[:, :, positions].reshape(b, hkv, hq // hkv, nq, D)
    scores = torch.einsum("bhgqd,bhkd->bhgqk", q_rows, k) * (case.D ** -0.5)
    if case.causal:
        scores.masked_fill_(~_allowed(positions, S), float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    del scores
    out = torch.einsum("bhgqk,bhkd->bhgqd", weights, v)
    return out.reshape(b, hq, nq, D)


def sdpa_math_rows(x: Inputs, case: Case, rows: torch.Tensor | None) -> torch.Tensor:
    """PyTorch's math backend in the inputs' own dtype: the error a careful eager
    implementation makes in that precision, the yardstick for the dense kernels."""
    S = x.q.shape[2]
    positions = _positions(rows, S, x.q.device)
    mask = _allowed(positions, S) if case.causal else None
    with sdpa_kernel([SDPBackend.MATH]):
        return F.scaled_dot_product_attention(
            x.q[:, :, positions], x.k, x.v, attn_mask=mask,
            enable_gqa=x.q.shape[1] != x.k.shape[1],
        )


def sparsek_reference_rows(x: Inputs, case: Case, rows: torch.Tensor | None) -> torch.Tensor:
    """The pure-PyTorch SparseK reference in the inputs' dtype (float64 inputs: the oracle)."""
    from sparsek.reference import sparsek_attention_reference

    query_index = None if rows is None else rows.to(x.q.device)
    out, _ = sparsek_attention_reference(
        x.q, x.k, x.v, x.u, kv_budget=case.kv_budget, window=case.window,
        causal=case.causal, query_index=query_index,
    )
    return out


def to_float64(x: Inputs) -> Inputs:
    """float64 copies of all four inputs: the oracle sees the same numbers, exactly."""
    return Inputs(*(t.to(torch.float64) for t in (x.q, x.k, x.v, x.u)))
