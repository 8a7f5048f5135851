"""The job file: what to run, where, and how carefully to measure it.

Parsed strictly: unknown keys, wrong types and values out of range are errors naming
the file, the line and the field. Every string a user writes is limited to a safe set
of characters, because names travel into paths on hosts and into remote commands.
The runner reads the same models (from the JSON copy stored in the bundle), so what
was asked and what was run are described by one definition.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from sparsek_remote.errors import JobSpecError

# Names become folder names and travel into remote commands: keep them boring.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
TARGET_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,31}$"
LOCAL_TARGET = "local"
# Warm-up and least sampling time on a GPU when a job leaves them unset (TimingPolicy).
GPU_STEADY_SECONDS = 1.0

Name = Annotated[str, Field(pattern=NAME_PATTERN)]
Target = Annotated[str, Field(pattern=TARGET_PATTERN)]
PositiveInt = Annotated[StrictInt, Field(gt=0)]
Number = StrictFloat | StrictInt


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Case(_Strict):
    """One attention problem: shapes follow ``q [B, Hq, S, D]``, ``k, v [B, Hkv, S, D]``."""

    name: Name
    B: PositiveInt
    Hq: PositiveInt
    Hkv: PositiveInt
    S: PositiveInt
    D: Annotated[StrictInt, Field(ge=8, le=256)]
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    causal: StrictBool = True
    kv_budget: Annotated[StrictInt, Field(ge=0)]
    window: Annotated[StrictInt, Field(ge=0)]
    seed: Annotated[StrictInt, Field(ge=0, lt=2**63)] = 0

    @model_validator(mode="after")
    def _heads_divide(self) -> Case:
        if self.Hq % self.Hkv != 0:
            raise ValueError(
                f"Hq ({self.Hq}) must be a multiple of Hkv ({self.Hkv}); each kv head "
                "serves Hq // Hkv query heads"
            )
        return self


class SparsekImpl(_Strict):
    """The SparseK operator, through one of its implementations."""

    kind: Literal["sparsek"]
    name: Name | None = None
    impl: Literal["triton", "reference"] = "triton"

    @property
    def label(self) -> str:
        return self.name or f"sparsek-{self.impl}"


class SdpaImpl(_Strict):
    """Dense attention through PyTorch's SDPA with one backend forced."""

    kind: Literal["sdpa"]
    name: Name | None = None
    backend: Literal["cudnn", "flash", "efficient", "math"]

    @property
    def label(self) -> str:
        return self.name or f"sdpa-{self.backend}"


Implementation = Annotated[SparsekImpl | SdpaImpl, Field(discriminator="kind")]


class TimingPolicy(_Strict):
    """How each passing case is timed.

    Samples are taken until the 95% confidence interval of the median lies within
    ``target_ci_rel`` of it (never before ``min_repetitions`` samples), until
    ``repetitions`` samples, or until ``max_seconds`` of timing have passed, whichever
    comes first; the bundle records which. On a GPU, a call whose median is shorter
    than ``graph_below_us`` is timed by replaying a CUDA graph of many calls lasting
    about ``graph_replay_us`` (0 turns graphs off), and ``rotate_inputs`` decides
    whether calls cycle over copies of the inputs at other addresses, so that inputs
    small enough to stay in the L2 cache are not timed from it ("auto": when they fit).
    ``measure_ceilings`` times a large matrix product and a large copy once per job,
    the card's own ceilings that the report holds each rate against.

    Warm-up lasts at least ``warmup`` calls and ``warmup_seconds``; the interval may end
    sampling only after ``min_seconds`` of it. Left unset, both are 1 s on a GPU and 0
    on the CPU: a GPU at its power limit swings its clocks over about half a second, so
    a median of a shorter stretch depends on the phase it caught, and does not repeat.
    """

    warmup: Annotated[StrictInt, Field(ge=0, le=10_000)] = 5
    repetitions: Annotated[StrictInt, Field(ge=3, le=100_000)] = 50
    max_seconds: Annotated[Number, Field(gt=0, le=3600)] = 10.0
    flush_l2: StrictBool = True
    min_repetitions: Annotated[StrictInt, Field(ge=3, le=100_000)] = 10
    target_ci_rel: Annotated[Number, Field(gt=0, le=1)] = 0.01
    graph_below_us: Annotated[Number, Field(ge=0, le=1_000_000)] = 20
    graph_replay_us: Annotated[Number, Field(gt=0, le=1_000_000)] = 1000
    rotate_inputs: Literal["auto", "always", "never"] = "auto"
    measure_ceilings: StrictBool = True
    warmup_seconds: Annotated[Number, Field(ge=0, le=600)] | None = None
    min_seconds: Annotated[Number, Field(ge=0, le=3600)] | None = None

    @model_validator(mode="after")
    def _min_within_max(self) -> TimingPolicy:
        if self.min_seconds is not None and self.min_seconds > self.max_seconds:
            raise ValueError(f"min_seconds ({self.min_seconds:g}) exceeds max_seconds "
                             f"({self.max_seconds:g}); raise max_seconds or lower min_seconds")
        return self

    def for_device(self, device: str) -> TimingPolicy:
        """This policy with the seconds left unset filled in for ``device``."""
        default = GPU_STEADY_SECONDS if device == "cuda" else 0.0
        return self.model_copy(update={
            "warmup_seconds": default if self.warmup_seconds is None else self.warmup_seconds,
            "min_seconds": (min(default, self.max_seconds) if self.min_seconds is None
                            else self.min_seconds)})


