"""The feeder that streams a local source into a remote command's stdin closes that
stdin however the source ends: a source that fails cannot leave the command waiting
for more input, and its error is kept apart from the channel's for the caller.

The command here is a local process behind the two channel calls the feeder makes;
the same over a real sshd is in tests/integration/test_ssh_commands.py.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

import pytest

from sparsek_remote.remote._channel import CHUNK_BYTES, Feeder, Watchdog, feed

# Only a guard against hanging: a command that gets its EOF ends at once.
HANG_GUARD_S = 30


class ProcessChannel:
    """``sendall`` and ``shutdown_write`` of a paramiko channel, onto a process's stdin."""

    def __init__(self, argv: Sequence[str]) -> None:
        self.proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE)
        assert self.proc.stdin is not None
        self._stdin = self.proc.stdin

    def sendall(self, data: bytes) -> None:
        self._stdin.write(data)
        self._stdin.flush()

    def shutdown_write(self) -> None:
        self._stdin.close()

    def output(self) -> bytes:
        """What the command printed, once it has ended."""
        self.proc.wait(timeout=HANG_GUARD_S)
        assert self.proc.stdout is not None
        return self.proc.stdout.read()


class FailingSource:
    """Gives ``head`` and then raises ``error``, as an archive that cannot be built."""

    def __init__(self, head: bytes, error: BaseException) -> None:
        self._head, self.error = head, error

    def read(self, size: int) -> bytes:
        if self._head:
            chunk, self._head = self._head[:size], self._head[size:]
            return chunk
        raise self.error


def start(channel: ProcessChannel, source: object) -> Feeder:
    return feed(channel, source, Watchdog(60, lambda: None))  # type: ignore[arg-type]


def test_a_failing_source_ends_the_command_and_its_error_is_kept() -> None:
    channel = ProcessChannel(["wc", "-c"])  # reads until its input ends
    error = OSError("the image layer could not be read")
    feeder = start(channel, FailingSource(b"x" * (CHUNK_BYTES + 7), error))

    printed = channel.output()  # ends, rather than waiting for more
    feeder.join(HANG_GUARD_S)

    assert printed.split() == [str(CHUNK_BYTES + 7).encode()]
    assert feeder.source_error is error
    assert feeder.error is None  # nothing went wrong on the channel's side


def test_a_command_that_stops_reading_is_the_channel_failing_not_the_source() -> None:
    channel = ProcessChannel(["true"])
    channel.proc.wait(timeout=HANG_GUARD_S)
    feeder = start(channel, FailingSource(b"x" * (8 * CHUNK_BYTES),
                                          AssertionError("never read this far")))
    feeder.join(HANG_GUARD_S)

    assert isinstance(feeder.error, BrokenPipeError)
    assert feeder.source_error is None
    with pytest.raises(BrokenPipeError):
        feeder.raise_if_failed()
