"""Write real, valid result bundles for tests, through the schema's own models.

Digests are computed here with hashlib, not with ``artifacts.file_entries``, so a
bug in the code under test cannot make its own fixtures agree with it.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sparsek_remote.jobspec import JobSpec, parse_job
from sparsek_remote.schema import (
    LOG_NAME,
    MANIFEST_NAME,
    RESULTS_NAME,
    SCHEMA_VERSION,
    CaseResult,
    FileEntry,
    Gate,
    Manifest,
    Provenance,
    Results,
    Stats,
    Timing,
)

RUN_ID = "20250102T030405Z-smoke-a1b2c3"
NCU_FILE = "ncu/small-sparsek-reference.ncu-rep"


def make_job(name: str = "smoke") -> JobSpec:
    """Two cases, two implementations: enough to name unknown ones."""
    return parse_job({
        "name": name,
        "targets": ["local", "h100a"],
        "device": "cpu",
        "cases": [
            {"name": "small", "B": 1, "Hq": 2, "Hkv": 1, "S": 64, "D": 16,
             "kv_budget": 16, "window": 8},
            {"name": "odd", "B": 1, "Hq": 2, "Hkv": 2, "S": 63, "D": 24,
             "dtype": "float32", "kv_budget": 8, "window": 4},
        ],
        "implementations": [{"kind": "sparsek", "impl": "reference"},
                            {"kind": "sdpa", "backend": "math"}],
    })


def make_stats(samples: list[float]) -> Stats:
    ordered = sorted(samples)
    median = statistics.median(ordered)
    q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    return Stats(n=len(ordered), median_ms=median, mean_ms=statistics.fmean(ordered),
                 min_ms=ordered[0], max_ms=ordered[-1], q1_ms=q1, q3_ms=q3, iqr_ms=q3 - q1,
                 ci95_low_ms=min(q1, median), ci95_high_ms=max(q3, median))


def passing_case(case: str, implementation: str,
                 samples: tuple[float, ...] = (1.25, 1.0, 1.5, 1.125, 1.375)) -> CaseResult:
    timing = Timing(method="wall-clock", device="cpu", warmup=2, l2_flushed=False,
                    samples_ms=list(samples), stats=make_stats(list(samples)))
    gate = Gate(passed=True, rel_error=1e-3, reference_rel_error=8e-4, tolerance=1e-2,
                max_error_ratio=2.0, checked_queries=64, total_queries=64)
    return CaseResult(case=case, implementation=implementation, status="ok", gate=gate,
                      timing=timing, flops=2.0e6, bytes=4.0e5, tflops=1.6e-3, gbps=0.32,
                      peak_extra_memory_bytes=4096)


def gate_failed_case(case: str, implementation: str) -> CaseResult:
    gate = Gate(passed=False, rel_error=0.5, reference_rel_error=1e-3, tolerance=1e-2,
                max_error_ratio=2.0, checked_queries=63, total_queries=63,
                message="relative error 0.5 exceeds tolerance 0.01")
    return CaseResult(case=case, implementation=implementation, status="gate_failed",
                      gate=gate, flops=1.5e6, bytes=3.0e5)


def make_results(run_id: str = RUN_ID, *, with_gate_failure: bool = True) -> Results:
    cases = [passing_case("small", "sparsek-reference"), passing_case("small", "sdpa-math"),
             passing_case("odd", "sdpa-math")]
    if with_gate_failure:
        cases.append(gate_failed_case("odd", "sparsek-reference"))
    else:
        cases.append(passing_case("odd", "sparsek-reference"))
    return Results(schema_version=SCHEMA_VERSION, run_id=run_id, results=cases)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listing(folder: Path) -> list[FileEntry]:
    """Every file but the manifest, with real sizes and digests."""
    files = sorted(p for p in folder.rglob("*")
                   if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST_NAME)
    return [FileEntry(path=p.relative_to(folder).as_posix(), size=p.stat().st_size,
                      sha256=sha256_file(p)) for p in files]


def write_bundle(folder: Path, *, run_id: str = RUN_ID, host_alias: str = "local",
                 with_gate_failure: bool = True, with_ncu: bool = True) -> Path:
    """Write a complete, valid bundle into ``folder`` (created) and return it."""
    folder.mkdir(parents=True)
    (folder / RESULTS_NAME).write_text(
        make_results(run_id, with_gate_failure=with_gate_failure).model_dump_json(indent=2),
        encoding="utf-8")
    (folder / LOG_NAME).write_text("gate small/sparsek-reference: passed\n"
                                   "timing small/sparsek-reference: 5 samples\n",
                                   encoding="utf-8")
    if with_ncu:
        (folder / NCU_FILE).parent.mkdir()
        (folder / NCU_FILE).write_bytes(bytes(range(256)) * 64)
    write_manifest(folder, run_id=run_id, host_alias=host_alias)
    return folder


def write_manifest(folder: Path, *, run_id: str = RUN_ID, host_alias: str = "local") -> None:
    provenance = Provenance(host_alias=host_alias, device="cpu", device_name="cpu",
                            cpu_name="test cpu", platform="linux", python_version="3.11.7",
                            torch_version="2.13.0", triton_version="3.9.0",
                            package_version="0.1.0", git_commit="c9d51ed", git_dirty=False)
    manifest = Manifest(schema_version=SCHEMA_VERSION, run_id=run_id,
                        created_at="2025-01-02T03:04:05Z", job=make_job(),
                        provenance=provenance, files=listing(folder))
    (folder / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2), encoding="utf-8")


def edit_json(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Apply ``change`` to a JSON document in place (may write NaN: no validation)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


def relist(folder: Path) -> None:
    """Bring the manifest's file list up to date with the disk, keeping all else,
    as a host that writes a bad file and then an honest manifest would."""
    def update(data: dict[str, Any]) -> None:
        data["files"] = [e.model_dump() for e in listing(folder)]
    edit_json(folder / MANIFEST_NAME, update)
