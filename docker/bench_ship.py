"""Benchmark of shipping the image over SSH on loopback (a benchmark, not a test).

By default it sets up its own host: a second Docker daemon (own data root, socket and
network namespace) behind an sshd on 127.0.0.1 whose sessions see it as ``docker``;
this needs root, dockerd, unshare and sshd. With --port and --key it uses an sshd you
run instead (its ``docker`` must not already hold the image).

It deploys a copy of the tree (never the checkout itself) and prints one table:

  raw link            head -c N /dev/zero | ssh host 'cat > /dev/null'
  source              docker save TAG > /dev/null: the fastest any ship can read the image
  sink                docker load -i FILE on the host, the archive already there (ssh
                      carries only the command): the fastest the host can take it in
  baseline            docker save TAG | ssh host docker load (bytes and seconds)
  first deploy        every layer, into an empty daemon
  unchanged deploy    bars: 0 image bytes, <= 3 s
  kernel change       bars: <= 1.2x the changed layer's compressed size, >= 20x fewer
                      bytes than the baseline when the base layers total >= 1 GB
  stream only         the partial archive into `cat > /dev/null` (no docker load)
  ship throughput     image bytes delivered per second by the first deploy (docker load
                      included); bar: >= 0.8x the raw link. Bytes on the wire per second
                      are shown beside it: with gzip they are fewer than the image's.

Run from the project folder, as root:
    python docker/bench_ship.py [--codec auto|gzip|none] [--raw-bytes 1073741824] [--rate 400mbit]
--rate puts the host in a network namespace of its own behind a veth pair limited to
that rate, for a link slower than loopback.
The image is built as the tests build it (a local Debian base and the CPU torch wheel)
unless --builder-image/--runtime-image/--torch-* say otherwise.
"""

from __future__ import annotations

import argparse
import secrets
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "orchestrator"), str(ROOT / "kernels")]

from sparsek_remote import images, remote, workflow  # noqa: E402
from sparsek_remote.images._compress import BLOCK_BYTES, BlockCompressor  # noqa: E402
from sparsek_remote.images._stream import ChunkReader, SavedArchive  # noqa: E402
from sparsek_remote.settings import HostSettings, Settings  # noqa: E402
from tests.integration.docker_fixtures import (  # noqa: E402
    BASE_IMAGE,
    LoopbackSshd,
    ScratchDaemon,
    build_options_for_tests,
    torch_wheel_dir,
)
from tests.integration.test_images_context import copy_inputs  # noqa: E402

ALIAS = "bench"


@dataclass
class Row:
    measure: str
    value: str
    bar: str = ""
    ok: bool | None = None


def main() -> int:
    args = _parser().parse_args()
    work = Path(tempfile.mkdtemp(prefix="sparsek-bench-"))
    host, cleanup = _host(args, work)
    try:
        rows = run(args, work, host)
    finally:
        cleanup()
    _print(rows)
    return 0 if all(r.ok is not False for r in rows) else 1


def run(args: argparse.Namespace, work: Path, host: LoopbackSshd | _External) -> list[Row]:
    tree = copy_inputs(work / "tree")
    options = _options(args, work)
    settings = Settings(_env_file=None, hosts={ALIAS: host.host_settings(kind="docker")},
                        state_dir=work / ".sparsek", results_dir=work / "results")
    client = images.docker_client()
    built = workflow.build(tree, options)
    raw, raw_rate = _raw_link(host, args.raw_bytes)
    source, source_rate = _source(built.tag)
    sink, sink_rate = _sink(host, built.tag, work)
    rows = [raw, source, sink]
    baseline, baseline_s = _baseline(host, built.tag)
    rows.append(baseline)
    _forget(host, built.tag)
    first, first_s = _deploy(settings, tree, options, args.codec)
    rows.append(Row("first deploy (every layer)",
                    f"{_mb(first.ship.tar_bytes)} image, {_mb(first.ship.wire_bytes)} sent, "
                    f"{first_s:.1f} s = {first_s / baseline_s:.2f}x the baseline's time"))
    again, again_s = _deploy(settings, tree, options, args.codec)
    rows.append(Row("unchanged deploy", f"{again.ship.wire_bytes} B sent, {again_s:.2f} s",
                    "0 B and <= 3 s", again.ship.wire_bytes == 0 and again_s <= 3.0))
    rows += _throughput(settings, client, built, first, raw_rate, args.codec,
                        min(source_rate, sink_rate))
    rows += _kernel_change(settings, tree, options, args.codec, client)
    return rows


