"""Merging the workers' sub-bundles of a multi-GPU run into the host's one bundle.

Each result keeps its GPU's index (``gpu_index``) and the manifest's provenance lists
every GPU used (``gpus``), with what that GPU's own runner recorded about it. The
items of a worker that left no valid bundle become results with status "error" whose
text names the GPU and how to run them again, so the bundle still says what happened
to every item and validates like any other.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from sparsek.runner.bundle import write_manifest, write_results
from sparsek.runner.gpus import Worker
from sparsek.runner.metrics import case_bytes, case_flops
from sparsek.runner.shard import Shard, WorkItem
from sparsek_remote.artifacts import ValidBundle, validate_bundle
from sparsek_remote.errors import BundleError, RunnerError
from sparsek_remote.jobspec import JobSpec
from sparsek_remote.schema import (
    LOG_NAME,
    RESULTS_NAME,
    SCHEMA_VERSION,
    CaseResult,
    GpuProvenance,
    Provenance,
    Results,
)

SHARDS_FOLDER = ".shards"
_LOG_TAIL_CHARS = 1500


@dataclass(frozen=True)
class ShardOutcome:
    """How one worker ended: its checked sub-bundle, or why there is none."""

    worker: Worker
    shard: Shard
    folder: Path
    bundle: ValidBundle | None
    failure: str | None
    seconds: float
    stderr_tail: str = ""


@dataclass(frozen=True)
class LostItem:
    """An item whose worker left no result for it."""

    item: str
    gpu_index: int
    worker: str
    reason: str


@dataclass(frozen=True)
class Merged:
    results: Results
    lost: tuple[LostItem, ...]


def lost_error(item: str, worker: str, reason: str) -> str:
    """The error text of a lost item: which GPU lost it, why, and how to run it again."""
    return f"lost with {worker}: {reason}; re-run with --only {item}"


def merge_into(out: Path, job: JobSpec, run_id: str, outcomes: list[ShardOutcome]) -> Merged:
    """Write the host's bundle into ``out`` from the workers' sub-bundles under
    ``out/.shards``, which is removed; ``out`` already holds the run's own log,
    to which every worker's log is appended. RunnerError when no worker left a
    bundle (the shards are then kept for inspection)."""
    valid = [o for o in outcomes if o.bundle is not None]
    if not valid:
        reasons = "; ".join(f"{o.worker.label}: {o.failure}" for o in outcomes)
        raise RunnerError(f"no worker left a bundle, so none was written: {reasons}",
                          hint=f"each worker's log is under {out / SHARDS_FOLDER}")
    results, lost = _results(outcomes)
    first = valid[0].bundle.manifest.provenance  # type: ignore[union-attr]
    provenance = _host_provenance(first, outcomes)
    for outcome in valid:
        _move_files(outcome.bundle, out)  # type: ignore[arg-type]
    _append_logs(out / LOG_NAME, outcomes)
    shutil.rmtree(out / SHARDS_FOLDER)
    # Each GPU's rates are held against its own ceilings; the first's stand for the host.
    own = [(o.worker.number, o.bundle.results.ceilings) for o in valid]  # type: ignore[union-attr]
    merged = Results(schema_version=SCHEMA_VERSION, run_id=run_id, results=results,
                     ceilings=own[0][1],
                     gpu_ceilings=[c.model_copy(update={"gpu_index": n}) for n, c in own if c])
    write_results(out, merged)
    write_manifest(out, run_id=run_id, job=job, provenance=provenance)
    try:
        validate_bundle(out, expected_run_id=run_id, expected_host=first.host_alias)
    except BundleError as err:
        raise RunnerError(f"the merged bundle does not validate: {err.reason}",
                          hint="this is a bug in merging; the workers' logs are in "
                               f"{out / LOG_NAME}") from None
    return Merged(merged, tuple(lost))


def _results(outcomes: list[ShardOutcome]) -> tuple[list[CaseResult], list[LostItem]]:
    """Every item's result in job order, each tagged with its GPU; lost ones made up."""
    placed: list[tuple[int, CaseResult]] = []
    lost = []
    for outcome in outcomes:
        number = outcome.worker.number
        found = {} if outcome.bundle is None else {
            f"{r.case}/{r.implementation}": r for r in outcome.bundle.results.results}
        for item in outcome.shard.items:
            result = found.get(item.label)
            if result is None:
                reason = outcome.failure or "its bundle holds no result for this item"
                lost.append(LostItem(item.label, number, outcome.worker.label, reason))
                result = _lost_result(item, number, lost_error(item.label,
                                                               outcome.worker.label, reason))
            placed.append((item.position, result.model_copy(update={"gpu_index": number})))
    placed.sort(key=lambda pair: pair[0])
    return [result for _, result in placed], lost


def _lost_result(item: WorkItem, gpu_index: int, error: str) -> CaseResult:
    return CaseResult(case=item.case.name, implementation=item.impl.label, status="error",
                      flops=float(case_flops(item.case, item.impl)),
                      bytes=float(case_bytes(item.case, item.impl)),
                      input_seed=item.case.seed, error=error, gpu_index=gpu_index)


def _host_provenance(first: Provenance, outcomes: list[ShardOutcome]) -> Provenance:
    """The first valid worker's provenance (software, host, git, image), with every
    worker's GPU listed; on a GPU host ``device_count`` counts the GPUs used."""
    gpus = [_gpu_entry(o, first) for o in outcomes]
    update: dict[str, object] = {"gpus": sorted(gpus, key=lambda g: g.index)}
    if first.device == "cuda":
        update["device_count"] = len(gpus)
    return first.model_copy(update=update)


def _gpu_entry(outcome: ShardOutcome, first: Provenance) -> GpuProvenance:
    worker = outcome.worker
    base = worker.gpu or GpuProvenance(index=worker.number, name=first.cpu_name or "cpu")
    if outcome.bundle is None:
        return base
    # What the worker itself saw through its pinned device is the record of that GPU.
    own = outcome.bundle.manifest.provenance
    return base.model_copy(update={
        "name": own.device_name or base.name,
        "driver_version": own.driver_version or base.driver_version,
        "compute_capability": own.compute_capability or base.compute_capability,
        "card": own.card})


def _move_files(bundle: ValidBundle, out: Path) -> None:
    """Move a sub-bundle's other files (Nsight Compute reports) to the same paths in
    ``out``; items are disjoint, so their paths are too."""
    for entry in bundle.manifest.files:
        if entry.path in (RESULTS_NAME, LOG_NAME):
            continue
        target = out.joinpath(*entry.path.split("/"))
        if os.path.lexists(target):
            raise RunnerError(f"two workers wrote {entry.path}",
                              hint="this is a bug in merging: items are never shared")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(bundle.path.joinpath(*entry.path.split("/")), target)


def _append_logs(log: Path, outcomes: list[ShardOutcome]) -> None:
    with open(log, "a", encoding="utf-8") as sink:
        for outcome in outcomes:
            items = ", ".join(item.label for item in outcome.shard.items)
            sink.write(f"\n===== {outcome.worker.label}: {items} =====\n")
            sink.write(_worker_log(outcome))


def _worker_log(outcome: ShardOutcome) -> str:
    path = outcome.folder / LOG_NAME
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError:
        text = "(this worker wrote no log)\n"
    if outcome.failure is not None:
        tail = outcome.stderr_tail[-_LOG_TAIL_CHARS:]
        text += f"LOST: {outcome.failure}\n" + (f"its last words:\n{tail}\n" if tail else "")
    return text if text.endswith("\n") else text + "\n"
