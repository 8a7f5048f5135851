"""Whom we talk to: an unknown host key is refused unless trusted (then recorded), a
changed key is always refused, a wrong pin too; an unreachable host fails within the
connect timeout. Real sshd, real keys, real namespaces."""

from __future__ import annotations

import time

import pytest

from sparsek_remote import workflow
from sparsek_remote.jobspec import load_job
from sparsek_remote.settings import load_settings
from tests.integration.conftest import stored_bundles
from tests.integration.test_ssh_run import run_id_of
from tests.unit.cli_helpers import cli

pytestmark = pytest.mark.integration


def test_unknown_host_key_is_refused_then_recorded_with_the_trust_flag(
        hosts, write_env, write_job, workdir, wheels_dir) -> None:
    gamma = hosts["gamma"]
    write_env(gamma, pin=False)
    job = write_job("hello", ["gamma"])
    args = ["--wheels", str(wheels_dir), "--no-report"]
    known_hosts = workdir / ".sparsek" / "known_hosts"

    refused = cli("run", str(job), *args, cwd=workdir)

    assert refused.returncode == 5, refused.output
    assert "the host key of 'gamma' is not known" in refused.stderr
    assert f"ssh-ed25519 {gamma.fingerprint()}" in refused.stderr
    assert "--trust-new-host-key" in refused.stderr
    assert not known_hosts.exists() or known_hosts.read_text() == ""
    assert stored_bundles(workdir / "results") == set()

    trusted = cli("run", str(job), "--trust-new-host-key", *args, cwd=workdir)
    assert trusted.returncode == 0, trusted.output
    assert f"recorded the host key of gamma: {gamma.fingerprint()}" in trusted.stderr
    lines = known_hosts.read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("|1|")  # hashed: no address in it
    assert gamma.address not in known_hosts.read_text()
    known = cli("trust", "gamma", cwd=workdir)  # from now on without the flag
    assert known.returncode == 0 and "gamma: already recorded" in known.stdout, known.output
    assert stored_bundles(workdir / "results") == {(run_id_of(trusted.stdout), "gamma")}


def test_changed_host_key_is_refused_naming_both_fingerprints(
        hosts, write_env, write_job, workdir, wheels_dir) -> None:
    delta = hosts["delta"]
    env = write_env(delta, pin=False)
    job = write_job("changed", ["delta"])
    recorded = cli("trust", "delta", cwd=workdir)
    assert recorded.returncode == 0 and "delta: recorded in" in recorded.stdout
    old = delta.fingerprint()
    delta.restart_with_new_host_key()
    new = delta.fingerprint()

    refused = cli("run", str(job), "--wheels", str(wheels_dir), "--trust-new-host-key",
                  cwd=workdir)

    assert refused.returncode == 5, refused.output
    assert "the host key of 'delta' has CHANGED" in refused.stderr
    assert f"presented ssh-ed25519 {new}" in refused.stderr
    assert f"records ssh-ed25519 {old}" in refused.stderr
    assert "trust delta --forget" in refused.stderr
    assert stored_bundles(workdir / "results") == set()

    env.write_text(env.read_text() + f"SPARSEK_HOSTS__DELTA__HOST_KEY_FINGERPRINT={old}\n")
    pinned = cli("trust", "delta", cwd=workdir)
    assert pinned.returncode == 5, pinned.output
    assert "does not match the fingerprint pinned in .env" in pinned.stderr
    assert new in pinned.stderr and old in pinned.stderr


def test_forgetting_a_key_lets_the_new_one_be_trusted(hosts, write_env, workdir) -> None:
    delta = hosts["delta"]
    write_env(delta, pin=False)
    assert cli("trust", "delta", cwd=workdir).returncode == 0
    delta.restart_with_new_host_key()
    assert cli("trust", "delta", cwd=workdir).returncode == 5
    forgot = cli("trust", "delta", "--forget", cwd=workdir)
    assert forgot.returncode == 0 and "forgot 1 recorded key(s)" in forgot.stdout
    again = cli("trust", "delta", cwd=workdir)
    assert again.returncode == 0 and delta.fingerprint() in again.stdout, again.output


def test_unreachable_host_fails_within_the_connect_timeout(
        hosts, write_env, write_job, workdir, wheels_dir) -> None:
    delta = hosts["delta"]
    write_env(delta)
    job = load_job(write_job("nowhere", ["delta"], connect_s=2))
    settings = load_settings(workdir / ".env")
    delta.cut_link()

    started = time.monotonic()
    outcome = workflow.run_on_hosts(job, settings, targets=["delta"], project_root=workdir,
                                    wheels_dir=wheels_dir, with_report=False)
    elapsed = time.monotonic() - started

    error = outcome.error()
    assert error is not None and error.exit_code == 5
    assert "host 'delta': no answer within 2 s while connecting" in error.message
    assert elapsed < 2 + 1.5, elapsed
    assert stored_bundles(workdir / "results") == set()

    delta.restore_link()
    delta.stop()
    refused = workflow.run_on_hosts(job, settings, targets=["delta"], project_root=workdir,
                                    wheels_dir=wheels_dir, with_report=False).error()
    assert refused is not None
    assert "host 'delta': the connection to port 22 was refused" in refused.message