def _raw_link(host: LoopbackSshd | _External, size: int) -> tuple[Row, float]:
    started = time.monotonic()
    zeros = subprocess.Popen(["head", "-c", str(size), "/dev/zero"], stdout=subprocess.PIPE)
    subprocess.run([*host.ssh_argv(), "cat > /dev/null"], stdin=zeros.stdout, check=True)
    zeros.wait()
    seconds = time.monotonic() - started
    rate = size / seconds / 1e6
    return Row("raw link: ssh cat > /dev/null", f"{rate:.0f} MB/s "
               f"({_mb(size)} in {seconds:.1f} s)"), rate


def _source(tag: str) -> tuple[Row, float]:
    """How fast this daemon hands out the image at all: no ship can be faster."""
    started = time.monotonic()
    saver = subprocess.Popen(["docker", "save", tag], stdout=subprocess.PIPE)
    size = 0
    while chunk := saver.stdout.read(1 << 20):
        size += len(chunk)
    saver.wait()
    seconds = time.monotonic() - started
    rate = size / seconds / 1e6
    return Row("source: docker save > /dev/null", f"{rate:.0f} MB/s "
               f"({_mb(size)} in {seconds:.1f} s)"), rate


def _sink(host: LoopbackSshd | _External, tag: str, work: Path) -> tuple[Row, float]:
    """How fast the host's daemon takes the image in at all, from a file already on the
    host (loopback hosts share this machine's disk): no ship that ends in docker load can
    deliver faster."""
    archive = work / "sink.tar"
    subprocess.run(["docker", "save", "-o", str(archive), tag], check=True)
    _forget(host, tag)
    started = time.monotonic()
    subprocess.run([*host.ssh_argv(), f"docker load -i {shlex.quote(str(archive))}"],
                   check=True, stdout=subprocess.DEVNULL)
    seconds = time.monotonic() - started
    size = archive.stat().st_size
    archive.unlink()
    _forget(host, tag)
    rate = size / seconds / 1e6
    return Row("sink: docker load -i FILE on the host", f"{rate:.0f} MB/s "
               f"({_mb(size)} in {seconds:.1f} s)"), rate


