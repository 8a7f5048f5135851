"""The correctness bar of the fused Triton forward, shared by the interpreter tests (CPU)
and the GPU tests: NaN-poisoned outputs, error against the float64 reference under the
dtype's tolerance and within twice the low-precision reference's own error, exact empty
rows (o = 0, lse = -inf), and lse close to the reference's (absolute up to magnitude 1,
relative beyond)."""

from __future__ import annotations

import torch

from sparsek.reference import sparsek_attention_reference

TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
LSE_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}


def forward(x, **kw):
    """Run the Triton forward into NaN-filled o [B, Hq, S, D] and lse [B, Hq, S]."""
    from sparsek.triton_fwd import sparsek_attention_triton

    out = torch.full_like(x.q, torch.nan)
    lse = torch.full(x.q.shape[:3], torch.nan, device=x.q.device)
    o, lse_o = sparsek_attention_triton(x.q, x.k, x.v, x.u, out=out, lse_out=lse, **kw)
    assert o is out and lse_o is lse
    return o, lse


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    den = b.norm()
    return float((a.double() - b).norm() / (den if den > 0 else 1.0))


def check_against_reference(x, dtype, **kw):
    o, lse = forward(x, **kw)
    assert not o.isnan().any() and not lse.isnan().any(), "an output element was not written"
    x64 = x.to(torch.float64)
    want, want_lse = sparsek_attention_reference(x64.q, x64.k, x64.v, x64.u, **kw)
    err = rel(o, want)
    assert err < TOLERANCE[dtype], f"rel error {err:.3e}"
    if dtype != torch.float32:
        low, _ = sparsek_attention_reference(x.q, x.k, x.v, x.u, **kw)
        ref_err = rel(low, want)
        assert err <= 2 * ref_err + 1e-6, f"rel error {err:.3e} > 2 x reference {ref_err:.3e}"
    empty = torch.isneginf(want_lse)
    assert torch.equal(torch.isneginf(lse), empty)
    assert (o[empty] == 0).all()
    if (~empty).any():
        # Relative beyond magnitude 1: a float32 lse near 200 is good to its ulp, 1.5e-5.
        diff = (lse.double() - want_lse)[~empty].abs()
        lse_err = float((diff / want_lse[~empty].abs().clamp(min=1.0)).max())
        assert lse_err < LSE_TOLERANCE[dtype], f"lse error {lse_err:.3e} (relative beyond 1)"
