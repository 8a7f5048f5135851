"""The SSH layer on its own, against a real sshd: values reach the remote command
unchanged whatever they hold, bytes travel both ways intact, a local source that fails
mid-stream ends the remote command with its own error, and the key passphrase path
(right, wrong, missing) ends where it should."""

from __future__ import annotations

import io
import tarfile

import pytest
from pydantic import SecretStr

from sparsek_remote import remote
from sparsek_remote.errors import RemoteError
from sparsek_remote.settings import HostSettings
from tests.integration.conftest import PASSPHRASE, wait_until
from tests.integration.sshlab import LOGIN_USER, SshdSessions, SshHost

pytestmark = pytest.mark.integration

HOSTILE = ["$(touch pwned)", "`touch pwned`", "a b\tc\nd", "'; touch pwned; '", '"$HOME"',
           "*", "-n", "\\", "~", "; rm -rf x", "ü ✓"]


def connect(host: SshHost, tmp_path, **changes: object) -> remote.Connection:
    settings = HostSettings(address=host.address, user=LOGIN_USER, key_path=host.key.path,
                            key_passphrase=host.key.passphrase,
                            host_key_fingerprint=host.fingerprint(),
                            remote_dir=host.remote_dir).model_copy(update=changes)
    options = remote.ConnectOptions(known_hosts=tmp_path / "known_hosts", timeout_s=5)
    return remote.Connection(host.alias, settings, options).open()


def test_every_value_reaches_the_remote_command_unchanged(hosts, tmp_path) -> None:
    alpha = hosts["alpha"]
    with connect(alpha, tmp_path) as conn:
        folder = f"{conn.home()}/{alpha.remote_dir}/quoting"
        for value in HOSTILE:
            echoed = conn.run(["printf", "%s", value], what="echoing")
            assert echoed.stdout.decode("utf-8") == value
            script = remote.sh_argv('mkdir -p "$1" && cd "$1" && printf %s "$2"', folder,
                                    value)
            assert conn.run(script, what="echoing in a script").stdout.decode() == value
    assert not (alpha.remote_path / "quoting" / "pwned").exists()
    assert not list(alpha.remote_path.parent.rglob("pwned"))


def test_a_connection_opened_before_its_with_block_connects_once(hosts, tmp_path) -> None:
    # The run flow opens a connection, then uses it in a with block: that must keep the
    # one link, not open a second and leave the first one behind, still connected.
    alpha = hosts["alpha"]
    mark = alpha.log_mark()
    conn = connect(alpha, tmp_path)
    with conn as same:
        assert same is conn
        assert conn.run(["true"], what="checking").ok
    wait_until(lambda: alpha.sessions_since(mark).disconnects == 1, limit_s=10)
    assert alpha.sessions_since(mark) == SshdSessions(logins=1, commands=1, disconnects=1)


def test_bytes_travel_both_ways_intact(hosts, tmp_path) -> None:
    alpha = hosts["alpha"]
    payload = bytes(range(256)) * 4099  # about 1 MiB, every byte value
    with connect(alpha, tmp_path) as conn:
        target = f"{conn.home()}/{alpha.remote_dir}/transfer/blob.bin"
        remote.upload_bytes(conn, payload, target, what="sending")
        assert (alpha.remote_path / "transfer" / "blob.bin").read_bytes() == payload
        sink = io.BytesIO()
        remote.download_tar(conn, f"{conn.home()}/{alpha.remote_dir}/transfer", sink,
                            what="fetching")
    sink.seek(0)
    with tarfile.open(fileobj=sink, mode="r:gz") as tar:
        member = tar.extractfile("./blob.bin")
        assert member is not None and member.read() == payload


class _SourceBroke(Exception):
    pass


def test_a_failing_source_ends_the_remote_command_with_its_own_error(hosts, tmp_path) -> None:
    """The command reads until its input ends: it must get that end, not wait out the
    limit, and the caller must see the source's error, not an SSH one."""
    alpha = hosts["alpha"]
    sent = b"y" * 100_000

    class Source:
        def __init__(self) -> None:
            self.left = sent

        def read(self, size: int) -> bytes:
            if not self.left:
                raise _SourceBroke("the archive could not be built")
            chunk, self.left = self.left[:size], self.left[size:]
            return chunk

    with connect(alpha, tmp_path) as conn:
        target = f"{conn.home()}/{alpha.remote_dir}/transfer/cut.bin"
        script = remote.sh_argv('mkdir -p "$(dirname "$1")" && cat > "$1"', target)
        with pytest.raises(_SourceBroke, match="could not be built"):
            conn.stream_in(script, Source(), what="sending", limit=30)  # type: ignore[arg-type]
        assert conn.run(["true"], what="a no-op").ok  # the connection is still usable
    assert (alpha.remote_path / "transfer" / "cut.bin").read_bytes() == sent


def test_the_passphrase_path_right_wrong_and_missing(hosts, tmp_path) -> None:
    beta = hosts["beta"]
    with connect(beta, tmp_path) as conn:
        assert conn.run(["true"], what="a no-op").ok
        assert conn.host_key is not None and conn.host_key.source == "pinned"

    with pytest.raises(RemoteError) as wrong:
        connect(beta, tmp_path, key_passphrase=SecretStr("not " + PASSPHRASE))
    assert f"host 'beta': the key {beta.key.path} cannot be loaded" in str(wrong.value)
    assert "SPARSEK_HOSTS__BETA__KEY_PASSPHRASE" in str(wrong.value)

    with pytest.raises(RemoteError) as missing:
        connect(beta, tmp_path, key_passphrase=None)
    assert "is protected by a passphrase, and none is set" in str(missing.value)
    for error in (wrong.value, missing.value):
        assert PASSPHRASE not in str(error) and PASSPHRASE not in repr(error)
