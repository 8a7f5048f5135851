"""Small jobs for the runner's tests (CPU-sized, with odd sizes and GQA), and the
runner's command line to run them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from sparsek_remote.jobspec import JobSpec, parse_job

ROOT = Path(__file__).resolve().parents[2]
RUN_ID = "20260101T000000Z-runner-test-0a1b2c"
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


def run_cli(tmp_path: Path, job_json: str, *extra: str, out: Path | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m sparsek.runner`` on ``job_json`` (written to ``tmp_path/job.json``),
    into ``out`` (default ``tmp_path/bundle``), with ``extra`` arguments."""
    job_file = tmp_path / "job.json"
    job_file.write_text(job_json, encoding="utf-8")
    path = os.pathsep.join([str(ROOT / "orchestrator"), str(ROOT / "kernels")])
    full_env = {**os.environ, "PYTHONPATH": path, **(env or {})}
    args = [sys.executable, "-m", "sparsek.runner", "--job", str(job_file),
            "--out", str(out or tmp_path / "bundle"), "--run-id", RUN_ID,
            "--host-alias", "test-host", *extra]
    return subprocess.run(args, capture_output=True, text=True, env=full_env, timeout=240,
                          check=False)
