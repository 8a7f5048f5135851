"""The flow of one run on the local target: job -> runner -> validated bundle -> report.

This module composes the layers below it (the local runner, bundle storage, the
report) and owns no I/O of its own beyond the run's work folder. It returns result
objects; the command line decides what to print and how to exit.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparsek_remote import artifacts, localhost, report
from sparsek_remote.errors import ConfigError, RemoteError
from sparsek_remote.jobspec import LOCAL_TARGET, JobSpec
from sparsek_remote.schema import Results
from sparsek_remote.settings import Settings

EventSink = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class RunOutcome:
    """One job run on one target, stored under ``results/<run_id>/<target>/``."""

    run_id: str
    target: str
    bundle_path: Path
    results: Results
    report: report.Report | None = None
    gate_failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.gate_failures


def resolve_targets(job: JobSpec, settings: Settings, override: str | None = None) -> list[str]:
    """The command line's ``--target`` wins, then the job's ``targets``, then the
    settings' default (``local`` when no ``.env`` names a host)."""
    targets = [override] if override else (list(job.targets) or [settings.default_target])
    for target in targets:
        if target != LOCAL_TARGET:
            settings.host(target)  # raises with a hint when the alias is unknown
    return targets


def run_job(job: JobSpec, settings: Settings, *, project_root: Path,
            target: str | None = None, on_event: EventSink | None = None,
            with_report: bool = True, device: str | None = None) -> RunOutcome:
    """Run ``job`` on one target and store its validated bundle."""
    targets = resolve_targets(job, settings, target)
    if len(targets) != 1:
        raise ConfigError(
            f"the job names {len(targets)} targets ({', '.join(targets)}); this version "
            "runs one target per call", hint="pass --target ALIAS to pick one")
    chosen = targets[0]
    if chosen != LOCAL_TARGET:
        raise RemoteError(
            f"target {chosen!r} is a remote host; this version runs jobs on the local "
            "target only", hint="pass --target local")
    return _run_locally(job, settings, project_root=project_root, on_event=on_event,
                        with_report=with_report, device=device or job.device)


def _run_locally(job: JobSpec, settings: Settings, *, project_root: Path,
                 on_event: EventSink | None, with_report: bool, device: str) -> RunOutcome:
    run_id = artifacts.new_run_id(job.name)
    work = settings.work_dir / run_id
    work.mkdir(parents=True, exist_ok=False)
    try:
        job_file = work / "job.json"
        job_file.write_text(job.to_json(), encoding="utf-8")
        commit, dirty = git_state(project_root)
        invocation = localhost.RunnerInvocation(
            job_file=job_file, out_dir=work / "bundle", run_id=run_id,
            host_alias=LOCAL_TARGET, device=device, git_commit=commit, git_dirty=dirty,
            gpus=settings.gpus_for(LOCAL_TARGET))
        localhost.run_local(invocation, timeout_s=float(job.timeouts.job_s), on_event=on_event)
        stored = artifacts.store_bundle(
            invocation.out_dir, settings.results_dir, quarantine_root=settings.quarantine_dir,
            expected_run_id=run_id, expected_host=LOCAL_TARGET)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    bundle = artifacts.validate_bundle(stored, expected_run_id=run_id)
    written = make_report([run_id], settings) if with_report else None
    failures = [f"{r.case}/{r.implementation}" for r in bundle.results.results
                if r.status in ("gate_failed", "error")]
    return RunOutcome(run_id, LOCAL_TARGET, stored, bundle.results, written, failures)


def make_report(runs: list[str], settings: Settings, *, baseline: str | None = None,
                out_dir: Path | None = None) -> report.Report:
    """Load, re-validate and report on stored runs (one, or two to compare)."""
    data: list[report.RunData] = []
    folders: list[Path] = []
    for run in runs:
        stored = artifacts.load_run(settings.results_dir, run)
        folders.append(stored.path or settings.results_dir / stored.run_id)
        for host, bundle in sorted(stored.bundles.items()):
            data.append(report.RunData(stored.run_id, host, bundle.manifest, bundle.results))
    if not data:
        raise ConfigError(f"no bundles found for {', '.join(runs)}")
    if out_dir is None:
        ids = list(dict.fromkeys(d.run_id for d in data))  # the order the user named
        # Not a valid host alias, so a report folder is never mistaken for a bundle. It
        # lands beside the newest run named, wherever that run is stored.
        name = "_report" if len(ids) == 1 else f"_compare-{ids[0]}"
        out_dir = folders[-1] / name
    return report.write_report(data, out_dir, baseline=baseline)


def git_state(project_root: Path) -> tuple[str | None, bool | None]:
    """The commit of the tree being measured and whether it has local changes."""
    if shutil.which("git") is None:
        return None, None
    try:
        commit = subprocess.run(
            ["git", "-C", str(project_root), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(project_root), "status", "--porcelain"],
            capture_output=True, text=True, timeout=10, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return None, None
    return commit or None, bool(status.strip())
