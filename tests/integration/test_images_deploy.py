"""deploy against a host that really lacks the image: a second Docker daemon (its own
data root, socket and network namespace) behind an sshd on 127.0.0.1 whose sessions
see it as their ``docker``. The image travels through SSH into its ``docker load``.

Order matters within this module (one fresh host for all): the first deploy sends
every layer, the second nothing, a kernel change one layer. The tree deployed is a
copy taken once, so edits made meanwhile in the checkout change nothing here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from sparsek_remote import artifacts, remote, workflow
from sparsek_remote.errors import RemoteError
from sparsek_remote.jobspec import parse_job
from sparsek_remote.settings import Settings
from sparsek_remote.workflow import preflight
from tests.integration import docker_fixtures
from tests.integration.docker_fixtures import LoopbackSshd, ScratchDaemon
from tests.integration.test_images_build import TINY_JOB
from tests.integration.test_images_context import PROJECT_ROOT, copy_inputs

pytestmark = pytest.mark.integration



@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory, docker_client):
    """A host with an empty Docker daemon, reached over SSH on 127.0.0.1."""
    missing = [tool for tool in ("unshare", "dockerd", "ssh-keygen")
               if shutil.which(tool) is None] + [
        p for p in ("/usr/sbin/sshd",) if not Path(p).exists()]
    if os.geteuid() != 0 or missing:
        docker_fixtures.unavailable(f"a scratch host needs root and {missing or 'root'}")
    folder = tmp_path_factory.mktemp("fresh")
    daemon = ScratchDaemon(folder / "d").start()
    sshd = LoopbackSshd(folder / "ssh", daemon.url).start()
    try:
        yield daemon, sshd
    finally:
        sshd.stop()
        daemon.stop()


@pytest.fixture(scope="module")
def settings(fresh, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    _daemon, sshd = fresh
    state = tmp_path_factory.mktemp("deploy-state")
    return Settings(_env_file=None, hosts={"fresh": sshd.host_settings()},
                    state_dir=state / ".sparsek", results_dir=state / "results")


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_inputs(tmp_path_factory.mktemp("tree"))


def deploy(settings: Settings, root: Path, context, events: list | None = None,
           codec: str = "gzip"):
    sink = (events.append if events is not None else None)
    return workflow.deploy(settings, project_root=root, options=context.options,
                           on_event=sink, codec=codec)


def test_first_deploy_sends_every_layer_and_the_host_has_the_same_image(
        fresh, settings: Settings, tree: Path, project_context) -> None:
    """Uncompressed here: on loopback the daemon's save is the bottleneck, not the link."""
    daemon, _sshd = fresh
    events: list[dict] = []
    outcome = deploy(settings, tree, project_context, events, codec="none")
    host, image = outcome.hosts["fresh"], outcome.image
    assert outcome.error() is None, host.error
    assert host.kind == "docker"
    assert host.ship.layers_sent == host.ship.layers_total == len(image.info.diff_ids)
    assert host.ship.wire_bytes == host.ship.tar_bytes > 10**9
    assert sum(e["bytes"] for e in events if e["event"] == "ship") == host.ship.wire_bytes
    assert daemon.client().images.get(image.tag).id == image.image_id == host.image_id
    record = workflow.load_deployment(settings.state_dir, "fresh")
    assert (record.tag, record.image_id) == (image.tag, image.image_id)


def test_second_deploy_with_nothing_changed_sends_nothing(
        settings: Settings, tree: Path, project_context) -> None:
    deploy(settings, tree, project_context)  # in case this test runs alone
    started = time.monotonic()
    outcome = deploy(settings, tree, project_context)
    elapsed = time.monotonic() - started
    host = outcome.hosts["fresh"]
    assert outcome.error() is None, host.error
    assert not outcome.image.built
    assert host.ship.wire_bytes == 0 and host.ship.layers_sent == 0
    assert host.image_id == outcome.image.image_id
    assert elapsed < 5, f"an unchanged deploy took {elapsed:.1f} s"


def test_a_kernel_change_sends_only_the_layer_it_is_in(
        fresh, settings: Settings, tree: Path, project_context, tmp_path: Path,
        docker_client) -> None:
    daemon, _sshd = fresh
    before = deploy(settings, tree, project_context).image
    changed = copy_inputs(tmp_path / "changed")
    kernel = changed / "kernels/sparsek/reference.py"
    kernel.write_text(kernel.read_text() + "\n# a change that ships\n")
    outcome = deploy(settings, changed, project_context)
    try:
        host = outcome.hosts["fresh"]
        assert outcome.error() is None, host.error
        assert outcome.image.tag != before.tag
        assert (host.ship.layers_sent, host.ship.unplaced_layers) == (1, 1)
        assert host.ship.wire_bytes < 5 * 2**20
        assert daemon.client().images.get(outcome.image.tag).id == outcome.image.image_id
    finally:
        docker_fixtures.remove_image(docker_client, outcome.image.tag)


