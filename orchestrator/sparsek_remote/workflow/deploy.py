"""The deploy flow: build the image once, then for every host in parallel probe it and
make it ready: a docker host gets the layers it lacks, streamed into ``docker load``
and verified by image ID; a bare host gets the project's wheels in a virtualenv.

Each host ends in a ``HostDeployment``; one host failing never stops another. What
was verified on a docker host is recorded under ``<state_dir>/deployments/``, from
which ``docker_runner`` starts runs there.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparsek_remote import images, remote
from sparsek_remote.errors import (
    ImageError,
    RemoteError,
    SparsekRemoteError,
    host_internal_error,
)
from sparsek_remote.settings import Settings
from sparsek_remote.workflow import preflight
from sparsek_remote.workflow._remote_host import known_hosts_path
from sparsek_remote.workflow._wheels import WheelCache
from sparsek_remote.workflow.deployments import Deployment, save_deployment
from sparsek_remote.workflow.preflight import HostKind, Preflight

BuildOptions = images.BuildOptions  # the command line builds one without importing images
CODECS = images.CODECS  # and checks --compression against these

EventSink = Callable[[dict[str, Any]], None]
# Most seconds a short question to a host may take in all. docker load has no limit:
# it applies layers silently for minutes after the last byte, and the connection
# already tells a busy host from a lost one.
QUERY_LIMIT_S = 120.0


@dataclass(frozen=True)
class ShipResult:
    """What reached one docker host: layers, and bytes on the wire (compressed).
    ``unplaced_layers`` > 1: the save format was not the predicted one, so layers the
    host held were sent too (correct, only slower)."""

    layers_total: int
    layers_sent: int
    wire_bytes: int
    tar_bytes: int
    seconds: float
    unplaced_layers: int = 0


@dataclass(frozen=True)
class HostDeployment:
    """One host after deploy: its kind, what it offers, what was shipped or installed,
    and the error that stopped it, if any."""

    alias: str
    kind: HostKind | None = None
    preflight: Preflight | None = None
    image_id: str | None = None
    ship: ShipResult | None = None
    wheels_tag: str | None = None
    seconds: float = 0.0
    error: SparsekRemoteError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def problems(self) -> list[str]:
        return self.preflight.problems(self.kind) if self.preflight and self.kind else []


@dataclass(frozen=True)
class DeployOutcome:
    """The image that was built (or found) and each host's deployment."""

    image: images.BuiltImage
    hosts: dict[str, HostDeployment]

    @property
    def failed(self) -> list[str]:
        return [a for a, h in self.hosts.items() if not h.ok]

    def error(self) -> SparsekRemoteError | None:
        """None if every host is ready; the host's own error for a single host; else a
        ``RemoteError`` naming the hosts that failed and those that did not."""
        failed = self.failed
        if not failed:
            return None
        if len(self.hosts) == 1:
            return self.hosts[failed[0]].error
        # A host's error spans lines (its command's output, its hint): indented under it.
        lines = "\n".join(f"  - {a}: " + str(self.hosts[a].error).replace("\n", "\n    ")
                          for a in failed)
        ready = ", ".join(a for a in self.hosts if a not in failed) or "none"
        return RemoteError(f"deploy failed on {len(failed)} of {len(self.hosts)} hosts "
                           f"({', '.join(failed)}); ready: {ready}\n{lines}",
                           hint="fix what each line says and run deploy again; hosts that "
                                "are ready cost nothing the second time")


@dataclass(frozen=True)
class _Shared:
    """What the threads of one deploy share."""

    settings: Settings
    image: images.BuiltImage
    options: remote.ConnectOptions
    codec: images.Codec
    wheels: WheelCache  # built once, by the first bare host that needs them
    on_event: EventSink

    def stage(self, alias: str, state: str, detail: str = "") -> None:
        self.on_event({"event": "host", "host": alias, "state": state, "detail": detail})


def deploy(settings: Settings, *, project_root: Path, aliases: list[str] | None = None,
           options: images.BuildOptions | None = None, codec: images.Codec = "auto",
           trust_new_host_key: bool = False, connect_timeout_s: float = 15.0,
           on_event: EventSink | None = None) -> DeployOutcome:
    """Build the image, then ship and probe every host in ``aliases`` (default: all)."""
    chosen = list(aliases) if aliases else sorted(settings.hosts)
    for alias in chosen:
        settings.host(alias)  # unknown aliases fail before anything is built
    sink = on_event or (lambda _event: None)
    built = build(project_root, options, on_event=sink)
    connect = remote.ConnectOptions(
        known_hosts=known_hosts_path(settings),
        timeout_s=connect_timeout_s, trust_new_host_key=trust_new_host_key)
    wheels = WheelCache(Path(project_root), settings.state_dir / "wheels")
    shared = _Shared(settings, built, connect, codec, wheels, sink)
    with ThreadPoolExecutor(max_workers=max(1, len(chosen))) as pool:
        done = list(pool.map(lambda a: _deploy_host(shared, a), chosen))
    return DeployOutcome(built, {d.alias: d for d in done})


