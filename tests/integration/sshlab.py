"""SSH test hosts with their own addresses: one network namespace per host, joined
to this machine by a veth pair, each with its own sshd, a host key made for this
test session, and its own folder under the login user's home.

The hosts share this machine's filesystem (a namespace isolates only the network),
so a test can look into a host's run folder directly; everything the code under
test does still goes through SSH to the host's own address.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

SSHD = "/usr/sbin/sshd"
LOGIN_USER = "root"


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=60)


def missing_prerequisites() -> list[str]:
    """What this machine lacks to host the SSH test hosts."""
    problems = []
    if os.geteuid() != 0:
        problems.append("root (network namespaces and sshd need it)")
    for tool in (SSHD, shutil.which("ip") or "ip", shutil.which("ssh-keygen") or "ssh-keygen"):
        if not Path(tool).exists():
            problems.append(f"{Path(tool).name} (apt-get install openssh-server iproute2)")
    return problems


@dataclass(frozen=True)
class UserKey:
    path: Path
    public: str
    passphrase: str | None = None


def make_user_key(folder: Path, name: str, passphrase: str | None = None) -> UserKey:
    path = folder / name
    run("ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase or "", "-C", name,
        "-f", str(path))
    return UserKey(path, (folder / f"{name}.pub").read_text().strip(), passphrase)


def host_python_dir(folder: Path) -> tuple[Path, str | None]:
    """A bin folder whose ``python3`` is this interpreter's base, and the
    PYTHONPATH that shows it this environment's packages (torch, pydantic), as a
    bare host's system Python would have them."""
    bin_dir = folder / "hostbin"
    bin_dir.mkdir(exist_ok=True)
    base = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    link = bin_dir / "python3"
    if not link.exists():
        link.symlink_to(base)
    in_venv = sys.prefix != sys.base_prefix
    paths = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    return bin_dir, os.pathsep.join(paths) if in_venv else None


@dataclass(frozen=True)
class SshdSessions:
    logins: int
    commands: int
    disconnects: int