def _baseline(host: LoopbackSshd | _External, tag: str) -> tuple[Row, float]:
    """``docker save | ssh host docker load`` into a host without the image."""
    _forget(host, tag)
    started = time.monotonic()
    saver = subprocess.Popen(["docker", "save", tag], stdout=subprocess.PIPE)
    loader = subprocess.Popen([*host.ssh_argv(), "docker load"], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    size = 0
    while chunk := saver.stdout.read(1 << 20):
        size += len(chunk)
        loader.stdin.write(chunk)
    loader.stdin.close()
    if saver.wait() != 0 or loader.wait() != 0:
        raise SystemExit(f"the baseline failed: {loader.stderr.read().decode()[-2000:]}")
    seconds = time.monotonic() - started
    return Row("baseline: docker save | ssh docker load",
               f"{_mb(size)} sent, {seconds:.1f} s"), seconds


def _kernel_change(settings: Settings, tree: Path, options: images.BuildOptions, codec: str,
                   client) -> list[Row]:
    kernel = tree / "kernels/sparsek/reference.py"
    kernel.write_text(kernel.read_text() + "\n# one changed line\n")
    host, _seconds = _deploy(settings, tree, options, codec)
    tag = images.collect_context(tree, options).tag
    changed = images.image_info(client, tag)
    layer, save_bytes, lower = _save_figures(client, changed, tag, codec)
    sent = host.ship.wire_bytes
    ratio = sent / layer if layer else float("inf")
    fewer = save_bytes / max(sent, 1)
    return [
        Row("kernel change: sent vs its layer",
            f"{_kb(sent)} sent, the layer {_kb(layer)} compressed ({ratio:.2f}x)",
            "<= 1.2x", ratio <= 1.2),
        Row("kernel change: vs docker save | load",
            f"{fewer:.0f}x fewer ({_mb(save_bytes)} vs {_kb(sent)}); lower layers "
            f"{_mb(lower)}", ">= 20x (lower >= 1 GB)",
            fewer >= 20 if lower >= 10**9 else None),
    ]


def _throughput(settings: Settings, client, built: images.BuiltImage,
                first: workflow.HostDeployment, raw_rate: float, codec: str,
                docker_rate: float) -> list[Row]:
    """The stream alone into ``cat``, and the first deploy's delivery rate; docker_rate
    is the slower of docker save and docker load alone, above which no ship can go."""
    archive = images.PartialArchive(client, built.info, built.tag,
                                    images.HostImages(None, frozenset()),
                                    images.archive_layout(client, built.info), codec=codec)
    options = remote.ConnectOptions(known_hosts=settings.state_dir / remote.KNOWN_HOSTS_NAME)
    with remote.Connection(ALIAS, settings.host(ALIAS), options) as conn:
        started = time.monotonic()
        conn.stream_in(["sh", "-c", "cat > /dev/null"], ChunkReader(archive), what="streaming")
        stream_s = time.monotonic() - started
    stats = archive.stats
    wire_rate = stats.wire_bytes / stream_s / 1e6
    ship_rate = first.ship.wire_bytes / first.ship.seconds / 1e6
    image_rate = first.ship.tar_bytes / first.ship.seconds / 1e6
    return [
        Row("stream only (no docker load)",
            f"{stats.tar_bytes / stream_s / 1e6:.0f} MB/s of image, {wire_rate:.0f} MB/s "
            f"sent = {wire_rate / raw_rate:.2f}x raw ({stream_s:.1f} s; "
            f"{stats.stored_blocks} of {-(-stats.tar_bytes // BLOCK_BYTES)} blocks stored)"),
        Row("ship throughput, image delivered",
            f"{image_rate:.0f} MB/s of image = {image_rate / raw_rate:.2f}x raw "
            f"({ship_rate:.0f} MB/s on the wire)", ">= 0.8x raw", image_rate >= 0.8 * raw_rate),
        Row("  ceiling: slower of docker save and load alone",
            f"{docker_rate:.0f} MB/s = {docker_rate / raw_rate:.2f}x raw"),
    ]


def _save_figures(client, info: images.ImageInfo, tag: str, codec: str
                  ) -> tuple[int, int, int]:
    """From one full save of ``tag``: its top layer compressed as the ship compresses
    it, the save's size, and the size of the layers below the top one."""
    layout = images.archive_layout(client, info)
    known = {u for u in layout.units if u is not None}
    sink = BlockCompressor(codec)
    total = lower = 0
    with SavedArchive(client, tag) as tar:
        for member in tar:
            total += 512 + member.size + (-member.size % 512)
            if not (layout.is_layer_member(member.name) and member.isreg()):
                continue
            unit = layout.unit_of(member.name)
            if unit != layout.units[-1] and unit in known:
                lower += member.size
                continue
            handle = tar.extractfile(member)
            while chunk := handle.read(1 << 20):
                list(sink.feed(chunk))
    list(sink.finish())
    return sink.wire_bytes, total + 1024, lower


def _deploy(settings: Settings, tree: Path, options: images.BuildOptions, codec: str
            ) -> tuple[workflow.HostDeployment, float]:
    started = time.monotonic()
    outcome = workflow.deploy(settings, project_root=tree, options=options, codec=codec,
                              trust_new_host_key=True)
    seconds = time.monotonic() - started
    error = outcome.error()
    if error is not None:
        raise SystemExit(f"deploy failed: {error}")
    return outcome.hosts[ALIAS], seconds


def _forget(host: LoopbackSshd | _External, tag: str) -> None:
    subprocess.run([*host.ssh_argv(), f"docker rmi -f {tag} >/dev/null 2>&1; true"],
                   check=True)


@dataclass
class _External:
    """An sshd given on the command line."""

    port: int
    key: Path
    user: str
    fingerprint: str | None

    def host_settings(self, kind: str = "docker") -> HostSettings:
        return HostSettings(address="127.0.0.1", port=self.port, user=self.user,
                            key_path=self.key, host_key_fingerprint=self.fingerprint,
                            kind=kind)

    def ssh_argv(self) -> list[str]:
        return ["ssh", "-i", str(self.key), "-p", str(self.port), "-o",
                "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o",
                "LogLevel=ERROR", f"{self.user}@127.0.0.1"]


class _ShapedLink:
    """A network namespace joined to this one by a veth pair whose way in is limited to
    ``rate`` (tc tbf), for a link slower than loopback. Addresses and names are this
    script's own; everything is removed afterwards."""

    def __init__(self, rate: str) -> None:
        token = secrets.token_hex(2)
        self.netns, self.outer, self.inner = f"skbench-{token}", f"skb{token}o", f"skb{token}i"
        self.subnet = 100 + secrets.randbelow(100)
        self.rate = rate

    @property
    def address(self) -> str:
        return f"10.251.{self.subnet}.2"

    def up(self) -> _ShapedLink:
        for argv in (["ip", "netns", "add", self.netns],
                     ["ip", "link", "add", self.outer, "type", "veth", "peer", "name",
                      self.inner],
                     ["ip", "link", "set", self.inner, "netns", self.netns],
                     ["ip", "addr", "add", f"10.251.{self.subnet}.1/30", "dev", self.outer],
                     ["ip", "link", "set", self.outer, "up"],
                     ["ip", "-n", self.netns, "addr", "add", f"{self.address}/30", "dev",
                      self.inner],
                     ["ip", "-n", self.netns, "link", "set", self.inner, "up"],
                     ["ip", "-n", self.netns, "link", "set", "lo", "up"],
                     ["tc", "qdisc", "add", "dev", self.outer, "root", "tbf", "rate",
                      self.rate, "burst", "1mb", "latency", "100ms"]):
            subprocess.run(argv, check=True, capture_output=True)
        return self

    def down(self) -> None:
        subprocess.run(["ip", "link", "del", self.outer], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)


def _host(args: argparse.Namespace, work: Path):
    if args.port:
        return _External(args.port, args.key, args.user, args.fingerprint), lambda: None
    daemon = ScratchDaemon(work / "d").start()
    link = _ShapedLink(args.rate).up() if args.rate else None
    where = {"address": link.address, "wrapper": ("ip", "netns", "exec", link.netns)
             } if link else {}
    sshd = LoopbackSshd(work / "ssh", daemon.url, **where).start()

    def cleanup() -> None:
        sshd.stop()
        daemon.stop()
        if link is not None:
            link.down()

    return sshd, cleanup


def _options(args: argparse.Namespace, work: Path) -> images.BuildOptions:
    if images.image_info(images.docker_client(), args.base) is None:
        raise SystemExit(f"no image {args.base}: run the image tests once (they build it) "
                         "or pass --base")
    defaults = build_options_for_tests(args.base, torch_wheel_dir(_mkdir(work / "wheels")))
    return images.BuildOptions(
        builder_image=args.builder_image or defaults.builder_image,
        runtime_image=args.runtime_image or defaults.runtime_image,
        torch_index_url=args.torch_index_url or defaults.torch_index_url,
        torch_spec=args.torch_spec or defaults.torch_spec, wheel_dir=defaults.wheel_dir,
        ca_bundle=defaults.ca_bundle)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--codec", choices=images.CODECS, default="auto")
    parser.add_argument("--raw-bytes", type=int, default=1 << 30)
    parser.add_argument("--rate", help="limit the link to this tc rate, e.g. 400mbit "
                        "(the host then sits in a network namespace of its own)")
    parser.add_argument("--base", default=BASE_IMAGE)
    parser.add_argument("--builder-image")
    parser.add_argument("--runtime-image")
    parser.add_argument("--torch-index-url")
    parser.add_argument("--torch-spec")
    parser.add_argument("--port", type=int, help="an sshd of yours on 127.0.0.1")
    parser.add_argument("--key", type=Path, help="its user key")
    parser.add_argument("--user", default="root")
    parser.add_argument("--fingerprint", help="its host key, SHA256:...")
    return parser


def _mb(count: int) -> str:
    return f"{count / 1e6:.0f} MB"


def _kb(count: int) -> str:
    return f"{count / 1e3:.0f} kB"


def _print(rows: list[Row]) -> None:
    width = max(len(r.measure) for r in rows)
    value_width = max(len(r.value) for r in rows)
    print(f"{'measure':<{width}}  {'value':<{value_width}}  {'bar':<25}  verdict")
    for r in rows:
        verdict = "" if r.ok is None else ("PASS" if r.ok else "FAIL")
        print(f"{r.measure:<{width}}  {r.value:<{value_width}}  {r.bar:<25}  {verdict}")


if __name__ == "__main__":
    sys.exit(main())
