"""Faults on the host itself: its disk fills up, or its bundle is tampered with. Each
ends in a clear error, and results/ holds exactly what it should."""

from __future__ import annotations

import errno
import json
import threading
from pathlib import Path
from typing import Any

import pytest

from sparsek_remote import workflow
from sparsek_remote.errors import RunnerError
from sparsek_remote.jobspec import load_job
from sparsek_remote.settings import load_settings
from tests.integration.conftest import stored_bundles
from tests.integration.test_ssh_run import run_id_of
from tests.unit.cli_helpers import cli

pytestmark = pytest.mark.integration


def fill(path: Path) -> None:
    """Write zeros to ``path`` until its filesystem has no byte left."""
    block = b"\0" * (1 << 20)
    with open(path, "wb", buffering=0) as out:
        while True:
            try:
                out.write(block)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                if len(block) == 1:
                    return
                block = block[: len(block) // 16 or 1]


def test_disk_full_on_the_host_ends_in_a_clear_error_and_stores_nothing(
        hosts, write_env, write_job, workdir, wheels_dir) -> None:
    full = hosts["full"]  # its remote folder is a 96 MiB tmpfs
    write_env(full)
    job_file = write_job("filling", ["full"], seconds_per_case=0.5)
    filler = full.remote_path / "filler"
    filled = threading.Event()

    def on_event(event: dict[str, Any]) -> None:
        if event.get("event") == "case_start" and not filled.is_set():
            fill(filler)
            filled.set()

    try:
        outcome = workflow.run_on_hosts(load_job(job_file), load_settings(workdir / ".env"),
                                        targets=["full"], project_root=workdir,
                                        on_event=on_event, wheels_dir=wheels_dir,
                                        with_report=False)
        assert filled.is_set()
        error = outcome.hosts["full"].error
        assert isinstance(error, RunnerError), error
        assert "host 'full': the runner failed" in error.message
        assert "No space left on device" in str(error)
        assert "the host's disk is full" in (error.hint or "")
        assert stored_bundles(workdir / "results") == set()

        refused = cli("run", str(job_file), "--wheels", str(wheels_dir), cwd=workdir)
        assert refused.returncode == 5, refused.output
        assert "host 'full': only 0.0 MiB are free under ~/" in refused.stderr
        assert "so none was started" in refused.stderr
        assert stored_bundles(workdir / "results") == set()
        assert not list((workdir / ".sparsek").glob("quarantine/*"))
    finally:
        filler.unlink(missing_ok=True)


def test_tampered_bundle_on_the_host_is_refused_and_quarantined(
        hosts, write_env, write_job, workdir, wheels_dir) -> None:
    alpha = hosts["alpha"]
    write_env(alpha)
    started = cli("run", str(write_job("tampered", ["alpha"])), "--detach", "--wheels",
                  str(wheels_dir), cwd=workdir)
    assert started.returncode == 0, started.output
    run_id = run_id_of(started.stdout)
    assert alpha.wait_for_job_end(run_id) == 0
    results_file = alpha.remote_path / "runs" / run_id / "bundle" / "results.json"
    data = json.loads(results_file.read_text())
    data["results"][0]["gate"]["rel_error"] = 0.0  # a failing case made to look fine
    results_file.write_text(json.dumps(data, indent=2))

    fetched = cli("fetch", cwd=workdir)

    assert fetched.returncode == 3, fetched.output
    assert "bundle refused" in fetched.stderr
    assert "tampered" in fetched.stderr
    assert "kept aside in" in fetched.stderr
    aside = list((workdir / ".sparsek" / "quarantine").iterdir())
    assert len(aside) == 1
    assert (aside[0] / "REASON.txt").read_text().startswith("refused: ")
    assert (aside[0] / "bundle" / "results.json").is_file()
    assert stored_bundles(workdir / "results") == set()
    again = cli("fetch", cwd=workdir)  # refused for good: not fetched over and over
    assert again.returncode == 0 and "nothing to fetch" in again.stdout, again.output
