"""Small jobs for the runner's tests (CPU-sized, with odd sizes and GQA), and the
runner's command line to run them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from sparsek_remote.jobspec import JobSpec, parse_job

ROOT = Path(__file__).resolve().parents[2]
RUN_ID = "20260101T000000Z-runner-test-0a1b2c"
HOST = "test-host"
FAST_TIMING = {"warmup": 1, "repetitions": 5, "max_seconds": 0.2, "flush_l2": True}


def case(name: str, **overrides: Any) -> dict[str, Any]:
    """B1 Hq4 Hkv2 S48 D32 fp32 causal K8 W4 unless overridden."""
    fields = {"name": name, "B": 1, "Hq": 4, "Hkv": 2, "S": 48, "D": 32, "dtype": "float32",
              "causal": True, "kv_budget": 8, "window": 4, "seed": 7}
    return {**fields, **overrides}


def make_job(cases: list[dict[str, Any]], implementations: list[dict[str, Any]],
             **policies: Any) -> JobSpec:
    return parse_job({"name": "runner-test", "device": "cpu", "cases": cases,
                      "implementations": implementations,
                      "timing": policies.pop("timing", FAST_TIMING), **policies})


SPARSEK_REFERENCE = {"kind": "sparsek", "impl": "reference"}
SDPA_MATH = {"kind": "sdpa", "backend": "math"}
SDPA_CUDNN = {"kind": "sdpa", "backend": "cudnn"}
SDPA_EFFICIENT = {"kind": "sdpa", "backend": "efficient"}


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment with the project's packages on PYTHONPATH, plus ``extra``."""
    path = os.pathsep.join([str(ROOT / "orchestrator"), str(ROOT / "kernels")])
    return {**os.environ, "PYTHONPATH": path, **(extra or {})}


def cli_args(job_file: Path, out: Path, *extra: str) -> list[str]:
    """``python -m sparsek.runner`` on ``job_file`` into ``out``, as run ``RUN_ID`` on
    ``HOST``, with ``extra`` arguments."""
    return [sys.executable, "-m", "sparsek.runner", "--job", str(job_file), "--out", str(out),
            "--run-id", RUN_ID, "--host-alias", HOST, *extra]


def run_cli(tmp_path: Path, job_json: str, *extra: str, out: Path | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m sparsek.runner`` on ``job_json`` (written to ``tmp_path/job.json``),
    into ``out`` (default ``tmp_path/bundle``), with ``extra`` arguments."""
    job_file = tmp_path / "job.json"
    job_file.write_text(job_json, encoding="utf-8")
    return subprocess.run(cli_args(job_file, out or tmp_path / "bundle", *extra),
                          capture_output=True, text=True, env=cli_env(env), timeout=240,
                          check=False)


def events_of(stdout: str) -> list[dict]:
    """Every stdout line must be one JSON object with an "event" field."""
    events = [json.loads(line) for line in stdout.splitlines()]
    assert all(isinstance(e, dict) and isinstance(e.get("event"), str) for e in events)
    return events
