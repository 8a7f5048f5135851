"""The project's image, built from docker/Dockerfile on a real daemon: not rebuilt when
nothing changed, a kernel change rebuilds only the top layer, a failed build says why,
and the image runs the runner on the CPU into a bundle that validates."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from sparsek_remote import artifacts, images
from sparsek_remote.errors import ImageError
from sparsek_remote.jobspec import parse_job
from tests.integration import docker_fixtures
from tests.integration.test_images_context import copy_inputs

pytestmark = pytest.mark.integration

# The daemon, base image and project image fixtures come from conftest.py.
build_options_for_tests = docker_fixtures.build_options_for_tests
remove_image = docker_fixtures.remove_image

TINY_JOB = {
    "name": "image-smoke", "device": "cpu",
    "cases": [{"name": "tiny", "B": 1, "Hq": 2, "Hkv": 1, "S": 33, "D": 16,
               "dtype": "float32", "causal": True, "kv_budget": 8, "window": 4, "seed": 1}],
    "implementations": [{"kind": "sparsek", "impl": "reference"},
                        {"kind": "sdpa", "backend": "math"}],
    "timing": {"warmup": 1, "repetitions": 3, "max_seconds": 2.0, "flush_l2": False},
}


def test_unchanged_tree_is_not_rebuilt(docker_client, project_image, base_image, wheel_dir,
                                       project_root_session) -> None:
    log: list[str] = []
    started = time.monotonic()
    again = images.build_image(
        images.collect_context(project_root_session,
                               build_options_for_tests(base_image, wheel_dir)),
        docker_client, on_log=log.append)
    assert not again.built and log == []
    assert again.image_id == project_image.image_id
    assert time.monotonic() - started < 5


def test_image_is_labelled_runs_as_non_root_and_holds_no_ca(docker_client, project_image
                                                           ) -> None:
    raw = docker_client.api.inspect_image(project_image.tag)
    config = raw["Config"]
    assert config["Labels"][images.HASH_LABEL] == project_image.content_hash
    assert config["User"] == "sparsek"
    assert config["Entrypoint"] == ["python", "-m", "sparsek.runner"]
    history = str(docker_client.api.history(project_image.tag))
    assert "BEGIN CERTIFICATE" not in history
    probe = _run(project_image.tag, ["sh", "-c", "id -u; test ! -e /etc/pip.conf && "
                                     "test ! -e /tmp/ca && echo clean"])
    assert probe.stdout.split() == ["10001", "clean"], probe.stderr


def test_runner_in_the_image_writes_a_bundle_that_validates(project_image, tmp_path: Path
                                                            ) -> None:
    job = parse_job(TINY_JOB)
    run_id = artifacts.new_run_id(job.name)
    work = tmp_path / "run"
    work.mkdir()
    os.chmod(work, 0o777)  # the image's user (uid 10001) writes the bundle here
    (work / "job.json").write_text(job.to_json())
    result = _run(project_image.tag, [
        "--job", "/data/job.json", "--out", "/data/bundle", "--run-id", run_id,
        "--host-alias", "docker-test", "--device", "cpu",
        "--image-digest", project_image.image_id], mounts={work: "/data"}, entrypoint=False)
    assert result.returncode == 0, result.stderr[-3000:]
    bundle = artifacts.validate_bundle(work / "bundle", expected_run_id=run_id,
                                       expected_host="docker-test")
    assert bundle.manifest.provenance.image_digest == project_image.image_id
    assert {r.implementation for r in bundle.results.results} == {"sparsek-reference",
                                                                  "sdpa-math"}
    assert all(r.status == "ok" for r in bundle.results.results), bundle.results


def test_a_kernel_change_rebuilds_only_the_top_layer(docker_client, project_image, base_image,
                                                     wheel_dir, tmp_path: Path) -> None:
    tree = copy_inputs(tmp_path / "tree")
    kernel = tree / "kernels/sparsek/reference.py"
    kernel.write_text(kernel.read_text() + "\n# changed\n")
    context = images.collect_context(tree, build_options_for_tests(base_image, wheel_dir))
    try:
        changed = images.build_image(context, docker_client)
        assert changed.built and changed.tag != project_image.tag
        old, new = project_image.info.diff_ids, changed.info.diff_ids
        assert len(old) == len(new) and old[:-1] == new[:-1] and old[-1] != new[-1]
    finally:
        remove_image(docker_client, context.tag)


def test_a_failed_build_raises_with_the_end_of_its_log(docker_client, base_image, wheel_dir,
                                                       tmp_path: Path) -> None:
    tree = copy_inputs(tmp_path / "tree")
    dockerfile = tree / "docker/Dockerfile"
    lines = dockerfile.read_text().splitlines()
    first_from = next(i for i, line in enumerate(lines) if line.startswith("FROM"))
    lines.insert(first_from + 1, "RUN echo doomed-step-says-hello && exit 3")
    dockerfile.write_text("\n".join(lines) + "\n")
    context = images.collect_context(tree, build_options_for_tests(base_image, wheel_dir))
    seen: list[str] = []
    with pytest.raises(ImageError) as caught:
        images.build_image(context, docker_client, on_log=seen.append)
    assert "doomed-step-says-hello" in caught.value.build_log
    assert "returned a non-zero code: 3" in str(caught.value)
    assert any("doomed-step-says-hello" in line for line in seen)
    assert images.image_info(docker_client, context.tag) is None


def _run(tag: str, args: list[str], *, mounts: dict[Path, str] | None = None,
         entrypoint: bool = True) -> subprocess.CompletedProcess:
    argv = ["docker", "run", "--rm", "--network", "none"]
    for host, inside in (mounts or {}).items():
        argv += ["-v", f"{host}:{inside}"]
    if entrypoint:
        argv += ["--entrypoint", args[0], tag, *args[1:]]
    else:
        argv += [tag, *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=600)
