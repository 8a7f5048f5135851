"""Progress events: one JSON object per line, for a progress bar on the other end.

    {"event": "start", "run_id": ..., "device": "cuda", "total": N}
    {"event": "case_start", "case": ..., "implementation": ..., "index": i, "total": N}
    {"event": "case_done", "case": ..., "implementation": ..., "index": i, "total": N,
     "status": "ok" | "gate_failed" | "error" | "skipped", "median_ms": float | null,
     "rel_error": float | null, "throttled": bool | null}
    {"event": "profile_start", "case": ..., "implementation": ..., "index": i, "total": M}
    {"event": "profile_done", "case": ..., "implementation": ..., "index": i, "total": M,
     "ok": bool, "error": str | null}
    {"event": "done", "failed": ["case/implementation", ...], "counts": {"ok": n, ...}}

``index`` counts from 0. ``failed`` lists the pairs whose gate failed or that raised;
skipped pairs (a backend absent on this device) are not failures.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from typing import Any, TextIO

from sparsek_remote.schema import CaseResult

Event = dict[str, Any]
EventSink = Callable[[Event], None]
FAILED_STATUSES = frozenset({"gate_failed", "error"})


def start(run_id: str, device: str, total: int) -> Event:
    return {"event": "start", "run_id": run_id, "device": device, "total": total}


def case_start(case: str, implementation: str, index: int, total: int) -> Event:
    return {"event": "case_start", "case": case, "implementation": implementation,
            "index": index, "total": total}


def case_done(result: CaseResult, index: int, total: int) -> Event:
    median = result.timing.stats.median_ms if result.timing is not None else None
    rel_error = result.gate.rel_error if result.gate is not None else None
    return {"event": "case_done", "case": result.case, "implementation": result.implementation,
            "index": index, "total": total, "status": result.status, "median_ms": median,
            "rel_error": rel_error, "throttled": result.throttled}


def case_lost(case: str, implementation: str, index: int, total: int) -> Event:
    """The ``case_done`` of a pair whose runner died before it reported one."""
    return {"event": "case_done", "case": case, "implementation": implementation,
            "index": index, "total": total, "status": "error", "median_ms": None,
            "rel_error": None, "throttled": None}


def profile_start(case: str, implementation: str, index: int, total: int) -> Event:
    return {"event": "profile_start", "case": case, "implementation": implementation,
            "index": index, "total": total}


def profile_done(result: CaseResult, index: int, total: int) -> Event:
    error = result.ncu.error if result.ncu is not None else "not profiled"
    return {"event": "profile_done", "case": result.case,
            "implementation": result.implementation, "index": index, "total": total,
            "ok": error is None, "error": error}


def done(results: list[CaseResult]) -> Event:
    failed = [f"{r.case}/{r.implementation}" for r in results if r.status in FAILED_STATUSES]
    counts = Counter(r.status for r in results)
    return {"event": "done", "failed": failed, "counts": dict(sorted(counts.items()))}


def json_lines(stream: TextIO) -> EventSink:
    """A sink writing each event as one line of JSON, flushed at once so a reader
    at the other end of a pipe or SSH channel sees it immediately."""

    def emit(event: Event) -> None:
        stream.write(json.dumps(event, allow_nan=False) + "\n")
        stream.flush()

    return emit
