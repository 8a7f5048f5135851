"""The result bundle: one definition for what the runner writes and what `fetch` checks.

A bundle is a folder::

    manifest.json   schema version, run id, the job as run, provenance, and every
                    other file of the bundle with its size and sha256
    results.json    one entry per (case, implementation): gate verdict, timing
                    samples and statistics, FLOPs, bytes, rates
    runner.log      what the runner printed
    ncu/...         Nsight Compute reports, when the job asks for them

What comes back from a host is parsed by its ``schema_version`` ("tolerant out"):
fields a newer runner adds are ignored, but every field this version knows is
checked for type and range, so malformed or impossible numbers are refused.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sparsek_remote.jobspec import NAME_PATTERN, TARGET_PATTERN, JobSpec

SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = frozenset({SCHEMA_VERSION})

MANIFEST_NAME = "manifest.json"
RESULTS_NAME = "results.json"
LOG_NAME = "runner.log"
REQUIRED_FILES = frozenset({RESULTS_NAME, LOG_NAME})

RUN_ID_PATTERN = r"^[0-9]{8}T[0-9]{6}Z-[A-Za-z0-9._-]{1,64}-[0-9a-f]{6}$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
# Relative POSIX paths of plain names, at most four deep: no absolute paths, no
# backslashes; "." and ".." segments are refused by FileEntry's validator.
BUNDLE_PATH_PATTERN = r"^[A-Za-z0-9._-]+(?:/[A-Za-z0-9._-]+){0,3}$"

NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Finite = Annotated[float, Field(allow_inf_nan=False)]


class _FromHost(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class FileEntry(_FromHost):
    path: Annotated[str, Field(pattern=BUNDLE_PATH_PATTERN, max_length=255)]
    size: Annotated[int, Field(ge=0, le=64 * 2**30)]
    sha256: Annotated[str, Field(pattern=SHA256_PATTERN)]

    @field_validator("path")
    @classmethod
    def _no_dot_segments(cls, path: str) -> str:
        if any(part in (".", "..") for part in path.split("/")):
            raise ValueError("a bundle path may not contain '.' or '..' segments")
        return path


class Provenance(_FromHost):
    """Where and with what a bundle was measured. The host is named by its alias
    only: an address never enters a bundle."""

    host_alias: Annotated[str, Field(pattern=TARGET_PATTERN)]
    device: Literal["cuda", "cpu"]
    device_name: Annotated[str, Field(max_length=200)]
    device_count: Annotated[int, Field(ge=0, le=1024)] = 0
    compute_capability: str | None = None
    driver_version: str | None = None
    cuda_version: str | None = None
    cpu_name: Annotated[str, Field(max_length=200)] = ""
    platform: Annotated[str, Field(max_length=200)] = ""
    python_version: str
    torch_version: str
    triton_version: str | None = None
    package_version: str
    git_commit: Annotated[str, Field(pattern=r"^[0-9a-f]{7,40}$")] | None = None
    git_dirty: bool | None = None
    image_digest: Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$")] | None = None


class Stats(_FromHost):
    """Summary of the timing samples, in milliseconds."""

    n: Annotated[int, Field(ge=1)]
    median_ms: NonNegative
    mean_ms: NonNegative
    min_ms: NonNegative
    max_ms: NonNegative
    q1_ms: NonNegative
    q3_ms: NonNegative
    iqr_ms: NonNegative
    ci95_low_ms: NonNegative
    ci95_high_ms: NonNegative

    @model_validator(mode="after")
    def _ordered(self) -> Stats:
        eps = 1e-9 * max(1.0, self.max_ms)
        if not (self.min_ms - eps <= self.q1_ms <= self.median_ms + eps
                and self.median_ms <= self.q3_ms + eps and self.q3_ms <= self.max_ms + eps):
            raise ValueError("statistics are not ordered min <= q1 <= median <= q3 <= max")
        if not (self.ci95_low_ms - eps <= self.median_ms <= self.ci95_high_ms + eps):
            raise ValueError("the median lies outside its own confidence interval")
        return self


class Timing(_FromHost):
    method: Literal["cuda-events", "wall-clock"]
    device: Literal["cuda", "cpu"]
    warmup: Annotated[int, Field(ge=0)]
    l2_flushed: bool
    samples_ms: Annotated[list[NonNegative], Field(min_length=1, max_length=1_000_000)]
    stats: Stats

    @model_validator(mode="after")
    def _samples_match(self) -> Timing:
        if len(self.samples_ms) != self.stats.n:
            raise ValueError(f"stats.n is {self.stats.n} but there are "
                             f"{len(self.samples_ms)} samples")
        lo, hi = min(self.samples_ms), max(self.samples_ms)
        if not (math.isclose(lo, self.stats.min_ms, rel_tol=1e-6, abs_tol=1e-9)
                and math.isclose(hi, self.stats.max_ms, rel_tol=1e-6, abs_tol=1e-9)):
            raise ValueError("stats.min_ms/max_ms do not match the samples")
        return self


class Gate(_FromHost):
    """The correctness verdict that precedes any timing."""

    passed: bool
    rel_error: NonNegative | None
    reference_rel_error: NonNegative | None = None
    tolerance: Annotated[float, Field(gt=0, le=1)]
    max_error_ratio: Annotated[float, Field(ge=1)]
    checked_queries: Annotated[int, Field(ge=0)]
    total_queries: Annotated[int, Field(ge=0)]
    message: Annotated[str, Field(max_length=4000)] = ""


class CaseResult(_FromHost):
    case: Annotated[str, Field(pattern=NAME_PATTERN)]
    implementation: Annotated[str, Field(pattern=NAME_PATTERN)]
    status: Literal["ok", "gate_failed", "error", "skipped"]
    gate: Gate | None = None
    timing: Timing | None = None
    flops: NonNegative
    bytes: NonNegative
    tflops: NonNegative | None = None
    gbps: NonNegative | None = None
    peak_extra_memory_bytes: Annotated[int, Field(ge=0)] | None = None
    error: Annotated[str, Field(max_length=8000)] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> CaseResult:
        if self.status == "ok":
            if self.gate is None or not self.gate.passed:
                raise ValueError("a case marked ok must carry a passing gate")
            if self.timing is None:
                raise ValueError("a case marked ok must carry its timing")
        elif self.timing is not None:
            raise ValueError(f"a case with status {self.status!r} must not carry timing: "
                             "nothing is timed unless its gate passed")
        if self.status == "gate_failed" and (self.gate is None or self.gate.passed):
            raise ValueError("a case marked gate_failed must carry a failing gate")
        return self


class Results(_FromHost):
    schema_version: int
    run_id: Annotated[str, Field(pattern=RUN_ID_PATTERN)]
    results: list[CaseResult]

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        return _check_version(v)


class Manifest(_FromHost):
    schema_version: int
    run_id: Annotated[str, Field(pattern=RUN_ID_PATTERN)]
    created_at: Annotated[str, Field(max_length=64)]
    job: JobSpec
    provenance: Provenance
    files: Annotated[list[FileEntry], Field(min_length=1, max_length=10_000)]

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        return _check_version(v)

    @field_validator("files")
    @classmethod
    def _unique_paths(cls, files: list[FileEntry]) -> list[FileEntry]:
        paths = [f.path for f in files]
        if len(set(paths)) != len(paths):
            raise ValueError("a file is listed twice")
        if MANIFEST_NAME in paths:
            raise ValueError("the manifest must not list itself")
        missing = REQUIRED_FILES - set(paths)
        if missing:
            raise ValueError(f"required files are not listed: {sorted(missing)}")
        return files


def _check_version(version: int) -> int:
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise ValueError(
            f"unknown schema version {version}; this sparsek-remote reads "
            f"{sorted(SUPPORTED_SCHEMA_VERSIONS)}: upgrade it to read newer bundles"
        )
    return version


def bundle_json_schemas() -> dict[str, Any]:
    """JSON Schemas of the bundle's two documents, for readers in other languages."""
    return {"manifest": Manifest.model_json_schema(), "results": Results.model_json_schema()}
