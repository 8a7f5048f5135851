"""The fused forward as PyTorch custom ops, so ``torch.compile`` traces through it.

``sparsek::attention_fwd`` is functional (returns fresh o and lse);
``sparsek::attention_fwd_out`` writes into given buffers, which is how callers pass
``out=`` (and how tests hand in NaN-poisoned outputs). Both have fake implementations
that only describe shapes and dtypes, so a compiled graph never runs the kernels while
tracing. The launcher is looked up on its module at each call, so reloading the kernel
modules (to switch the Triton interpreter on in a test) takes effect here too.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparsek import triton_fwd


def _lse_like(q: Tensor) -> Tensor:
    return torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)


@torch.library.custom_op("sparsek::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, u: Tensor, kv_budget: int, window: int,
                  causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """o [B, Hq, S, D] (q's dtype) and lse [B, Hq, S] (float32) of SparseK attention."""
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = _lse_like(q)
    triton_fwd.launch_forward(q, k, v, u, kv_budget, window, causal, scale, o, lse)
    return o, lse


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, u, kv_budget, window, causal, scale):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device), _lse_like(q)


@torch.library.custom_op("sparsek::attention_fwd_out", mutates_args=("o", "lse"))
def attention_fwd_out(q: Tensor, k: Tensor, v: Tensor, u: Tensor, o: Tensor, lse: Tensor,
                      kv_budget: int, window: int, causal: bool, scale: float) -> None:
    """Write SparseK attention into o [B, Hq, S, D] and lse [B, Hq, S] (float32)."""
    triton_fwd.launch_forward(q, k, v, u, kv_budget, window, causal, scale, o, lse)


@attention_fwd_out.register_fake
def _attention_fwd_out_fake(q, k, v, u, o, lse, kv_budget, window, causal, scale):
    return None