def test_the_deployed_image_runs_the_runner_on_the_host(
        fresh, settings: Settings, tree: Path, project_context, tmp_path: Path) -> None:
    """The run flow's ``docker run`` for this host, executed there over SSH."""
    _daemon, sshd = fresh
    deploy(settings, tree, project_context)
    job = parse_job(TINY_JOB)
    run_id = artifacts.new_run_id(job.name)
    run_dir = tmp_path / "run"  # the host shares this machine's disk
    run_dir.mkdir()
    (run_dir / "job.json").write_text(job.to_json())
    runner = workflow.docker_runner(settings)("fresh", str(run_dir))
    inside = runner.run_dir_inside
    argv = [*runner.launcher, runner.python, "-m", "sparsek.runner", "--job",
            f"{inside}/job.json", "--out", f"{inside}/bundle", "--run-id", run_id,
            "--host-alias", "fresh", "--device", "cpu", *runner.extra_args]
    result = subprocess.run([*sshd.ssh_argv(), _shell_words(argv)], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    bundle = artifacts.validate_bundle(run_dir / "bundle", expected_run_id=run_id,
                                       expected_host="fresh")
    assert bundle.manifest.provenance.image_digest == runner.extra_args[-1]


def test_a_host_without_docker_fails_alone(fresh, settings: Settings, tree: Path,
                                           project_context, tmp_path: Path) -> None:
    """One host whose docker does not answer, next to one that works."""
    broken = LoopbackSshd(tmp_path / "broken", "unix:///nonexistent/docker.sock").start()
    try:
        both = Settings(_env_file=None, state_dir=settings.state_dir,
                        hosts={"fresh": settings.hosts["fresh"],
                               "broken": broken.host_settings(kind="docker")})
        outcome = deploy(both, tree, project_context)
    finally:
        broken.stop()
    assert outcome.hosts["fresh"].ok
    failed = outcome.hosts["broken"]
    assert not failed.ok and "Docker is not usable" in failed.error.message
    assert failed.preflight is not None and not failed.preflight.docker_usable
    error = outcome.error()
    assert isinstance(error, RemoteError)
    assert "broken" in error.message and "ready: fresh" in error.message


def test_deploy_and_run_tell_the_kind_of_an_auto_host_alike(fresh, settings: Settings,
                                                            tmp_path: Path) -> None:
    """deploy's whole probe and the part a run asks, over SSH: a host whose Docker does
    not answer is bare for both, and the fresh host is the same kind for both."""
    broken = LoopbackSshd(tmp_path / "broken", "unix:///nonexistent/docker.sock").start()
    options = remote.ConnectOptions(known_hosts=tmp_path / "known_hosts")
    try:
        kinds = {}
        for alias, host in (("fresh", settings.hosts["fresh"]),
                            ("broken", broken.host_settings())):
            with remote.Connection(alias, host, options) as conn:
                kinds[alias] = (preflight.probe(conn, host.remote_dir).auto_kind(),
                                preflight.probe_kind(conn))
    finally:
        broken.stop()
    assert kinds["broken"] == ("bare", "bare")
    assert kinds["fresh"][0] == kinds["fresh"][1]


def _shell_words(argv: list[str]) -> str:
    import shlex

    return " ".join(shlex.quote(word) for word in argv)


def test_deploy_readies_a_bare_and_a_docker_host_of_the_ssh_lab(
        hosts, write_env, project_context, project_image) -> None:
    """The lab's hosts have their own addresses and share this machine's daemon, so the
    docker one already holds the image: it is verified, not sent."""
    from sparsek_remote.settings import load_settings

    env = write_env(hosts["alpha"], hosts["gamma"])
    env.write_text(env.read_text().replace("SPARSEK_HOSTS__GAMMA__KIND=bare",
                                           "SPARSEK_HOSTS__GAMMA__KIND=docker"))
    settings = load_settings(env)
    marks = {alias: hosts[alias].log_mark() for alias in ("alpha", "gamma")}
    outcome = workflow.deploy(settings, project_root=PROJECT_ROOT, aliases=["alpha", "gamma"],
                              options=project_context.options)
    assert outcome.error() is None, outcome.error()
    for alias, mark in marks.items():  # one login a host for preflight, ship and install
        assert hosts[alias].sessions_since(mark).logins == 1, alias
    bare, docker_host = outcome.hosts["alpha"], outcome.hosts["gamma"]
    assert bare.kind == "bare" and bare.wheels_tag
    assert (hosts["alpha"].remote_path / "venv" / "bin" / "python").exists()
    assert docker_host.kind == "docker" and docker_host.ship.wire_bytes == 0
    assert docker_host.image_id == outcome.image.image_id
    assert workflow.load_deployment(settings.state_dir, "gamma").tag == outcome.image.tag
