"""The scoring network: one importance score per kv pair and kv head, independent of queries."""

from __future__ import annotations

import torch
from torch import nn

from sparsek._checks import check_tensor


class SparseKScorer(nn.Module):
    """``u = x @ w_score + slope * position``, computed in float32.

    The linear term ranks pairs by content; the per-head slope lets a head learn a
    preference for recent (slope > 0) or early (slope < 0) pairs.

    Args:
        d_model: width of the hidden states x.
        kv_heads: Hkv, one score per kv head.

    Parameters:
        w_score: float32 [d_model, Hkv].
        slope: float32 [Hkv], zero at initialisation (no positional preference).
    """

    def __init__(self, d_model: int, kv_heads: int, *, device: torch.device | None = None):
        super().__init__()
        self.w_score = nn.Parameter(torch.empty(d_model, kv_heads, device=device))
        self.slope = nn.Parameter(torch.zeros(kv_heads, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Unit-variance inputs then give scores of unit variance, the scale at which the
        # capped-simplex mask (width 1) is neither all 0/1 nor all fractional.
        nn.init.normal_(self.w_score, std=self.w_score.shape[0] ** -0.5)
        nn.init.zeros_(self.slope)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Score every position.

        Args:
            x: [B, S, d_model] hidden states, any float dtype.
            positions: optional [S] positions of the rows of x; default 0 .. S-1
                (pass an offset range when scoring a continuation).

        Returns:
            u: float32 [B, Hkv, S].
        """
        x = check_tensor("x", x, 3, "[B, S, d_model]")
        d_model, seq_len = self.w_score.shape[0], x.shape[1]
        if x.shape[-1] != d_model:
            raise ValueError(f"x must have last dimension d_model={d_model}; got {tuple(x.shape)}")
        if positions is None:
            positions = torch.arange(seq_len, device=x.device)
        elif tuple(positions.shape) != (seq_len,):
            raise ValueError(f"positions must be [S={seq_len}]; got {tuple(positions.shape)}")
        u = x.float() @ self.w_score.float() + positions.float()[:, None] * self.slope.float()
        return u.transpose(1, 2).contiguous()
