"""The whole path a user takes, through the real command line, on two hosts of the SSH
lab with their own addresses: ``deploy`` readies a docker host (gamma, whose sessions
see this machine's daemon as their ``docker``) and a bare host (beta, whose key has a
passphrase), one ``run`` fans a CPU job out to both, and ``fetch`` finds nothing left.

The working folder is a copy of the project's inputs holding the lab's ``.env``, as a
user's checkout would; the image is the one the image tests build from it (same inputs,
same tag), so the docker host is verified, not sent a gigabyte.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sparsek_remote import artifacts
from sparsek_remote.settings import load_settings
from sparsek_remote.workflow import load_deployment
from tests.integration.conftest import PASSPHRASE, stored_bundles
from tests.integration.test_images_context import copy_inputs
from tests.integration.test_ssh_run import all_text, run_id_of
from tests.unit.cli_helpers import cli

pytestmark = pytest.mark.integration



def deploy_options(context) -> list[str]:
    """The command-line form of the build options the image tests use."""
    options = context.options
    argv = ["--builder-image", options.builder_image, "--runtime-image", options.runtime_image,
            "--torch-index-url", options.torch_index_url, "--torch-spec", options.torch_spec,
            "--wheels", str(options.wheel_dir)]
    if options.ca_bundle is not None:
        argv += ["--ca-bundle", str(options.ca_bundle)]
    return argv


def test_deploy_run_and_fetch_on_a_docker_and_a_bare_host(
        hosts, write_env, write_job, workdir: Path, project_context, project_image) -> None:
    bare, docker_host = hosts["beta"], hosts["gamma"]
    copy_inputs(workdir)
    env = write_env(bare, docker_host)
    env.write_text(env.read_text().replace("SPARSEK_HOSTS__GAMMA__KIND=bare",
                                           "SPARSEK_HOSTS__GAMMA__KIND=docker"))
    job = write_job("twokinds", ["beta", "gamma"])

    deployed = cli("deploy", *deploy_options(project_context), cwd=workdir, timeout=600)
    assert deployed.returncode == 0, deployed.output
    record = load_deployment(workdir / ".sparsek", "gamma")
    assert record is not None and record.image_id == project_image.image_id
    assert load_deployment(workdir / ".sparsek", "beta") is None
    assert (bare.remote_path / "venv" / "bin" / "python").exists()

    ran = cli("run", str(job), cwd=workdir, timeout=600)

    assert ran.returncode == 0, ran.output
    run_id = run_id_of(ran.stdout)
    for alias in ("beta", "gamma"):
        assert f"{alias}: stored results/{run_id}/{alias}" in ran.stdout, ran.output
    assert stored_bundles(workdir / "results") == {(run_id, "beta"), (run_id, "gamma")}
    stored = artifacts.load_run(workdir / "results", run_id)
    for alias in stored.bundles:
        again = artifacts.validate_bundle(workdir / "results" / run_id / alias,
                                          expected_run_id=run_id, expected_host=alias)
        assert again.manifest.provenance.host_alias == alias
        assert {r.status for r in again.results.results} == {"ok"}
    provenance = {a: b.manifest.provenance for a, b in stored.bundles.items()}
    assert provenance["gamma"].image_digest == project_image.image_id
    assert provenance["beta"].image_digest is None
    runs = json.loads((workdir / ".sparsek" / "runs" / f"{run_id}.json").read_text())
    assert {a: h["stage"] for a, h in runs["hosts"].items()} == {"beta": "stored",
                                                                 "gamma": "stored"}

    fetched = cli("fetch", cwd=workdir)
    assert fetched.returncode == 0 and "nothing to fetch" in fetched.stdout, fetched.output

    seen = deployed.output + ran.output + fetched.output + all_text(
        workdir / "results", workdir / ".sparsek",
        bare.remote_path / "runs" / run_id, docker_host.remote_path / "runs" / run_id)
    settings = load_settings(env)
    assert settings.hosts["beta"].key_passphrase is not None  # so the check below can fail
    for secret in (PASSPHRASE, bare.address, docker_host.address):
        assert secret not in seen, f"{secret!r} leaked"