@dataclass
class SshHost:
    """One host: namespace, veth pair, sshd. ``remote_dir`` is relative to the
    login user's home, as it would be in .env."""

    alias: str
    index: int
    token: str
    subnet: int
    folder: Path
    key: UserKey
    remote_dir: str
    python_bin: Path
    python_path: str | None
    connect_s: float = 5.0
    proc: subprocess.Popen | None = None
    host_key: Path = field(init=False)

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.host_key = self.folder / "ssh_host_ed25519_key"
        self.new_host_key()
        (self.folder / "authorized_keys").write_text(self.key.public + "\n")

    @property
    def netns(self) -> str:
        return f"skr-{self.token}-{self.index}"

    @property
    def outer_if(self) -> str:
        return f"sko{self.token[:6]}{self.index}"

    @property
    def inner_if(self) -> str:
        return f"ski{self.token[:6]}{self.index}"

    @property
    def address(self) -> str:
        return f"10.{self.subnet}.{self.index}.2"

    @property
    def remote_path(self) -> Path:
        """The host's folder as this machine sees it."""
        return Path(os.path.expanduser(f"~{LOGIN_USER}")) / self.remote_dir

    def fingerprint(self) -> str:
        out = run("ssh-keygen", "-l", "-E", "sha256", "-f", f"{self.host_key}.pub").stdout
        return out.split()[1]

    def new_host_key(self) -> None:
        for path in (self.host_key, Path(f"{self.host_key}.pub")):
            path.unlink(missing_ok=True)
        run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.host_key))

    def create_network(self) -> None:
        run("ip", "netns", "add", self.netns)
        run("ip", "link", "add", self.outer_if, "type", "veth", "peer", "name", self.inner_if)
        run("ip", "link", "set", self.inner_if, "netns", self.netns)
        run("ip", "addr", "add", f"10.{self.subnet}.{self.index}.1/30", "dev", self.outer_if)
        run("ip", "link", "set", self.outer_if, "up")
        run("ip", "-n", self.netns, "addr", "add", f"{self.address}/30", "dev", self.inner_if)
        run("ip", "-n", self.netns, "link", "set", self.inner_if, "up")
        run("ip", "-n", self.netns, "link", "set", "lo", "up")

    def remove_network(self) -> None:
        """End every process still in the namespace (sshd sessions and jobs, which
        sshd started there), then remove it."""
        listed = run("ip", "netns", "pids", self.netns, check=False).stdout.split()
        for pid in listed:
            with contextlib.suppress(ValueError, ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        run("ip", "link", "del", self.outer_if, check=False)
        run("ip", "netns", "del", self.netns, check=False)

    def cut_link(self) -> None:
        """Pull the cable: packets vanish, nothing is refused or reset."""
        run("ip", "-n", self.netns, "link", "set", self.inner_if, "down")

    def restore_link(self) -> None:
        run("ip", "-n", self.netns, "link", "set", self.inner_if, "up")
        self._wait_listening()

    def _config(self) -> Path:
        env = f"PATH={self.python_bin}:/usr/local/bin:/usr/bin:/bin"
        if self.python_path:
            env += f" PYTHONPATH={self.python_path}"
        config = self.folder / "sshd_config"
        config.write_text(
            f"ListenAddress {self.address}\nPort 22\nHostKey {self.host_key}\n"
            f"PidFile {self.folder / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {self.folder / 'authorized_keys'}\n"
            "StrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "UsePAM no\nPermitRootLogin prohibit-password\n"
            f"AllowUsers {LOGIN_USER}\nSubsystem sftp internal-sftp\n"
            # VERBOSE logs each login and each command, which tests count (sessions_since).
            "MaxSessions 100\nMaxStartups 100\nLogLevel VERBOSE\n"
            # A client whose link was cut never says goodbye: end its session soon.
            "ClientAliveInterval 5\nClientAliveCountMax 3\n"
            f"SetEnv {env}\n")
        return config

    def start(self) -> None:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        with open(self.folder / "sshd.log", "ab") as log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, SSHD, "-D", "-e", "-f",
                 str(self._config())], stdout=log, stderr=log, start_new_session=True)
        self._wait_listening()

    def log_mark(self) -> int:
        """Where this host's sshd log ends now, for sessions_since."""
        return (self.folder / "sshd.log").stat().st_size

    def sessions_since(self, mark: int) -> SshdSessions:
        """Logins this host's sshd logged after mark, and the commands and ends of those
        connections (told apart by the client's port). A connection of an earlier test
        that sshd ends only now (a cut link is dropped after 15 s) does not count."""
        with open(self.folder / "sshd.log", "rb") as log:
            log.seek(mark)
            text = log.read().decode("utf-8", errors="replace")
        ports = set(re.findall(rf"Accepted publickey for {LOGIN_USER} from \S+ port (\d+)",
                               text))

        def count(pattern: str) -> int:
            return sum(port in ports for port in re.findall(pattern, text))

        return SshdSessions(logins=len(ports),
                            commands=count(r"Starting session: command for \S+ from \S+ "
                                           r"port (\d+)"),
                            # An end is logged as a clean close, or, when the client's
                            # socket closes with the server's last bytes unread (its
                            # kernel then resets the link), as a read error.
                            disconnects=count(r"(?:Closing connection to|Read error from "
                                              r"remote host) \S+ port (\d+)"))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)
        self.proc = None

    def restart_with_new_host_key(self) -> None:
        self.stop()
        self.new_host_key()
        self.start()

    def _wait_listening(self, limit_s: float = 10.0) -> None:
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                log = (self.folder / "sshd.log").read_text(errors="replace")
                raise RuntimeError(f"sshd of {self.alias} exited: {log[-2000:]}")
            try:
                with socket.create_connection((self.address, 22), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"sshd of {self.alias} does not listen on {self.address}:22")

    def env_lines(self, *, pin: bool = True) -> list[str]:
        prefix = f"SPARSEK_HOSTS__{self.alias.upper()}__"
        lines = [f"{prefix}ADDRESS={self.address}", f"{prefix}USER={LOGIN_USER}",
                 f"{prefix}KEY_PATH={self.key.path}", f"{prefix}KIND=bare",
                 f"{prefix}REMOTE_DIR={self.remote_dir}"]
        if self.key.passphrase:
            lines.append(f"{prefix}KEY_PASSPHRASE={self.key.passphrase}")
        if pin:
            lines.append(f"{prefix}HOST_KEY_FINGERPRINT={self.fingerprint()}")
        return lines

    def kill_jobs(self) -> None:
        """End whatever a test left running in this host's folder."""
        for pid_file in self.remote_path.glob("runs/*/pid"):
            with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
                os.killpg(int(pid_file.read_text().strip()), signal.SIGKILL)

    def wait_for_job_end(self, run_id: str, limit_s: float = 120.0) -> int:
        """Block until the job on this host has recorded its exit code."""
        exit_file = self.remote_path / "runs" / run_id / "exit_code"
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            text = exit_file.read_text().strip() if exit_file.exists() else ""
            if text.lstrip("-").isdigit():
                return int(text)
            time.sleep(0.2)
        raise TimeoutError(f"the job {run_id} on {self.alias} did not end in {limit_s} s")


class SshLab:
    """Every SSH test host of a test session, torn down together."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.token = secrets.token_hex(3)
        self.subnet = 200 + secrets.randbelow(50)
        self.home_root = f"sparsek-itest-{self.token}"
        self.python_bin, self.python_path = host_python_dir(folder)
        self.hosts: dict[str, SshHost] = {}
        self.mounts: list[Path] = []

    def add(self, alias: str, key: UserKey, *, disk: str | None = None) -> SshHost:
        """A new host; ``disk`` (like "96m") gives it a tmpfs of that size as its
        remote folder, to fill up in tests."""
        host = SshHost(alias, len(self.hosts) + 1, self.token, self.subnet,
                       self.folder / alias, key, f"{self.home_root}/{alias}",
                       self.python_bin, self.python_path)
        host.remote_path.mkdir(parents=True, exist_ok=True)
        self.hosts[alias] = host
        if disk:
            # Before sshd starts: `ip netns exec` gives it a copy of today's mounts.
            run("mount", "-t", "tmpfs", "-o", f"size={disk}", "tmpfs", str(host.remote_path))
            self.mounts.append(host.remote_path)
        host.create_network()
        host.start()
        return host

    def close(self) -> None:
        for host in self.hosts.values():
            host.kill_jobs()
            host.stop()
            host.remove_network()
        for mount in self.mounts:
            run("umount", "-l", str(mount), check=False)
        root = Path(os.path.expanduser(f"~{LOGIN_USER}")) / self.home_root
        shutil.rmtree(root, ignore_errors=True)
