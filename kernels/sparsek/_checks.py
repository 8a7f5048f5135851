"""Input validation shared by every SparseK implementation.

Each check raises ``ValueError`` naming the offending argument and its value, so a
bad call fails before any kernel runs and the message says what to change. The
checks read only shapes, dtypes and devices, except ``check_scores``, which reads
``u`` to reject NaN or infinite scores (one reduction and one device sync).
"""

from __future__ import annotations

import math
import numbers

import torch

QKV_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SCORE_DTYPES = (torch.float32, torch.float64)
TRITON_HEAD_DIMS = (64, 128)


def _dtype_names(dtypes: tuple[torch.dtype, ...]) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def check_tensor(name: str, t: object, rank: int, layout: str) -> torch.Tensor:
    """Require a non-empty tensor of the given rank; ``layout`` names its axes."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor {layout}; got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(
            f"{name} must be a {rank}-D tensor {layout}; "
            f"got shape {tuple(t.shape)} (rank {t.dim()})"
        )
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty; got shape {tuple(t.shape)} {layout}")
    return t


def check_non_negative_int(name: str, value: object) -> int:
    """Require a plain integer >= 0 (``bool`` is rejected: it is almost always a slip)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int >= 0; got {value!r} ({type(value).__name__})")
    if value < 0:
        raise ValueError(f"{name} must be >= 0; got {value}")
    return int(value)


def check_causal(causal: object) -> bool:
    """Require a real ``bool``: a truthy string or tensor would silently pick a mode."""
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool; got {causal!r} ({type(causal).__name__})")
    return causal


def resolve_scale(scale: object, head_dim: int) -> float:
    """Return ``scale``, or ``head_dim ** -0.5`` when it is None; must be finite and > 0."""
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise ValueError(f"scale must be a positive float or None; got {scale!r}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be finite and > 0; got {scale!r}")
    return float(scale)


def check_qkv(q: object, k: object, v: object) -> tuple[int, int, int, int, int]:
    """Check q [B, Hq, S, D] and k, v [B, Hkv, S, D]; return (B, Hq, Hkv, S, D)."""
    q = check_tensor("q", q, 4, "[B, Hq, S, D]")
    k = check_tensor("k", k, 4, "[B, Hkv, S, D]")
    v = check_tensor("v", v, 4, "[B, Hkv, S, D]")
    if q.dtype not in QKV_DTYPES:
        raise ValueError(f"q must have dtype in ({_dtype_names(QKV_DTYPES)}); got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} must have q's dtype {q.dtype}; got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}; got {t.device}")
    b, hq, s, d = q.shape
    bk, hkv, sk, dk = k.shape
    if (bk, sk, dk) != (b, s, d):
        raise ValueError(
            f"k must be [B={b}, Hkv, S={s}, D={d}] to match q {tuple(q.shape)}; "
            f"got {tuple(k.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}; got {tuple(v.shape)}")
    if hq % hkv != 0:
        raise ValueError(
            f"Hq % Hkv must be 0 (each kv head serves a whole group of query heads); "
            f"got Hq={hq} (q) and Hkv={hkv} (k, v)"
        )
    return b, hq, hkv, s, d


def check_scores(
    u: object, batch: int, kv_heads: int, seq_len: int, device: torch.device,
    *, finite: bool = True,
) -> None:
    """Check u [B, Hkv, S]: float32 or float64, on q's device, and (unless ``finite`` is
    False) every score finite. The finiteness check reads the data, which waits for the
    device; a caller that already checked these scores may skip it."""
    u = check_tensor("u", u, 3, "[B, Hkv, S]")
    if u.dtype not in SCORE_DTYPES:
        raise ValueError(f"u must have dtype in ({_dtype_names(SCORE_DTYPES)}); got {u.dtype}")
    if u.device != device:
        raise ValueError(f"u must be on q's device {device}; got {u.device}")
    if tuple(u.shape) != (batch, kv_heads, seq_len):
        raise ValueError(
            f"u must be [B={batch}, Hkv={kv_heads}, S={seq_len}]; got {tuple(u.shape)}"
        )
    if not finite:
        return
    bad = ~torch.isfinite(u)
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"u must be finite; got {u[where].item()} at index {where} "
            f"({int(bad.sum())} non-finite scores in all)"
        )


def check_scores_alone(u: object) -> torch.Tensor:
    """Check u [B, Hkv, S] on its own (no q to match against)."""
    u = check_tensor("u", u, 3, "[B, Hkv, S]")
    check_scores(u, *u.shape, u.device)
    return u


def check_attention_inputs(
    q: object,
    k: object,
    v: object,
    u: object,
    *,
    kv_budget: object,
    window: object,
    causal: object,
    scale: object,
    check_finite: bool = True,
) -> float:
    """Validate one SparseK attention call; return the resolved softmax scale."""
    b, _, hkv, s, d = check_qkv(q, k, v)
    check_scores(u, b, hkv, s, q.device, finite=check_finite)
    check_non_negative_int("kv_budget", kv_budget)
    check_non_negative_int("window", window)
    check_causal(causal)
    return resolve_scale(scale, d)


def check_triton_head_dim(head_dim: int) -> None:
    """The fused kernels are compiled for a few head sizes only."""
    if head_dim not in TRITON_HEAD_DIMS:
        raise ValueError(
            f"D (q.shape[-1]) must be one of {TRITON_HEAD_DIMS} for impl='triton'; got {head_dim}. "
            "impl='reference' accepts any D."
        )


def check_out(out: object, q: torch.Tensor) -> torch.Tensor:
    """Check a preallocated output: q's shape, dtype and device."""
    out = check_tensor("out", out, 4, "[B, Hq, S, D]")
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(
            f"out must match q (shape {tuple(q.shape)}, {q.dtype}, {q.device}); "
            f"got shape {tuple(out.shape)}, {out.dtype}, {out.device}"
        )
    return out


def check_query_index(query_index: object, seq_len: int, device: torch.device) -> torch.Tensor:
    """Check query_index [Sq]: integer positions in [0, S) on the inputs' device."""
    idx = check_tensor("query_index", query_index, 1, "[Sq]")
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise ValueError(f"query_index must be an integer tensor; got {idx.dtype}")
    if idx.device != device:
        raise ValueError(f"query_index must be on the inputs' device {device}; got {idx.device}")
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= seq_len:
        raise ValueError(f"query_index must lie in [0, S={seq_len}); got values in [{lo}, {hi}]")
    return idx.long()