class CorrectnessPolicy(_Strict):
    """The gate every case passes before it is timed.

    The error is ``||out - ref|| / ||ref||`` against a float64 evaluation; in low
    precision it must also stay within ``max_error_ratio`` times the error of the
    PyTorch reference run in that same precision. Large shapes check a random sample
    of ``max_queries`` query rows, so the float64 oracle stays affordable.
    """

    reference: Literal["float64"] = "float64"
    tolerance_low_precision: Annotated[Number, Field(gt=0, le=1)] = 1e-2
    tolerance_float32: Annotated[Number, Field(gt=0, le=1)] = 1e-5
    max_error_ratio: Annotated[Number, Field(ge=1)] = 2.0
    max_queries: Annotated[StrictInt, Field(ge=1, le=1_000_000)] = 512


class NcuPolicy(_Strict):
    """Nsight Compute profiling of selected cases: one process per (case, implementation),
    profiling the kernels of one call inside an NVTX range, after the case passed its
    gate and was timed. Empty ``cases`` or ``implementations`` select all of them.
    ``clock_control`` "none" (the default) profiles at the clocks the card runs at;
    "base" lets Nsight Compute lock them to base clocks while it profiles."""

    enabled: StrictBool = False
    cases: list[Name] = Field(default_factory=list)
    implementations: list[Name] = Field(default_factory=list)
    sections: list[Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_]{0,63}$")]] = Field(
        default_factory=lambda: [
            "SpeedOfLight",
            "MemoryWorkloadAnalysis",
            "ComputeWorkloadAnalysis",
            "Occupancy",
            "SpeedOfLight_RooflineChart",
        ]
    )
    clock_control: Literal["none", "base"] = "none"


class Timeouts(_Strict):
    case_s: Annotated[Number, Field(gt=0, le=86_400)] = 600
    job_s: Annotated[Number, Field(gt=0, le=7 * 86_400)] = 3600
    connect_s: Annotated[Number, Field(gt=0, le=600)] = 15


class JobSpec(_Strict):
    """A whole job: the cases, the implementations compared on each, and the policies."""

    name: Name
    # Empty means "the default target of the settings" (``local`` when no .env exists).
    targets: list[Target] = Field(default_factory=list)
    device: Literal["auto", "cuda", "cpu"] = "auto"
    cases: list[Case] = Field(min_length=1)
    implementations: list[Implementation] = Field(min_length=1)
    timing: TimingPolicy = Field(default_factory=TimingPolicy)
    correctness: CorrectnessPolicy = Field(default_factory=CorrectnessPolicy)
    ncu: NcuPolicy = Field(default_factory=NcuPolicy)
    timeouts: Timeouts = Field(default_factory=Timeouts)

    @field_validator("cases")
    @classmethod
    def _unique_cases(cls, cases: list[Case]) -> list[Case]:
        _require_unique([c.name for c in cases], "case name")
        return cases

    @field_validator("implementations")
    @classmethod
    def _unique_impls(cls, impls: list[SparsekImpl | SdpaImpl]) -> list[SparsekImpl | SdpaImpl]:
        _require_unique([i.label for i in impls], "implementation name")
        return impls

    @field_validator("targets")
    @classmethod
    def _unique_targets(cls, targets: list[str]) -> list[str]:
        _require_unique(targets, "target")
        return targets

    @model_validator(mode="after")
    def _ncu_names_exist(self) -> JobSpec:
        known_cases = {c.name for c in self.cases}
        known_impls = {i.label for i in self.implementations}
        for name in self.ncu.cases:
            if name not in known_cases:
                raise ValueError(f"ncu.cases names {name!r}, which is not a case of this job")
        for name in self.ncu.implementations:
            if name not in known_impls:
                raise ValueError(
                    f"ncu.implementations names {name!r}, which is not an implementation "
                    "of this job"
                )
        return self

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)


