"""Links that drop in the middle of a run: the job goes on on the host, nothing is lost,
and the bundle arrives complete later (`run --resume`, `fetch`)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from sparsek_remote import artifacts, workflow
from sparsek_remote.errors import RemoteError
from sparsek_remote.jobspec import load_job
from sparsek_remote.settings import load_settings
from tests.integration.conftest import stored_bundles
from tests.integration.sshlab import SshHost
from tests.unit.cli_helpers import cli

pytestmark = pytest.mark.integration


def cut_on_first_case(host: SshHost) -> tuple[Callable[[dict[str, Any]], None], threading.Event]:
    """An event sink that pulls ``host``'s cable when its first case starts."""
    cut = threading.Event()

    def on_event(event: dict[str, Any]) -> None:
        if event.get("host") == host.alias and event.get("event") == "case_start" \
                and not cut.is_set():
            host.cut_link()
            cut.set()

    return on_event, cut


def test_link_cut_mid_run_the_job_finishes_and_resume_fetches_it(
        hosts, write_env, write_job, workdir, wheels_dir) -> None:
    alpha = hosts["alpha"]
    write_env(alpha)
    job = load_job(write_job("cut", ["alpha"], seconds_per_case=1.0, connect_s=2))
    on_event, cut = cut_on_first_case(alpha)

    outcome = workflow.run_on_hosts(job, load_settings(workdir / ".env"), targets=["alpha"],
                                    project_root=workdir, on_event=on_event,
                                    wheels_dir=wheels_dir, with_report=False)

    assert cut.is_set()
    lost = outcome.hosts["alpha"]
    assert lost.state == "failed" and isinstance(lost.error, RemoteError)
    assert "host 'alpha': no answer within 2 s while following the job" in lost.error.message
    assert f"run --resume {outcome.run_id}" in (lost.error.hint or "")
    assert stored_bundles(workdir / "results") == set()
    assert alpha.wait_for_job_end(outcome.run_id) == 0  # it went on without us

    alpha.restore_link()
    resumed = cli("run", "--resume", outcome.run_id, "--no-report", cwd=workdir)
    assert resumed.returncode == 0, resumed.output
    assert f"alpha: stored results/{outcome.run_id}/alpha" in resumed.stdout
    bundle = artifacts.validate_bundle(workdir / "results" / outcome.run_id / "alpha",
                                       expected_run_id=outcome.run_id, expected_host="alpha")
    assert len(bundle.results.results) == 4 and {r.status for r in bundle.results.results} == {
        "ok"}
    assert "nothing to fetch" in cli("fetch", cwd=workdir).stdout


def test_one_of_three_hosts_lost_during_fan_out(hosts, write_env, write_job, workdir,
                                               wheels_dir) -> None:
    alpha, beta, gamma = hosts["alpha"], hosts["beta"], hosts["gamma"]
    write_env(alpha, beta, gamma)
    job = load_job(write_job("trio", ["alpha", "beta", "gamma"], seconds_per_case=0.5,
                             connect_s=2))
    on_event, cut = cut_on_first_case(gamma)

    outcome = workflow.run_on_hosts(job, load_settings(workdir / ".env"),
                                    targets=["alpha", "beta", "gamma"], project_root=workdir,
                                    on_event=on_event, wheels_dir=wheels_dir,
                                    with_report=False)

    run_id = outcome.run_id
    assert cut.is_set()
    assert outcome.succeeded == ["alpha", "beta"] and outcome.failed == ["gamma"]
    error = outcome.error()
    assert error is not None and error.exit_code == 5
    assert (f"run {run_id} failed on 1 of 3 hosts (gamma); succeeded on: alpha, beta"
            in error.message)
    assert "gamma: host 'gamma': no answer within 2 s" in error.message
    assert stored_bundles(workdir / "results") == {(run_id, "alpha"), (run_id, "beta")}

    assert gamma.wait_for_job_end(run_id) == 0
    gamma.restore_link()
    fetched = cli("fetch", cwd=workdir)
    assert fetched.returncode == 0, fetched.output
    assert f"{run_id} gamma: stored" in fetched.stdout
    assert stored_bundles(workdir / "results") == {(run_id, a) for a in ("alpha", "beta",
                                                                         "gamma")}
    stored = artifacts.load_run(workdir / "results", run_id)
    assert sorted(stored.bundles) == ["alpha", "beta", "gamma"]
