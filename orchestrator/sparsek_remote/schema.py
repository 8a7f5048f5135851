"""The result bundle: one definition for what the runner writes and what `fetch` checks.

A bundle is a folder::

    manifest.json   schema version, run id, the job as run, provenance, and every
                    other file of the bundle with its size and sha256
    results.json    one entry per (case, implementation): gate verdict, timing
                    samples and statistics, FLOPs, bytes, rates
    runner.log      what the runner printed
    ncu/<case>/<implementation>.ncu-rep, .csv
                    Nsight Compute reports, when the job asks for them, and the raw
                    CSV export their metrics in results.json were parsed from

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
# Nsight Compute's "% of peak" can pass 100 by a little; far beyond it is garbage.
Percent = Annotated[float, Field(ge=0, le=1000, allow_inf_nan=False)]
BundlePath = Annotated[str, Field(pattern=BUNDLE_PATH_PATTERN, max_length=255)]
DtypeName = Literal["bfloat16", "float16", "float32"]


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


class CardState(_FromHost):
    """The card's clocks, temperature and power at one moment, read without changing
    anything. ``throttle_reasons`` names what holds the clocks down right then (NVML's
    clock event reasons); ``*_violation_ns`` are NVML's running totals of time spent
    limited by power or heat, so two readings bracket what happened between them."""

    source: Literal["nvml", "nvidia-smi", "unavailable"]
    sm_clock_mhz: NonNegative | None = None
    memory_clock_mhz: NonNegative | None = None
    max_sm_clock_mhz: NonNegative | None = None
    temperature_c: Finite | None = None
    power_w: NonNegative | None = None
    power_limit_w: NonNegative | None = None
    throttle_reasons: Annotated[list[Annotated[str, Field(max_length=64)]],
                                Field(max_length=32)] = []
    power_violation_ns: Annotated[int, Field(ge=0)] | None = None
    thermal_violation_ns: Annotated[int, Field(ge=0)] | None = None
    note: Annotated[str, Field(max_length=500)] | None = None


class GpuProvenance(_FromHost):
    """One GPU of a host whose cases were spread over several (on a CPU host, one
    stand-in worker): ``index`` is nvidia-smi's number for it (the worker's number
    for a stand-in), which each result measured there carries as ``gpu_index``."""

    index: Annotated[int, Field(ge=0, le=1023)]
    name: Annotated[str, Field(max_length=200)]
    uuid: Annotated[str, Field(max_length=100)] | None = None
    driver_version: Annotated[str, Field(max_length=100)] | None = None
    compute_capability: Annotated[str, Field(max_length=20)] | None = None
    card: CardState | None = None


class Provenance(_FromHost):
    """Where and with what a bundle was measured. The host is named by its alias
    only: an address never enters a bundle. ``gpus`` lists every GPU a multi-GPU
    run used (empty for a run on one device); the other device fields then describe
    the first of them."""

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
    card: CardState | None = None
    gpus: Annotated[list[GpuProvenance], Field(max_length=1024)] = []

    @field_validator("gpus")
    @classmethod
    def _unique_gpus(cls, gpus: list[GpuProvenance]) -> list[GpuProvenance]:
        indices = [g.index for g in gpus]
        if len(set(indices)) != len(indices):
            raise ValueError("a GPU index is listed twice")
        return gpus


class Ceilings(_FromHost):
    """What the card itself reached once per job: a large matrix product per dtype
    (TFLOP/s) and a large device-to-device copy (GB/s, bytes read plus written),
    each the median of timed repetitions; the report holds each case's rates
    against these rather than against a datasheet."""

    device: Literal["cuda", "cpu"]
    matmul_tflops: dict[DtypeName, NonNegative] = {}
    copy_gbps: NonNegative | None = None
    method: Annotated[str, Field(max_length=1000)] = ""
    # The GPU that measured them, in a run spread over several (``Results.gpu_ceilings``).
    gpu_index: Annotated[int, Field(ge=0, le=1023)] | None = None


class NcuMetrics(_FromHost):
    """Key Nsight Compute metrics. For a call of several kernels, durations and DRAM
    bytes are summed and the percentages are averaged weighted by kernel duration."""

    duration_ns: NonNegative | None = None
    dram_throughput_pct: Percent | None = None
    memory_throughput_pct: Percent | None = None
    sm_throughput_pct: Percent | None = None
    tensor_pipe_pct: Percent | None = None
    achieved_occupancy_pct: Percent | None = None
    l2_hit_rate_pct: Percent | None = None
    dram_bytes: NonNegative | None = None
    sm_frequency_hz: NonNegative | None = None


class NcuKernel(_FromHost):
    name: Annotated[str, Field(max_length=1000)]
    metrics: NcuMetrics
    tensor_pipe_metric: Annotated[str, Field(max_length=200)] | None = None


class NcuResult(_FromHost):
    """The Nsight Compute profile of one timed (case, implementation), or why there
    is none (``error``, with the fix where one is known)."""

    report_path: BundlePath | None = None
    csv_path: BundlePath | None = None
    clock_control: Literal["none", "base"]
    cache_control: Literal["all", "none"] = "all"
    sections: Annotated[list[Annotated[str, Field(max_length=64)]], Field(max_length=64)] = []
    metrics: NcuMetrics | None = None
    kernels: Annotated[list[NcuKernel], Field(max_length=1024)] = []
    error: Annotated[str, Field(max_length=4000)] | None = None
    tool_version: Annotated[str, Field(max_length=200)] | None = None

    @field_validator("report_path", "csv_path")
    @classmethod
    def _no_dot_segments(cls, path: str | None) -> str | None:
        if path is not None and any(part in (".", "..") for part in path.split("/")):
            raise ValueError("a bundle path may not contain '.' or '..' segments")
        return path


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
    """Every sample of one timed (case, implementation) and their summary.

    "cuda-events" samples are one call each between two CUDA events; "cuda-graph"
    samples are one replay of a graph of ``calls_per_sample`` calls, divided by that
    number; "wall-clock" samples are host-timed calls on the CPU. Calls cycle over
    ``rotation_sets`` copies of the inputs. ``stop_reason`` says what ended sampling:
    the median's 95% CI reached ``target_ci_rel`` ("ci"), the time budget ran out
    ("budget"), or the sample cap was reached ("repetitions"). ``host_enqueue_ms`` is
    the host's median time to queue one call; event-timed samples were preceded by a
    GPU spin of ``head_start_us`` so the GPU never waited for the host inside one.
    When the host's time exceeds the median, calls in a loop run at the host's pace.
    """

    method: Literal["cuda-events", "cuda-graph", "wall-clock"]
    device: Literal["cuda", "cpu"]
    warmup: Annotated[int, Field(ge=0)]
    l2_flushed: bool
    samples_ms: Annotated[list[NonNegative], Field(min_length=1, max_length=1_000_000)]
    stats: Stats
    calls_per_sample: Annotated[int, Field(ge=1, le=1_000_000)] = 1
    rotation_sets: Annotated[int, Field(ge=1, le=4096)] = 1
    stop_reason: Literal["ci", "budget", "repetitions"] | None = None
    target_ci_rel: Annotated[float, Field(gt=0, le=1)] | None = None
    graph_fallback: Annotated[str, Field(max_length=2000)] | None = None
    host_enqueue_ms: NonNegative | None = None
    head_start_us: NonNegative | None = None

    @property
    def host_bound(self) -> bool:
        """The host needs longer to queue one call than the GPU to run it."""
        return self.host_enqueue_ms is not None and self.host_enqueue_ms > self.stats.median_ms

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
    """One (case, implementation): its gate, and only if that passed, its timing.

    ``card_before``/``card_after`` are the card's state just before and after the
    timing; ``throttled`` is True when either shows the clocks held down by power or
    heat (None where the state cannot be read), with the evidence in
    ``throttle_detail``. ``ncu`` holds the Nsight Compute profile of a timed case.
    ``gpu_index`` names the GPU of ``Provenance.gpus`` it ran on, in a multi-GPU run.
    """

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
    input_seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    card_before: CardState | None = None
    card_after: CardState | None = None
    throttled: bool | None = None
    throttle_detail: Annotated[str, Field(max_length=2000)] | None = None
    ncu: NcuResult | None = None
    gpu_index: Annotated[int, Field(ge=0, le=1023)] | None = None

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
        if self.status != "ok" and self.ncu is not None:
            raise ValueError(f"a case with status {self.status!r} must not carry an ncu "
                             "profile: only a case that passed its gate is profiled")
        return self


class Results(_FromHost):
    """A bundle's results. In a run spread over GPUs, ``gpu_ceilings`` holds each GPU's
    own ceilings (by ``gpu_index``) and ``ceilings`` the first GPU's."""

    schema_version: int
    run_id: Annotated[str, Field(pattern=RUN_ID_PATTERN)]
    results: list[CaseResult]
    ceilings: Ceilings | None = None
    gpu_ceilings: Annotated[list[Ceilings], Field(max_length=1024)] = []

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        return _check_version(v)

    @field_validator("gpu_ceilings")
    @classmethod
    def _one_per_gpu(cls, v: list[Ceilings]) -> list[Ceilings]:
        indices = [c.gpu_index for c in v]
        if None in indices or len(set(indices)) != len(indices):
            raise ValueError("gpu_ceilings must name each GPU's index once: "
                             f"got {indices}")
        return v

    def ceilings_for(self, result: CaseResult) -> Ceilings | None:
        """The ceilings of the GPU that measured ``result``."""
        for ceilings in self.gpu_ceilings:
            if ceilings.gpu_index == result.gpu_index:
                return ceilings
        return self.ceilings


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
