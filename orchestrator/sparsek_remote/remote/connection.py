"""One SSH connection to one host, and the one place SSH failures become ``RemoteError``.

Built on paramiko's ``Transport`` so that each step is ours to order: TCP within the
connect timeout, then the host key is checked (``hostkeys``) before any credential
is offered, then the user key is loaded and used. The key's passphrase is handed to
paramiko in this process only; it never reaches a command line, an environment or
a message. Every operation runs under a watchdog: when a host is silent for the
connect timeout it is asked whether it is still there (an SSH keepalive), and when
that goes unanswered too the transport is closed, so a cut link ends in a clear
error instead of a hang, while a merely busy host is waited for.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import paramiko

from sparsek_remote.errors import RemoteError
from sparsek_remote.remote import hostkeys
from sparsek_remote.remote._channel import BytesSource, Watchdog, feed, pump
from sparsek_remote.remote.commands import quote_argv, shown
from sparsek_remote.settings import HostSettings

# A larger window than paramiko's default keeps a long link busy while streaming.
_WINDOW_BYTES = 16 * 2**20
# The watchdog, not this, bounds how long opening a channel may take.
_OPEN_WAIT_S = 3600.0
_DEFAULT_KEYS = ("id_ed25519", "id_ecdsa", "id_rsa")


@dataclass(frozen=True)
class ConnectOptions:
    """How to connect: where recorded host keys live, how long to wait, whether an
    unknown host key may be recorded (the user's explicit trust flag)."""

    known_hosts: Path
    timeout_s: float = 15.0
    trust_new_host_key: bool = False


@dataclass(frozen=True)
class CommandResult:
    """What a remote command did: its exit code and output (stderr as text)."""

    alias: str
    command: str
    exit_code: int
    stdout: bytes
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @property
    def text(self) -> str:
        return self.stdout.decode("utf-8", errors="replace")

    def tail(self, lines: int = 20) -> str:
        """The last lines of stderr (or of stdout when stderr is empty)."""
        source = self.stderr.strip() or self.text.strip()
        return "\n".join(source.splitlines()[-lines:])


def disk_full_hint(remote_dir: str) -> str:
    return (f"the host's disk is full: free space under ~/{remote_dir} on the host "
            "(df -h shows where), then run again")


class Connection:
    """An open SSH session to the host named ``alias``; use as a context manager."""

    def __init__(self, alias: str, host: HostSettings, options: ConnectOptions) -> None:
        self.alias = alias
        self.host = host
        self.options = options
        self.host_key: hostkeys.HostKeyCheck | None = None
        self._transport: paramiko.Transport | None = None
        self._home: str | None = None

    def __enter__(self) -> Connection:
        if self._transport is None:  # ``with conn.open():`` must not connect twice
            self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def timeout_s(self) -> float:
        return self.options.timeout_s

    def open(self) -> Connection:
        """Connect, check the host key, authenticate: all within the connect timeout."""
        keys = self._user_keys()  # a missing or locked key fails before any traffic
        try:
            with self._translated("connecting", probe=False) as dog:
                sock = socket.create_connection((self.host.address, self.host.port),
                                                timeout=self.timeout_s)
                transport = self._handshake(sock)
                self._authenticate(transport, keys)
                if dog.expired:
                    raise TimeoutError()
        except BaseException:
            self.close()
            raise
        transport.set_keepalive(30)
        return self

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def is_open(self) -> bool:
        """Whether the link is up and logged in. A command that failed on the host leaves
        it so; a cut link, an unanswered host or a timeout closes it."""
        transport = self._transport
        return transport is not None and transport.is_active() and transport.is_authenticated()

    def home(self) -> str:
        """The remote user's home folder (remote paths here are relative to it)."""
        if self._home is None:
            result = self.run(["sh", "-c", 'printf %s "$HOME"'], what="finding the home folder")
            self.learn_home(result.text)
        return self._home

    def learn_home(self, printed: str) -> None:
        """Keep the home folder as a command that also did other work printed it, so
        that home() needs no round trip of its own."""
        self._home = printed.strip() or "."

    def run(self, argv: Sequence[str], *, what: str, limit: float | None = None,
            stdin: bytes | None = None, check: bool = True) -> CommandResult:
        """Run ``argv`` (each word quoted) and collect its output. It may take as long
        as the host keeps answering, or ``limit`` seconds in all when given."""
        chunks: list[bytes] = []
        source = BytesSource(stdin) if stdin is not None else None
        result = self._exec(argv, what=what, limit=limit, source=source,
                            sink=chunks.append)
        full = CommandResult(self.alias, result.command, result.exit_code,
                             b"".join(chunks), result.stderr)
        return self._checked(full, what) if check else full

    def stream_out(self, argv: Sequence[str], sink: BinaryIO, *, what: str,
                   limit: float | None = None, check: bool = True) -> CommandResult:
        """Run ``argv`` and write its stdout to ``sink`` as it arrives."""
        result = self._exec(argv, what=what, limit=limit, source=None, sink=sink.write)
        return self._checked(result, what) if check else result

    def stream_in(self, argv: Sequence[str], source: BinaryIO, *, what: str,
                  limit: float | None = None, check: bool = True) -> CommandResult:
        """Run ``argv`` with ``source`` streamed to its stdin, chunk by chunk."""
        chunks: list[bytes] = []
        result = self._exec(argv, what=what, limit=limit, source=source,
                            sink=chunks.append)
        full = CommandResult(self.alias, result.command, result.exit_code,
                             b"".join(chunks), result.stderr)
        return self._checked(full, what) if check else full

    def failure(self, what: str, result: CommandResult, *, hint: str | None = None
                ) -> RemoteError:
        """The error for a command that ran but failed: what, exit code, its last lines."""
        tail = result.tail(12)
        detail = "\n".join(f"    {line}" for line in tail.splitlines())
        if hint is None and "No space left on device" in tail:
            hint = disk_full_hint(self.host.remote_dir)
        return RemoteError(
            f"host {self.alias!r}: {what} failed (exit code {result.exit_code}, command "
            f"{result.command})" + (f"\n  it said:\n{detail}" if detail else ""), hint=hint)

    def _checked(self, result: CommandResult, what: str) -> CommandResult:
        if not result.ok:
            raise self.failure(what, result)
        return result

    def _handshake(self, sock: socket.socket) -> paramiko.Transport:
        transport = paramiko.Transport(sock, default_window_size=_WINDOW_BYTES)
        self._transport = transport  # from here on, the watchdog can close it
        transport.banner_timeout = transport.handshake_timeout = self.timeout_s
        preferred = hostkeys.preferred_key_types(self.options.known_hosts, self.host)
        if preferred:
            options = transport.get_security_options()
            known = list(options.key_types)
            options.key_types = [t for t in preferred if t in known] + [
                t for t in known if t not in preferred]
        transport.start_client(timeout=self.timeout_s)
        self.host_key = hostkeys.check_host_key(
            self.alias, self.host, transport.get_remote_server_key(),
            known_hosts=self.options.known_hosts,
            trust_new=self.options.trust_new_host_key)
        return transport

    def _authenticate(self, transport: paramiko.Transport, keys: list[paramiko.PKey]) -> None:
        transport.auth_timeout = self.timeout_s
        for key in keys[:-1]:
            try:
                transport.auth_publickey(self.host.user, key)
                return
            except paramiko.AuthenticationException:
                continue
        transport.auth_publickey(self.host.user, keys[-1])

    def _user_keys(self) -> list[paramiko.PKey]:
        """The key from .env, else those of ssh-agent and ~/.ssh (as ssh would try)."""
        if self.host.key_path is not None:
            return [self._load_key(self.host.key_path.expanduser())]
        keys: list[paramiko.PKey] = list(paramiko.Agent().get_keys())
        for name in _DEFAULT_KEYS:
            path = Path("~/.ssh").expanduser() / name
            if path.is_file():
                keys.append(self._load_key(path))
        if not keys:
            raise RemoteError(
                f"host {self.alias!r}: no SSH key to log in with",
                hint=f"set SPARSEK_HOSTS__{self.alias.upper()}__KEY_PATH in .env, or load "
                     "a key into ssh-agent")
        return keys

    def _load_key(self, path: Path) -> paramiko.PKey:
        secret = self.host.key_passphrase
        env_name = f"SPARSEK_HOSTS__{self.alias.upper()}__KEY_PASSPHRASE"
        try:
            # The only place the passphrase is unwrapped: straight into paramiko.
            return paramiko.PKey.from_path(
                path, secret.get_secret_value().encode("utf-8") if secret else None)
        except FileNotFoundError:
            raise RemoteError(f"host {self.alias!r}: the key file {path} does not exist",
                              hint=f"check SPARSEK_HOSTS__{self.alias.upper()}__KEY_PATH"
                              ) from None
        except (paramiko.SSHException, ValueError, TypeError, OSError) as exc:
            # An encrypted key with no passphrase given: paramiko's own formats raise
            # PasswordRequiredException, the OpenSSH format (through cryptography) TypeError.
            if secret is None and isinstance(exc, (paramiko.PasswordRequiredException,
                                                   TypeError)):
                raise RemoteError(f"host {self.alias!r}: the key {path} is protected by a "
                                  "passphrase, and none is set",
                                  hint=f"set {env_name} in .env") from None
            raise RemoteError(
                f"host {self.alias!r}: the key {path} cannot be loaded "
                f"({type(exc).__name__}); a wrong passphrase or a file that is not a "
                "private key", hint=f"check {env_name} and the key file") from None

    def _exec(self, argv: Sequence[str], *, what: str, limit: float | None,
              source: BinaryIO | BytesSource | None,
              sink: Callable[[bytes], object]) -> CommandResult:
        command = quote_argv(argv)
        stderr = bytearray()
        with self._translated(what, limit=limit) as dog:
            channel = self._live_transport(what).open_session(timeout=_OPEN_WAIT_S)
            channel.exec_command(command)
            feeder = feed(channel, source, dog) if source is not None else None
            pump(channel, sink, stderr, dog)
            exit_code = channel.recv_exit_status()
            if dog.expired:
                raise TimeoutError()
            if feeder is not None:
                feeder.join()
                # Else the command's own failure, or the source's, tells the story.
                if exit_code == 0 and feeder.source_error is None:
                    feeder.raise_if_failed()
        if feeder is not None and feeder.source_error is not None:
            # As it was raised: a failure on this side, not an SSH one; the command's
            # failure on a cut-short input is only its consequence.
            raise feeder.source_error
        return CommandResult(self.alias, shown(argv), exit_code, b"",
                             stderr.decode("utf-8", errors="replace"))

    def _live_transport(self, what: str) -> paramiko.Transport:
        if self._transport is None or not self._transport.is_active():
            raise RemoteError(f"host {self.alias!r}: the connection is closed, so "
                              f"{what} could not start",
                              hint="the link was lost earlier; connect again")
        return self._transport

    @contextmanager
    def _translated(self, what: str, *, limit: float | None = None,
                    probe: bool = True) -> Iterator[Watchdog]:
        """Guard an operation and translate anything paramiko or the socket layer
        raises into RemoteError. ``limit``: most seconds in all (None: while the host
        answers); ``probe``: ask a silent host whether it is still there."""
        dog = Watchdog(self.timeout_s, self._abort, limit_s=limit,
                        is_alive=self._answers if probe else None)
        try:
            with dog:
                yield dog
        except RemoteError:
            if dog.expired:
                raise self._expired(what, dog) from None
            raise
        except Exception as exc:
            if dog.expired or isinstance(exc, TimeoutError):
                raise self._expired(what, dog) from None
            raise _translate(exc, self.alias, self.host, what) from None

    def _answers(self) -> bool:
        """Whether the host's sshd still replies (a keepalive request), within the
        connect timeout: tells a busy host from a cut link."""
        transport = self._transport
        if transport is None or not self.is_open():
            return False
        replied = threading.Event()

        def ask() -> None:
            with contextlib.suppress(Exception):
                transport.global_request("keepalive@openssh.com", wait=True)
                if transport.is_active():
                    replied.set()

        threading.Thread(target=ask, daemon=True).start()
        return replied.wait(self.timeout_s)

    def _abort(self) -> None:
        if self._transport is not None:
            self._transport.close()
        self._transport = None

    def _expired(self, what: str, dog: Watchdog) -> RemoteError:
        if dog.reason == "limit":
            return RemoteError(
                f"host {self.alias!r}: {what} took longer than {dog.limit_s:g} s and was "
                "given up", hint="the host is overloaded or the command hangs there")
        return RemoteError(
            f"host {self.alias!r}: no answer within {self.timeout_s:g} s while {what}; the "
            "host is unreachable or the link is down",
            hint="check that the host is up and reachable; if the link is just slow, raise "
                 "timeouts.connect_s in the job")


def _translate(exc: BaseException, alias: str, host: HostSettings, what: str) -> RemoteError:
    where = f"host {alias!r}"
    env = f"SPARSEK_HOSTS__{alias.upper()}"
    if isinstance(exc, paramiko.AuthenticationException):
        return RemoteError(f"{where}: logging in as {host.user!r} was refused while {what}",
                           hint=f"check {env}__USER and {env}__KEY_PATH, and that the key's "
                                "public half is in ~/.ssh/authorized_keys on the host")
    if isinstance(exc, ConnectionRefusedError):
        return RemoteError(f"{where}: the connection to port {host.port} was refused",
                           hint="is sshd running on the host, and is "
                                f"{env}__PORT the port it listens on?")
    if isinstance(exc, socket.gaierror):
        return RemoteError(f"{where}: its address cannot be resolved",
                           hint=f"check {env}__ADDRESS")
    if isinstance(exc, OSError) and exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return RemoteError(f"{where}: unreachable ({exc.strerror})",
                           hint="check that the host is up and that this machine can "
                                "reach it")
    if isinstance(exc, (paramiko.SSHException, EOFError, OSError)):
        return RemoteError(f"{where}: the SSH session failed while {what}: "
                           f"{type(exc).__name__}: {exc}",
                           hint="the link may have dropped; try again")
    raise exc
