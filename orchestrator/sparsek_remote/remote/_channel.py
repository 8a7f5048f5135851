"""Moving data through one SSH channel, under a watchdog that tells a busy host from
a lost one. Used by ``connection``; nothing here knows about hosts or settings."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import BinaryIO, Literal

import paramiko

CHUNK_BYTES = 256 * 1024
_STDERR_KEEP = 64 * 1024
_READ_POLL_S = 0.5


class Watchdog:
    """Guards one operation. After ``silence_s`` without progress it asks
    ``is_alive`` (which takes at most another ``silence_s``): a host that answers
    buys another period, so a busy host is waited for and a cut link is not. A dead
    link, or ``limit_s`` passed in all, calls ``on_expire`` once."""

    def __init__(self, silence_s: float, on_expire: Callable[[], None], *,
                 is_alive: Callable[[], bool] | None = None,
                 limit_s: float | None = None) -> None:
        self.silence_s = silence_s
        self.limit_s = limit_s
        self.reason: Literal["silence", "limit"] | None = None
        self._on_expire = on_expire
        self._is_alive = is_alive or (lambda: False)
        now = time.monotonic()
        self._deadline = now + silence_s
        self._limit_at = now + limit_s if limit_s is not None else None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    @property
    def expired(self) -> bool:
        return self.reason is not None

    def kick(self) -> None:
        self._deadline = time.monotonic() + self.silence_s

    def _next_wait(self) -> float:
        ends = [self._deadline] + ([self._limit_at] if self._limit_at is not None else [])
        return max(0.0, min(ends) - time.monotonic())

    def _watch(self) -> None:
        while not self._done.wait(self._next_wait()):
            now = time.monotonic()
            if self._limit_at is not None and now >= self._limit_at:
                self._expire("limit")
                return
            if now < self._deadline:
                continue
            if self._is_alive():
                self.kick()
            elif not self._done.is_set():
                self._expire("silence")
                return

    def _expire(self, reason: Literal["silence", "limit"]) -> None:
        self.reason = reason
        self._on_expire()

    def __enter__(self) -> Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


class BytesSource:
    def __init__(self, data: bytes) -> None:
        self._data, self._pos = data, 0

    def read(self, size: int) -> bytes:
        chunk = self._data[self._pos:self._pos + size]
        self._pos += len(chunk)
        return chunk


class Feeder(threading.Thread):
    """Writes a source into the channel's stdin, then closes it. What reading the
    source raised is kept in ``source_error``, what writing raised in ``error``, for
    ``Connection`` to raise in the caller's thread."""

    def __init__(self, channel: paramiko.Channel, source: BinaryIO | BytesSource,
                 dog: Watchdog) -> None:
        super().__init__(daemon=True)
        self.channel, self.source, self.dog = channel, source, dog
        self.error: BaseException | None = None
        self.source_error: BaseException | None = None

    def run(self) -> None:
        try:
            while chunk := self._read():
                self.channel.sendall(chunk)
                self.dog.kick()
        except BaseException as exc:
            self.error = exc
        finally:
            # EOF after a failure too: the remote command would wait for more forever.
            try:
                self.channel.shutdown_write()
            except BaseException as exc:
                self.error = self.error or exc

    def _read(self) -> bytes:
        try:
            return self.source.read(CHUNK_BYTES)
        except BaseException as exc:
            self.source_error = exc
            return b""

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error


def feed(channel: paramiko.Channel, source: BinaryIO | BytesSource,
         dog: Watchdog) -> Feeder:
    feeder = Feeder(channel, source, dog)
    feeder.start()
    return feeder


def pump(channel: paramiko.Channel, sink: Callable[[bytes], object], stderr: bytearray,
         dog: Watchdog) -> None:
    """Move stdout to ``sink`` and keep stderr's tail until the command's output ends."""
    channel.settimeout(_READ_POLL_S)
    stdout_open = stderr_open = True
    while stdout_open or stderr_open:
        if stderr_open and (channel.recv_stderr_ready() or not stdout_open):
            stderr_open = _take(channel.recv_stderr, stderr.extend, dog)
            del stderr[:-_STDERR_KEEP]
        if stdout_open:
            stdout_open = _take(channel.recv, sink, dog)
        if channel.closed and not channel.recv_ready() and not channel.recv_stderr_ready():
            return


def _take(recv: Callable[[int], bytes], sink: Callable[[bytes], object], dog: Watchdog
          ) -> bool:
    """Read one chunk into ``sink``; False at end of stream."""
    try:
        data = recv(CHUNK_BYTES)
    except TimeoutError:
        return True
    if not data:
        return False
    dog.kick()
    sink(data)
    return True
