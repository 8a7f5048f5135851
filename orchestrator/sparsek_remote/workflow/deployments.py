"""What deploy verified on each docker host, and how a run starts the runner there.

``<state_dir>/deployments/<alias>.json`` records the image tag and ID found on the
host after the load, the remote user's IDs and whether the host has GPUs; it names no
address. ``docker_runner`` turns that record into the ``docker run`` that starts a
run, so a run uses exactly the image deploy put there.
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from sparsek_remote import remote
from sparsek_remote.errors import RemoteError
from sparsek_remote.settings import Settings
from sparsek_remote.workflow.preflight import Preflight

DEPLOYMENTS_FOLDER = "deployments"
# Where the run folder appears inside the container.
CONTAINER_RUN_DIR = "/sparsek/run"


@dataclass(frozen=True)
class Deployment:
    """The image on one docker host, and what ``docker run`` needs to know there."""

    tag: str
    image_id: str
    uid: int | None
    gid: int | None
    gpus: int
    profiling_admin_only: bool | None
    deployed_at: str

    @classmethod
    def from_checks(cls, tag: str, image_id: str, checks: Preflight) -> Deployment:
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        return cls(tag, image_id, checks.uid, checks.gid, len(checks.gpus),
                   checks.profiling_admin_only, now)

    def runner(self, run_dir: str) -> remote.RunnerCommand:
        """The runner in the image, with ``run_dir`` mounted and owned by the remote
        user (``--user``), so the bundle it writes belongs to that user."""
        name = f"sparsek-{posixpath.basename(run_dir.rstrip('/'))}"
        # The runner needs no network; without one, nothing else reaches the benchmark.
        launcher = ["docker", "run", "--rm", "--name", name, "--network", "none",
                    "-v", f"{run_dir}:{CONTAINER_RUN_DIR}"]
        if self.uid is not None and self.gid is not None:
            launcher += ["--user", f"{self.uid}:{self.gid}"]
        if self.gpus:
            launcher += ["--gpus", "all"]
        if self.profiling_admin_only:
            launcher += ["--cap-add", "SYS_ADMIN"]  # what ncu needs on such a host
        # The image's entrypoint is the runner itself; the run flow names the
        # interpreter, so the entrypoint is cleared and ``python`` given instead.
        launcher += ["--entrypoint", "", self.tag]
        return remote.RunnerCommand(
            python="python", launcher=tuple(launcher), run_dir_inside=CONTAINER_RUN_DIR,
            extra_args=("--image-digest", self.image_id), cancel=("docker", "rm", "-f", name))


def deployment_path(state_dir: Path, alias: str) -> Path:
    return Path(state_dir) / DEPLOYMENTS_FOLDER / f"{alias}.json"


def save_deployment(state_dir: Path, alias: str, deployment: Deployment) -> Path:
    """Write the record whole and rename it into place."""
    path = deployment_path(state_dir, alias)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{alias}.")
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        json.dump(asdict(deployment), out, indent=2)
    os.replace(tmp, path)
    return path


def load_deployment(state_dir: Path, alias: str) -> Deployment | None:
    """The record of ``alias``, or None if deploy never verified an image there."""
    path = deployment_path(state_dir, alias)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return Deployment(**data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        raise RemoteError(f"the deploy record {path} cannot be read ({exc})",
                          hint="run `sparsek-remote deploy` again to rewrite it") from None


def docker_runner(settings: Settings) -> Callable[[str, str], remote.RunnerCommand]:
    """The ``DockerRunner`` of the run flow: the image deploy verified on each host."""

    def runner_for(alias: str, run_dir: str) -> remote.RunnerCommand:
        deployment = load_deployment(settings.state_dir, alias)
        if deployment is None:
            raise RemoteError(f"host {alias!r} is a docker host with no image deployed",
                              hint="run `sparsek-remote deploy` first, or set "
                                   f"SPARSEK_HOSTS__{alias.upper()}__KIND=bare to run "
                                   "from the project's wheels instead")
        return deployment.runner(run_dir)

    return runner_for