def build(project_root: Path, options: images.BuildOptions | None = None, *,
          on_event: EventSink | None = None) -> images.BuiltImage:
    """Build the image for the tree at ``project_root`` unless its tag exists."""
    sink = on_event or (lambda _event: None)
    context = images.collect_context(Path(project_root), options)
    sink({"event": "build", "state": "start", "tag": context.tag})
    client = images.docker_client()
    built = images.build_image(context, client,
                               on_log=lambda line: sink({"event": "build_log", "line": line}))
    sink({"event": "build", "state": "built" if built.built else "cached", "tag": built.tag,
          "seconds": built.seconds})
    return built


def _deploy_host(shared: _Shared, alias: str) -> HostDeployment:
    started = time.monotonic()
    found: dict[str, Any] = {}
    try:
        _prepare_host(shared, alias, found)
    except Exception as exc:  # a bug on one host must not lose the others' deployments
        error = exc if isinstance(exc, SparsekRemoteError) else host_internal_error(alias, exc)
        shared.stage(alias, "failed", error.message)
        return HostDeployment(alias, seconds=time.monotonic() - started, error=error, **found)
    shared.stage(alias, "ready")
    return HostDeployment(alias, seconds=time.monotonic() - started, **found)


def _prepare_host(shared: _Shared, alias: str, found: dict[str, Any]) -> None:
    """Probe, then ship or install; fills ``found`` as it learns, so a failure still
    reports what was known."""
    host = shared.settings.host(alias)
    shared.stage(alias, "connecting")
    with remote.Connection(alias, host, shared.options) as conn:
        shared.stage(alias, "probing")
        found["preflight"] = checks = preflight.probe(conn, host.remote_dir)
        found["kind"] = kind = checks.auto_kind() if host.kind == "auto" else host.kind
        if kind == "bare":
            shared.stage(alias, "installing")
            found["wheels_tag"] = _install_bare(shared, conn)
            return
        if not checks.docker_usable:
            raise RemoteError(f"host {alias!r} is set to be a docker host, but Docker is not "
                              f"usable there: {checks.docker_error or 'not installed'}",
                              hint=f"install Docker, or set SPARSEK_HOSTS__{alias.upper()}"
                                   "__KIND=bare")
        found["ship"] = _ship(shared, conn, alias)
        found["image_id"] = _verify(shared, conn)
        save_deployment(shared.settings.state_dir, alias, Deployment.from_checks(
            shared.image.tag, shared.image.image_id, checks))


def _install_bare(shared: _Shared, conn: remote.Connection) -> str:
    installed = remote.installed_tag(conn)  # learns the home folder too
    env = remote.install(conn, f"{conn.home()}/{conn.host.remote_dir}", shared.wheels(),
                         installed=installed)
    return env.wheels_tag


def _ship(shared: _Shared, conn: remote.Connection, alias: str) -> ShipResult:
    """Send the layers the host lacks into its ``docker load``; nothing if it has the
    image already."""
    image = shared.image
    shared.stage(alias, "comparing layers")
    query = conn.run(remote.sh_argv(images.HOST_QUERY_SCRIPT, image.tag), check=False,
                     what="asking which image layers the host holds", limit=QUERY_LIMIT_S)
    if query.exit_code == images.DOCKER_UNUSABLE_EXIT or not query.ok:
        raise conn.failure("asking Docker which layers it holds", query,
                           hint="the remote user must be able to run `docker` (docker group)")
    held = images.parse_host_query(query.text)
    total = len(image.info.diff_ids)
    if held.image_id == image.image_id:
        return ShipResult(total, 0, 0, 0, 0.0)
    client = images.docker_client()
    layout = images.archive_layout(client, image.info)
    archive = images.PartialArchive(client, image.info, image.tag, held, layout,
                                    codec=shared.codec)
    shared.stage(alias, "shipping", f"{sum(1 for h in held.held_mask(image.info) if not h)} "
                                    f"of {total} layers")
    source = images.ChunkReader(_reported(archive, lambda n: shared.on_event(
        {"event": "ship", "host": alias, "bytes": n})))
    loaded = conn.stream_in(list(images.LOAD_ARGV), source, what="loading the image",
                            check=False)
    if not loaded.ok:
        raise conn.failure("loading the image (docker load)", loaded)
    stats = archive.stats
    if stats is None:
        raise ImageError(f"host {alias!r}: docker load ended before the archive did",
                         hint="run deploy again")
    return ShipResult(stats.layers_total, stats.layers_sent, stats.wire_bytes,
                      stats.tar_bytes, stats.seconds, stats.unplaced_layers)


def _verify(shared: _Shared, conn: remote.Connection) -> str:
    image = shared.image
    shared.stage(conn.alias, "verifying")
    result = conn.run(images.image_id_argv(image.tag), what="reading the image ID",
                      check=False, limit=QUERY_LIMIT_S)
    seen = result.text.strip()
    if seen != image.image_id:
        raise ImageError(f"host {conn.alias!r}: after the load, {image.tag} has the ID "
                         f"{seen or '(none)'}, not {image.image_id}",
                         hint="the archive did not arrive whole; run deploy again")
    return seen


def _reported(chunks: Iterable[bytes], on_bytes: Callable[[int], None]) -> Iterator[bytes]:
    """The archive's chunks, each reported (its size) as it leaves for the host. A chunk
    that cannot be built ends the host's ``docker load`` there, and ``stream_in`` raises
    its error."""
    for chunk in chunks:
        on_bytes(len(chunk))
        yield chunk
