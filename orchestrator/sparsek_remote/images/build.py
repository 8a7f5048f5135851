"""Building the image through the Docker daemon, and what the daemon knows about it.

This package is the only one that talks to Docker; docker's exceptions (and those of
the HTTP stack under it) become ``ImageError`` here and nowhere else.
"""

from __future__ import annotations

import collections
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sparsek_remote.errors import ImageError
from sparsek_remote.images.context import DOCKERFILE, HASH_LABEL, BuildContext, write_context_tar

if TYPE_CHECKING:
    import docker

LogSink = Callable[[str], None]
LOG_TAIL_LINES = 40
# A save of a large image starts streaming only once the daemon has written it out,
# which takes minutes for a CUDA image on a slow disk.
DEFAULT_TIMEOUT_S = 900


@dataclass(frozen=True)
class ImageInfo:
    """An image as the local daemon describes it. ``diff_ids`` [n_layers] run from the
    base layer up."""

    image_id: str
    tags: tuple[str, ...]
    diff_ids: tuple[str, ...]
    labels: dict[str, str]
    size: int

    @property
    def content_hash(self) -> str | None:
        return self.labels.get(HASH_LABEL)


@dataclass(frozen=True)
class BuiltImage:
    """The outcome of ``build_image``: ``built`` is False when the tag already existed."""

    tag: str
    content_hash: str
    info: ImageInfo
    built: bool
    seconds: float
    log_tail: str = ""

    @property
    def image_id(self) -> str:
        return self.info.image_id


_DAEMON_HINT = "is the Docker daemon running? `docker info` must answer (or set DOCKER_HOST)"


@contextmanager
def docker_errors(action: str, hint: str | None = None) -> Iterator[None]:
    """Translate whatever Docker or its transport raises into ``ImageError``."""
    try:
        yield
    except ImageError:
        raise
    except Exception as exc:
        if not isinstance(exc, (OSError, *_docker_exceptions())):
            raise
        if "permission denied" in str(exc).lower():
            hint = "this user may not use the Docker socket; join the docker group"
        raise ImageError(f"{action} failed: {type(exc).__name__}: {exc}",
                         hint=hint or "`docker info` and the daemon's log may say more"
                         ) from exc


def _docker_exceptions() -> tuple[type[Exception], ...]:
    # Imported on use: the docker SDK (and the HTTP stack under it) takes a few tenths
    # of a second to import, which every command would pay, runs on bare hosts too.
    from docker.errors import DockerException
    from urllib3.exceptions import HTTPError

    return DockerException, HTTPError


def docker_client(timeout_s: float = DEFAULT_TIMEOUT_S) -> docker.DockerClient:
    """A client for the daemon named by the environment (DOCKER_HOST or the local socket)."""
    import docker

    with docker_errors("connecting to the Docker daemon", _DAEMON_HINT):
        client = docker.from_env(timeout=int(timeout_s))
        client.ping()
        return client


def image_info(client: docker.DockerClient, ref: str) -> ImageInfo | None:
    """What the daemon knows about ``ref`` (a tag or an ID), or None if it has no such image."""
    from docker.errors import ImageNotFound

    with docker_errors(f"inspecting the image {ref}"):
        try:
            raw = client.api.inspect_image(ref)
        except ImageNotFound:
            return None
    return ImageInfo(
        image_id=raw["Id"], tags=tuple(raw.get("RepoTags") or ()),
        diff_ids=tuple((raw.get("RootFS") or {}).get("Layers") or ()),
        labels=dict((raw.get("Config") or {}).get("Labels") or {}), size=int(raw.get("Size", 0)))


def build_image(context: BuildContext, client: docker.DockerClient, *,
                on_log: LogSink | None = None, force: bool = False) -> BuiltImage:
    """Build the image for ``context`` unless the daemon already has its tag.

    The build log goes line by line to ``on_log``; a failed build raises ImageError
    carrying the last lines of the log.
    """
    started = time.monotonic()
    existing = image_info(client, context.tag)
    if existing is not None and existing.content_hash == context.content_hash and not force:
        return BuiltImage(context.tag, context.content_hash, existing, False,
                          time.monotonic() - started)
    tail = _run_build(context, client, on_log or (lambda _line: None))
    info = image_info(client, context.tag)
    if info is None:
        raise ImageError(f"the build reported success but {context.tag} is not there",
                         build_log=tail, hint="see the build log above")
    return BuiltImage(context.tag, context.content_hash, info, True,
                      time.monotonic() - started, tail)


def _run_build(context: BuildContext, client: docker.DockerClient, on_log: LogSink) -> str:
    tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
    with tempfile.TemporaryFile() as archive, docker_errors(f"building {context.tag}"):
        write_context_tar(context, archive)
        archive.seek(0)
        stream = client.api.build(
            fileobj=archive, custom_context=True, dockerfile=DOCKERFILE, tag=context.tag,
            buildargs=dict(context.build_args), rm=True, forcerm=True, pull=False,
            decode=True)
        for item in stream:
            failure = _consume(item, tail, on_log)
            if failure:
                raise ImageError(f"building {context.tag} failed: {failure}",
                                 build_log="\n".join(tail),
                                 hint="the build log's last lines are above; rerun with the "
                                 "same options to see it whole")
    return "\n".join(tail)


def _consume(item: dict[str, Any], tail: collections.deque[str], on_log: LogSink) -> str:
    """Pass one item of the build stream to the log; return the error it reports, if any."""
    if "error" in item:
        message = str(item.get("error") or "").strip()
        tail.append(message)
        on_log(message)
        return message or "the daemon reported an error"
    text = item.get("stream") or item.get("status") or ""
    for line in str(text).splitlines():
        if line.strip():
            tail.append(line)
            on_log(line)
    return ""
