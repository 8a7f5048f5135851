"""Which (case, implementation) items a runner runs, and how a job's items are spread
over the workers (one per GPU) of a multi-GPU host.

An item is named ``CASE/IMPL`` (``seed/sdpa-cudnn``); names cannot hold a ``/``, so the
name is unambiguous. ``select_items`` turns ``--only`` selectors into items;
``plan`` splits items over N workers so that the most loaded worker's estimated time
stays close to the others': longest item first, each to the least loaded worker
(LPT). The estimate only has to rank items and add up roughly, so it is a FLOPs model
with nominal H100-class rates, not a measurement.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sparsek.runner.metrics import case_bytes, case_flops, dense_pairs
from sparsek_remote.errors import ConfigError
from sparsek_remote.jobspec import Case, JobSpec, SdpaImpl, SparsekImpl

# Nominal rates per device: dense low-precision math, float32 math, the float64 oracle,
# memory bandwidth (bytes/s). Only their ratios to the fixed costs below matter.
_RATES = {
    "cuda": {"low": 300e12, "float32": 50e12, "float64": 50e12, "bandwidth": 3e12},
    "cpu": {"low": 20e9, "float32": 40e9, "float64": 20e9, "bandwidth": 10e9},
}
# Per item: making inputs, compiling, the allocator; per sample: the shortest sample
# (a CUDA graph replay lasts about a millisecond); an Nsight Compute profile: a fresh
# process that imports torch, then one replayed call per pass.
_ITEM_FIXED_S = {"cuda": 3.0, "cpu": 0.2}
_SAMPLE_FLOOR_S = {"cuda": 1e-3, "cpu": 1e-5}
_NCU_FIXED_S = 20.0
_NCU_PASSES = 40
# The gate calls the implementation, and in low precision the PyTorch reference too.
_GATE_CALLS = 3


@dataclass(frozen=True)
class WorkItem:
    """One (case, implementation) of a job; ``position`` is its place in job order."""

    case: Case
    impl: SparsekImpl | SdpaImpl
    position: int

    @property
    def label(self) -> str:
        return f"{self.case.name}/{self.impl.label}"


@dataclass(frozen=True)
class Shard:
    """The items one worker runs (in job order) and their estimated seconds in all."""

    worker: int
    items: tuple[WorkItem, ...]
    estimated_s: float


def job_items(job: JobSpec) -> list[WorkItem]:
    """Every item of ``job`` in job order: each case with each implementation."""
    pairs = [(case, impl) for case in job.cases for impl in job.implementations]
    return [WorkItem(case, impl, n) for n, (case, impl) in enumerate(pairs)]


def select_items(job: JobSpec, only: Iterable[str] | None = None) -> list[WorkItem]:
    """The items named by ``only`` (``CASE/IMPL`` selectors), in job order; every item
    when ``only`` is None. ConfigError names a selector that matches no item."""
    items = job_items(job)
    if only is None:
        return items
    wanted = set(only)
    known = {item.label for item in items}
    unknown = sorted(wanted - known)
    if unknown:
        raise ConfigError(f"--only names {', '.join(repr(u) for u in unknown)}, which is "
                          "not an item of the job",
                          hint="an item is CASE/IMPLEMENTATION; this job's items: "
                               + ", ".join(sorted(known)))
    if not wanted:
        raise ConfigError("--only selected no item", hint="name at least one CASE/IMPL")
    return [item for item in items if item.label in wanted]


def estimate_seconds(job: JobSpec, item: WorkItem, device: str) -> float:
    """Rough wall time of one item on ``device`` ("cuda" or "cpu"): fixed costs, the
    gate (the float64 oracle on the sampled queries plus a few calls), the timing
    (warmup, then samples until ``max_seconds``) and, when the job's ncu policy
    selects the item, its profile."""
    rates = _RATES[device]
    call_s = _call_seconds(item, rates)
    sample_s = max(call_s, _SAMPLE_FLOOR_S[device])
    timing = job.timing
    timed_s = timing.warmup * sample_s + min(float(timing.max_seconds),
                                             timing.repetitions * sample_s)
    gate_s = _oracle_flops(job, item.case) / rates["float64"] + _GATE_CALLS * call_s
    ncu_s = _NCU_FIXED_S + _NCU_PASSES * call_s if _profiled(job, item) else 0.0
    return _ITEM_FIXED_S[device] + gate_s + timed_s + ncu_s


def _call_seconds(item: WorkItem, rates: dict[str, float]) -> float:
    rate = rates["float32"] if item.case.dtype == "float32" else rates["low"]
    return max(case_flops(item.case, item.impl) / rate,
               case_bytes(item.case, item.impl) / rates["bandwidth"])


def _oracle_flops(job: JobSpec, case: Case) -> float:
    # The oracle evaluates only the sampled query rows, against every key they may see.
    share = min(1.0, job.correctness.max_queries / case.S)
    return 4.0 * case.B * case.Hq * case.D * dense_pairs(case.S, case.causal) * share


def _profiled(job: JobSpec, item: WorkItem) -> bool:
    policy = job.ncu
    return (policy.enabled
            and (not policy.cases or item.case.name in policy.cases)
            and (not policy.implementations or item.impl.label in policy.implementations))


def plan(items: list[WorkItem], workers: int,
         cost: Callable[[WorkItem], float]) -> list[Shard]:
    """Split ``items`` over ``workers`` (>= 1): the costliest item first, each to the
    least loaded worker (ties: the lower worker number; equal costs: job order), so
    the result depends on its inputs alone. The most loaded worker ends at most one
    item's cost above the mean, and within 4/3 of the best split. Workers left
    without an item get an empty shard."""
    if workers < 1:
        raise ConfigError(f"cannot spread items over {workers} workers",
                          hint="ask for at least one GPU or worker")
    costs = {item.position: float(cost(item)) for item in items}
    order = sorted(items, key=lambda item: (-costs[item.position], item.position))
    loads = [(0.0, worker) for worker in range(workers)]
    assigned: list[list[WorkItem]] = [[] for _ in range(workers)]
    for item in order:
        load, worker = heapq.heappop(loads)
        assigned[worker].append(item)
        heapq.heappush(loads, (load + costs[item.position], worker))
    return [Shard(worker, tuple(sorted(chosen, key=lambda item: item.position)),
                  sum(costs[item.position] for item in chosen))
            for worker, chosen in enumerate(assigned)]
