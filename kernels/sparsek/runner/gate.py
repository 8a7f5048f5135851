"""The correctness gate: no case is timed unless its output matches a float64 oracle.

The implementation runs on the whole problem (into a NaN-poisoned buffer where it
accepts ``out=``); the oracle evaluates a sample of query rows, chunk by chunk over
batch elements and kv heads so the largest shapes fit in memory. In fp16/bf16 the
error must also stay within a multiple of the error PyTorch's own reference makes in
that precision, so a tolerance loose enough for bf16 cannot hide a real bug.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from sparsek.runner.implementations import Prepared
from sparsek.runner.inputs import Inputs
from sparsek.runner.oracles import dense_rows, sdpa_math_rows, sparsek_reference_rows, to_float64
from sparsek_remote.jobspec import Case, CorrectnessPolicy, SdpaImpl, SparsekImpl
from sparsek_remote.schema import Gate

# Working memory the oracle may use per chunk (float64 scores dominate).
ORACLE_CHUNK_BYTES = 1 << 30
# Slack on the error ratio, so an implementation exactly as good as a near-exact
# reference (both errors ~1e-8) is not failed by rounding of the ratio itself.
RATIO_SLACK = 1e-6

Rows = Callable[[Inputs, Case, "torch.Tensor | None"], torch.Tensor]


@dataclass
class _Sums:
    """Squared norms accumulated in float64 over the checked rows."""

    diff: float = 0.0
    ref: float = 0.0
    low_precision_diff: float = 0.0


def query_positions(S: int, max_queries: int, seed: int) -> torch.Tensor | None:
    """Query positions to check: None (all) when ``S <= max_queries``, else a sorted
    seeded sample of ``max_queries`` positions that always holds 0 and S-1, the rows
    where off-by-one errors show. The same rows serve every batch element and head."""
    if max_queries >= S:
        return None
    generator = torch.Generator().manual_seed(seed)
    inner = torch.randperm(S - 2, generator=generator)[: max(0, max_queries - 2)] + 1
    ends = torch.tensor([0, S - 1])
    return torch.cat([ends, inner]).sort().values


def check(policy: CorrectnessPolicy, case: Case, impl: SparsekImpl | SdpaImpl,
          prepared: Prepared, inputs: Inputs, log: logging.Logger) -> Gate:
    """Run the implementation once and judge its output against the oracle."""
    rows = query_positions(case.S, policy.max_queries, case.seed)
    checked = case.S if rows is None else rows.numel()
    low_precision = case.dtype != "float32"
    tolerance = policy.tolerance_low_precision if low_precision else policy.tolerance_float32
    verdict = {"tolerance": float(tolerance), "max_error_ratio": float(policy.max_error_ratio),
               "checked_queries": checked, "total_queries": case.S}
    out = _run(prepared, inputs)
    bad = int((~torch.isfinite(out)).sum())
    if bad:
        return Gate(passed=False, rel_error=None, **verdict,
                    message=f"the output holds {bad} non-finite values (NaN marks elements "
                            "the implementation did not write)")
    oracle, yardstick = _oracles(impl)
    sums = _compare(out, inputs, case, rows, oracle, yardstick if low_precision else None)
    rel_error = _relative(sums.diff, sums.ref)
    reference_error = _relative(sums.low_precision_diff, sums.ref) if low_precision else None
    passed, message = _judge(rel_error, reference_error, tolerance, policy.max_error_ratio)
    log.debug("gate %s/%s: %s", case.name, impl.label, message)
    return Gate(passed=passed, rel_error=_finite_or_none(rel_error),
                reference_rel_error=_finite_or_none(reference_error), message=message, **verdict)


def _run(prepared: Prepared, inputs: Inputs) -> torch.Tensor:
    if prepared.call_into is None:
        _poison_cached_block(inputs.q)
        return prepared.call()
    poisoned = torch.full_like(inputs.q, float("nan"))
    return prepared.call_into(poisoned)


def _poison_cached_block(like: torch.Tensor) -> None:
    """Leave a NaN-filled block of the output's size in PyTorch's CUDA cache.

    An implementation without ``out=`` allocates its output, and the caching
    allocator hands back a cached block that fits: without this, that block could
    hold a correct result from an earlier call (another backend on the same case),
    and an implementation that wrote nothing would pass. On the CPU freed
    memory is not cached this way, so there is nothing to do.
    """
    if like.device.type == "cuda":
        torch.full_like(like, float("nan"))


def _oracles(impl: SparsekImpl | SdpaImpl) -> tuple[Rows, Rows]:
    """(float64 oracle, same computation in the case's low precision) for ``impl``."""
    if isinstance(impl, SparsekImpl):
        return sparsek_reference_rows, sparsek_reference_rows
    return dense_rows, sdpa_math_rows


def _compare(out: torch.Tensor, inputs: Inputs, case: Case, rows: torch.Tensor | None,
             oracle: Rows, yardstick: Rows | None) -> _Sums:
    sums = _Sums()
    for chunk, select in _chunks(inputs, case, rows):
        want = oracle(to_float64(chunk), case, rows)
        got = select(out).to(torch.float64)
        sums.diff += float(((got - want) ** 2).sum())
        sums.ref += float((want**2).sum())
        if yardstick is not None:
            low = yardstick(chunk, case, rows).to(torch.float64)
            sums.low_precision_diff += float(((low - want) ** 2).sum())
        del want, got
    return sums


def _chunks(inputs: Inputs, case: Case, rows: torch.Tensor | None
            ) -> Iterator[tuple[Inputs, Callable[[torch.Tensor], torch.Tensor]]]:
    """Slices of one batch element and a run of kv heads (with their query heads),
    each paired with a function that picks the same slice and rows of an output."""
    group = case.Hq // case.Hkv
    nq = case.S if rows is None else rows.numel()
    per_kv_head = 8 * (4 * group * nq * case.S + (2 + 2 * group) * case.S * case.D)
    heads = max(1, min(case.Hkv, ORACLE_CHUNK_BYTES // per_kv_head))
    for b in range(case.B):
        for h0 in range(0, case.Hkv, heads):
            h1 = min(case.Hkv, h0 + heads)
            kv, qh = slice(h0, h1), slice(h0 * group, h1 * group)
            chunk = Inputs(q=inputs.q[b:b + 1, qh], k=inputs.k[b:b + 1, kv],
                           v=inputs.v[b:b + 1, kv], u=inputs.u[b:b + 1, kv])
            yield chunk, _selector(b, qh, rows)


def _selector(b: int, qh: slice, rows: torch.Tensor | None
              ) -> Callable[[torch.Tensor], torch.Tensor]:
    def select(out: torch.Tensor) -> torch.Tensor:
        part = out[b:b + 1, qh]
        return part if rows is None else part[:, :, rows.to(out.device)]
    return select


def _relative(diff_sq: float, ref_sq: float) -> float:
    # An all-zero reference (K = 0 and W = 0: every row is empty) has no scale:
    # the absolute error is judged instead.
    if ref_sq == 0.0:
        return math.sqrt(diff_sq)
    return math.sqrt(diff_sq / ref_sq)


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _judge(rel_error: float, reference_error: float | None, tolerance: float,
           ratio: float) -> tuple[bool, str]:
    if not math.isfinite(rel_error):
        return False, f"the relative error is {rel_error}"
    reasons = []
    if rel_error > tolerance:
        reasons.append(f"rel_error {rel_error:.3e} exceeds the tolerance {tolerance:.1e}")
    if reference_error is not None and rel_error > ratio * reference_error + RATIO_SLACK:
        reasons.append(f"rel_error {rel_error:.3e} exceeds {ratio:g} x the PyTorch reference's "
                       f"own error {reference_error:.3e} in the same precision")
    if reasons:
        return False, "; ".join(reasons)
    against = "" if reference_error is None else f", reference {reference_error:.3e}"
    return True, f"rel_error {rel_error:.3e} within {tolerance:.1e}{against}"
