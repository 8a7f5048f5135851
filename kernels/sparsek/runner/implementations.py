"""The implementations a job compares, each wrapped as a call on prepared inputs.

Everything an implementation needs that is not part of its measured work (expanding
k and v for a backend without GQA support, choosing a backend) happens here, before
the correctness gate and outside the timed region.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from sparsek.runner.inputs import Inputs
from sparsek_remote.jobspec import Case, SdpaImpl, SparsekImpl

SDPA_BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
# What PyTorch raises when the forced backend cannot take the inputs (CUDA and CPU
# word it differently); its warnings say why.
_NO_KERNEL_MARKERS = ("No available kernel", "No viable backend")
_MAX_REASON_CHARS = 1500


class BackendUnavailable(Exception):
    """The implementation cannot run this case on this device: a skip, not a failure."""


@dataclass(frozen=True)
class Prepared:
    """An implementation bound to one case's inputs.

    ``call()`` is what gets timed and returns ``o [B, Hq, S, D]``; it may skip input
    checks the gate's call already made. ``call_into(out)`` writes into a given
    buffer, for implementations that accept ``out=``; the gate poisons that buffer
    with NaN so unwritten elements fail.
    """

    call: Callable[[], torch.Tensor]
    call_into: Callable[[torch.Tensor], torch.Tensor] | None


def prepare(impl: SparsekImpl | SdpaImpl, case: Case, inputs: Inputs, device: str,
            log: logging.Logger) -> Prepared:
    """Bind ``impl`` to ``inputs``; raises BackendUnavailable when it cannot run here."""
    if isinstance(impl, SparsekImpl):
        return _prepare_sparsek(impl, case, inputs)
    return _prepare_sdpa(impl, case, inputs, device, log)


def _prepare_sparsek(impl: SparsekImpl, case: Case, x: Inputs) -> Prepared:
    # Imported here so a host whose kernel package fails to import still runs (and
    # reports) the dense baselines, with the import error recorded on each SparseK case.
    from sparsek.api import sparsek_attention

    options = {"kv_budget": case.kv_budget, "window": case.window, "causal": case.causal,
               "impl": impl.impl}

    def call() -> torch.Tensor:
        # The gate's call checked u once; checking it on every timed call would add a
        # reduction and a host round trip to what is measured.
        return sparsek_attention(x.q, x.k, x.v, x.u, check_finite=False, **options)

    def call_into(out: torch.Tensor) -> torch.Tensor:
        return sparsek_attention(x.q, x.k, x.v, x.u, out=out, **options)

    return Prepared(call=call, call_into=call_into)


def _prepare_sdpa(impl: SdpaImpl, case: Case, x: Inputs, device: str,
                  log: logging.Logger) -> Prepared:
    backend = SDPA_BACKENDS[impl.backend]
    gqa = case.Hq != case.Hkv
    k, v = x.k, x.v
    reasons = _probe(backend, x.q, k, v, case.causal, gqa)
    if reasons and gqa:
        group = case.Hq // case.Hkv
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        retry = _probe(backend, x.q, k, v, case.causal, False)
        if retry:
            reasons += retry
        else:
            log.info("%s: backend %s rejects enable_gqa here; k and v are expanded to %d heads "
                     "once, outside the timed region", impl.label, impl.backend, case.Hq)
            reasons, gqa = [], False
    if reasons:
        raise BackendUnavailable(_unavailable_text(impl, case, device, reasons))

    def call() -> torch.Tensor:
        return _sdpa(backend, x.q, k, v, case.causal, gqa)

    return Prepared(call=call, call_into=None)


def _sdpa(backend: SDPBackend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
          causal: bool, gqa: bool) -> torch.Tensor:
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)


def _probe(backend: SDPBackend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           causal: bool, gqa: bool) -> list[str]:
    """Run once; empty when the backend took the inputs, else the reasons it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            _sdpa(backend, q, k, v, causal, gqa)
        except RuntimeError as exc:
            if not any(marker in str(exc) for marker in _NO_KERNEL_MARKERS):
                raise
            return [str(w.message) for w in caught] or [str(exc).splitlines()[0]]
    return []


def _unavailable_text(impl: SdpaImpl, case: Case, device: str, reasons: list[str]) -> str:
    shape = (f"{case.dtype}, D={case.D}, Hq={case.Hq}, Hkv={case.Hkv}, "
             f"{'causal' if case.causal else 'non-causal'}")
    why = " | ".join(dict.fromkeys(r.strip() for r in reasons))
    if len(why) > _MAX_REASON_CHARS:
        why = why[:_MAX_REASON_CHARS] + " ..."
    return (f"sdpa backend {impl.backend!r} is not available on {device} for this case "
            f"({shape}): {why}")
