"""The public entry point: one call, an explicit implementation, no silent fallback."""

from __future__ import annotations

import torch

from sparsek._checks import check_attention_inputs, check_out, check_triton_head_dim
from sparsek.reference import sparsek_attention_reference

IMPLS = ("reference", "triton")


def _triton_impl():
    """Import the fused kernels only when asked: the package must import without triton."""
    try:
        from sparsek.triton_fwd import sparsek_attention_triton
    except ImportError as exc:
        raise ImportError(
            f"impl='triton' needs triton and the module sparsek.triton_fwd, which failed to "
            f"import: {exc}. Install triton (or set TRITON_INTERPRET=1 on a CPU), or pass "
            "impl='reference' for the pure-PyTorch path."
        ) from exc
    return sparsek_attention_triton


def sparsek_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
    *,
    kv_budget: int,
    window: int,
    causal: bool = True,
    scale: float | None = None,
    impl: str = "triton",
    return_lse: bool = False,
    out: torch.Tensor | None = None,
    check_finite: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """SparseK attention: each query attends to its K best-scored pairs and a window of W.

    Args:
        q: fp16, bf16, fp32 or fp64 [B, Hq, S, D].
        k, v: q's dtype [B, Hkv, S, D]; query head h reads kv head h // (Hq // Hkv).
        u: float32 or float64 [B, Hkv, S], importance scores of the kv pairs (finite).
        kv_budget: K >= 0, selected pairs per query.
        window: W >= 0, local pairs per query.
        causal: whether a query sees only keys at or before its position.
        scale: softmax scale, finite and > 0; default D ** -0.5.
        impl: "triton" (fused kernels; D in {64, 128}) or "reference" (pure PyTorch).
        return_lse: also return the log-sum-exp of the gated scores.
        out: optional [B, Hq, S, D] tensor in q's dtype to write o into.
        check_finite: check that every score in u is finite (the default). The check reads
            u and so waits for the device; a benchmark loop that validated the same u once
            may pass False so the timed call is only the kernels.

    Returns:
        o [B, Hq, S, D] in q's dtype (``out`` itself when given), or (o, lse) with
        lse [B, Hq, S] float32 (float64 from the reference on float64 inputs).
        A query with nothing to attend to (K = 0 and W = 0) gets o = 0, lse = -inf.

    Raises:
        ValueError: a bad argument or unknown impl (the message names it and its value).
        ImportError: impl="triton" and the fused kernels cannot be imported.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}")
    scale = check_attention_inputs(
        q, k, v, u, kv_budget=kv_budget, window=window, causal=causal, scale=scale,
        check_finite=check_finite,
    )
    if out is not None:
        check_out(out, q)
    args = dict(kv_budget=kv_budget, window=window, causal=causal, scale=scale)
    if impl == "reference":
        o, lse = sparsek_attention_reference(q, k, v, u, **args)
        if out is not None:
            o = out.copy_(o)
    else:
        check_triton_head_dim(q.shape[-1])
        o, lse = _triton_impl()(q, k, v, u, **args, out=out)
    return (o, lse) if return_lse else o