def _require_unique(values: list[str], what: str) -> None:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise ValueError(f"{what} {value!r} appears twice; each must be unique")
        seen.add(value)


def job_json_schema() -> dict[str, Any]:
    """The JSON Schema of a job file, for editors and for `sparsek-remote schema`."""
    return JobSpec.model_json_schema()


def parse_job(data: Any, *, source: str = "<job>") -> JobSpec:
    """Validate already-loaded job data (a dict), e.g. the copy kept in a bundle."""
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise JobSpecError(source, _describe(exc, {})) from None


def load_job(path: Path | str) -> JobSpec:
    """Read and validate a YAML job file; errors name the file, line and field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise JobSpecError(path, [f"cannot read the file: {exc.strerror}"]) from None
    except UnicodeDecodeError:
        raise JobSpecError(path, ["the file is not UTF-8 text"]) from None
    data, lines = _load_yaml_with_lines(text, path)
    if not isinstance(data, dict):
        raise JobSpecError(path, ["line 1: the top level must be a mapping of fields"])
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise JobSpecError(path, _describe(exc, lines)) from None


def _load_yaml_with_lines(text: str, path: Path) -> tuple[Any, dict[tuple, int]]:
    """Compose YAML into plain data and remember the line of every key and item."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise JobSpecError(path, [f"{where}not valid YAML: {problem}"]) from None
    if root is None:
        raise JobSpecError(path, ["the file is empty"])
    lines: dict[tuple, int] = {}
    try:
        data = _to_data(root, (), lines)
    except _DuplicateKey as dup:
        raise JobSpecError(path, [f"line {dup.line}: key {dup.key!r} appears twice"]) from None
    return data, lines


class _DuplicateKey(Exception):
    def __init__(self, key: str, line: int) -> None:
        self.key, self.line = key, line


def _to_data(node: yaml.Node, loc: tuple, lines: dict[tuple, int]) -> Any:
    lines[loc] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = yaml.SafeLoader(b"").construct_object(key_node)  # scalars only
            if key in out:
                raise _DuplicateKey(str(key), key_node.start_mark.line + 1)
            out[key] = _to_data(value_node, (*loc, key), lines)
            lines[(*loc, key)] = key_node.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_to_data(item, (*loc, i), lines) for i, item in enumerate(node.value)]
    return yaml.SafeLoader(b"").construct_object(node)


def _describe(exc: ValidationError, lines: dict[tuple, int]) -> list[str]:
    """One line per problem: where, which field, what is wrong. Input values are not
    echoed back, so nothing a user pasted by mistake is printed again."""
    problems = []
    for err in exc.errors(include_input=False, include_url=False):
        loc = tuple(p for p in err["loc"] if not _is_union_tag(p))
        field = _dotted(loc) or "(top level)"
        line = _line_for(loc, lines)
        where = f"line {line}: " if line else ""
        problems.append(f"{where}{field}: {_message(err)}")
    return problems


def _is_union_tag(part: Any) -> bool:
    return part in ("sparsek", "sdpa")


def _dotted(loc: tuple) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _line_for(loc: tuple, lines: dict[tuple, int]) -> int | None:
    for end in range(len(loc), -1, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return None


# What each pattern allows, in words, for the message of a value that does not match it.
_PATTERN_RULES = {
    NAME_PATTERN: ("may hold only letters, digits, '.', '_' and '-' (no spaces or shell "
                   "characters), and must start with a letter or digit"),
    TARGET_PATTERN: ("a host alias: lower-case letters, digits, '_' and '-' only, as named "
                     "in .env (or 'local')"),
}


def _message(err: dict[str, Any]) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        return ("unknown key; remove it or check its spelling "
                "(`sparsek-remote schema` lists the keys)")
    if kind == "string_pattern_mismatch":
        return _PATTERN_RULES.get(err.get("ctx", {}).get("pattern"), _PATTERN_RULES[NAME_PATTERN])
    if kind == "missing":
        return "is required"
    msg = err["msg"]
    return msg.removeprefix("Value error, ")


def dump_job(job: JobSpec) -> dict[str, Any]:
    """The job as plain JSON-ready data, as stored in a bundle's manifest."""
    return json.loads(job.model_dump_json())
