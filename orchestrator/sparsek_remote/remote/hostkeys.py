"""Whom we are talking to: the host-key policy, decided before any credential is sent.

In order: a fingerprint pinned in ``.env`` wins; otherwise the known-hosts file this
tool keeps (``<state_dir>/known_hosts``, OpenSSH format with hashed names, so it
holds no readable addresses and works with ``ssh -o UserKnownHostsFile=...``). An
unknown key is refused unless the user asked to trust new keys, which records it.
A key that differs from the pinned or recorded one is always refused.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import paramiko

from sparsek_remote.errors import RemoteError
from sparsek_remote.settings import HostSettings

KNOWN_HOSTS_NAME = "known_hosts"
KeySource = Literal["pinned", "known", "recorded"]


@dataclass(frozen=True)
class HostKeyCheck:
    """The verdict on the key a host presented, and on what it was based."""

    alias: str
    key_type: str
    fingerprint: str
    source: KeySource


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's form: ``SHA256:`` and the unpadded base64 of the key blob's digest."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def entry_name(address: str, port: int) -> str:
    """The name a host has in a known-hosts file, as OpenSSH writes it."""
    return address if port == 22 else f"[{address}]:{port}"


def recorded_keys(known_hosts: Path, host: HostSettings) -> list[paramiko.PKey]:
    """Keys recorded for the host's address and port; none if the file is absent."""
    if not known_hosts.is_file():
        return []
    try:
        keys = paramiko.HostKeys(os.fspath(known_hosts))
    except (OSError, paramiko.SSHException) as exc:
        raise RemoteError(f"the known-hosts file {known_hosts} cannot be read: {exc}",
                          hint="fix or remove the damaged line; every host in it will "
                               "then be unknown until trusted again") from None
    found = keys.lookup(entry_name(host.address, host.port))
    return list(found.values()) if found else []


def preferred_key_types(known_hosts: Path, host: HostSettings) -> list[str]:
    """Key types to ask the host for first: those already recorded for it."""
    return list(dict.fromkeys(k.get_name() for k in recorded_keys(known_hosts, host)))


def check_host_key(alias: str, host: HostSettings, key: paramiko.PKey, *,
                   known_hosts: Path, trust_new: bool) -> HostKeyCheck:
    """Accept the presented ``key`` or raise ``RemoteError`` saying why not."""
    presented = fingerprint(key)
    if host.host_key_fingerprint:
        if _same_fingerprint(presented, host.host_key_fingerprint):
            return HostKeyCheck(alias, key.get_name(), presented, "pinned")
        raise _pin_mismatch(alias, key, presented, host.host_key_fingerprint)
    with _locked(known_hosts):
        recorded = recorded_keys(known_hosts, host)
        if any(k.asbytes() == key.asbytes() for k in recorded):
            return HostKeyCheck(alias, key.get_name(), presented, "known")
        if recorded:
            raise _changed(alias, key, presented, recorded, known_hosts)
        if not trust_new:
            raise _unknown(alias, key, presented, known_hosts)
        _append(known_hosts, host, key)
    return HostKeyCheck(alias, key.get_name(), presented, "recorded")


def forget_host_key(known_hosts: Path, host: HostSettings) -> int:
    """Remove every key recorded for the host; returns how many lines went."""
    name = entry_name(host.address, host.port)
    with _locked(known_hosts):
        if not known_hosts.is_file():
            return 0
        kept, removed = [], 0
        for line in known_hosts.read_text(encoding="utf-8").splitlines(keepends=True):
            if _line_names(line, name):
                removed += 1
            else:
                kept.append(line)
        _replace(known_hosts, "".join(kept))
    return removed


def _same_fingerprint(presented: str, pinned: str) -> bool:
    return presented.rstrip("=") == pinned.strip().rstrip("=")


def _pin_mismatch(alias: str, key: paramiko.PKey, presented: str, pinned: str) -> RemoteError:
    return RemoteError(
        f"the host key of {alias!r} does not match the fingerprint pinned in .env: the "
        f"host presented {key.get_name()} {presented}, the pinned one is {pinned}; "
        "refusing to connect (the connection may be intercepted)",
        hint=f"check the key on the host itself (ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub) "
             f"and change SPARSEK_HOSTS__{alias.upper()}__HOST_KEY_FINGERPRINT only if you "
             "know why it changed")


def _changed(alias: str, key: paramiko.PKey, presented: str, recorded: list[paramiko.PKey],
             known_hosts: Path) -> RemoteError:
    before = ", ".join(f"{k.get_name()} {fingerprint(k)}" for k in recorded)
    return RemoteError(
        f"the host key of {alias!r} has CHANGED: the host presented {key.get_name()} "
        f"{presented}, but {known_hosts} records {before}; refusing to connect (the "
        "connection may be intercepted, or the host was re-installed)",
        hint=f"if the host was re-installed or re-rented, check its new fingerprint on the "
             f"host, then `sparsek-remote trust {alias} --forget` and "
             f"`sparsek-remote trust {alias}`")


def _unknown(alias: str, key: paramiko.PKey, presented: str, known_hosts: Path) -> RemoteError:
    return RemoteError(
        f"the host key of {alias!r} is not known: the host presented {key.get_name()} "
        f"{presented}, and no key is recorded for it in {known_hosts} nor pinned in .env; "
        "refusing to connect",
        hint=f"compare that fingerprint with the host's own (your provider's console, or "
             f"ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub on the host); if it matches, "
             f"record it with --trust-new-host-key (or `sparsek-remote trust {alias}`), or "
             f"pin it as SPARSEK_HOSTS__{alias.upper()}__HOST_KEY_FINGERPRINT")


@contextlib.contextmanager
def _locked(known_hosts: Path) -> Iterator[None]:
    """One writer at a time, across threads and processes: a lock file beside it."""
    known_hosts.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(known_hosts.with_name(known_hosts.name + ".lock"),
                 os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _append(known_hosts: Path, host: HostSettings, key: paramiko.PKey) -> None:
    hashed = paramiko.HostKeys.hash_host(entry_name(host.address, host.port))
    line = f"{hashed} {key.get_name()} {key.get_base64()}\n"
    fd = os.open(known_hosts, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


def _line_names(line: str, name: str) -> bool:
    fields = line.split()
    if len(fields) < 3 or line.lstrip().startswith("#"):
        return False
    for pattern in fields[0].split(","):
        if pattern.startswith("|1|"):
            if paramiko.HostKeys.hash_host(name, pattern) == pattern:
                return True
        elif pattern == name:
            return True
    return False


def _replace(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)
