"""One root exception, one family per failure domain, each carrying its evidence.

Only the command line turns these into exit codes and messages; the library raises
them and never exits. Third-party exceptions are translated into these at exactly one
boundary each: paramiko's and fabric's in ``remote``, docker's in ``images``.
"""

from __future__ import annotations

import traceback
from pathlib import Path


class SparsekRemoteError(Exception):
    """Root of every error this package raises on purpose.

    ``hint`` tells the user what to do about it; ``exit_code`` is what the command
    line exits with, one per failure family so scripts can tell them apart.
    """

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n  hint: {self.hint}"
        return self.message


def host_internal_error(alias: str, exc: BaseException) -> SparsekRemoteError:
    """An unexpected exception in one host's work, as that host's error (with the trace to
    report), so a bug on one host never loses the other hosts' outcomes."""
    trace = "".join(traceback.format_exception(exc, limit=8))
    return SparsekRemoteError(f"host {alias!r}: internal error: {type(exc).__name__}: {exc}",
                              hint="this is a bug; please report it with this trace:\n"
                                   + trace)


class ConfigError(SparsekRemoteError):
    """The user's own input is wrong: a job file, ``.env`` or a command-line value."""

    exit_code = 2


class JobSpecError(ConfigError):
    """A job file failed to parse or validate; ``problems`` lists each one."""

    def __init__(self, path: Path | str, problems: list[str]) -> None:
        self.path = Path(path)
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(
            f"{self.path}: the job file is not valid\n{lines}",
            hint="fix the fields named above; `sparsek-remote schema` prints every field",
        )


class SettingsError(ConfigError):
    """``.env`` or the process environment holds a value that cannot be used."""


class BundleError(SparsekRemoteError):
    """A result bundle failed validation and was not stored.

    ``quarantined_at`` is where the refused bundle was kept aside, if anywhere.
    """

    exit_code = 3

    def __init__(self, reason: str, *, bundle: Path | str | None = None) -> None:
        self.reason = reason
        self.bundle = Path(bundle) if bundle is not None else None
        self.quarantined_at: Path | None = None
        where = f" ({self.bundle})" if self.bundle is not None else ""
        super().__init__(f"bundle refused{where}: {reason}")

    def __str__(self) -> str:
        text = self.message
        if self.quarantined_at is not None:
            text += f"\n  kept aside in {self.quarantined_at}"
        return text


class RunnerError(SparsekRemoteError):
    """The benchmark runner failed as a whole (crash, timeout) on a host.

    ``log_tail`` holds the last lines it printed, which usually say why.
    """

    exit_code = 4

    def __init__(self, message: str, *, returncode: int | None = None, log_tail: str = "",
                 hint: str | None = None) -> None:
        self.returncode = returncode
        self.log_tail = log_tail
        detail = message
        if returncode is not None:
            detail += f" (exit code {returncode})"
        if log_tail:
            detail += "\n  last lines of its log:\n" + "\n".join(
                f"    {line}" for line in log_tail.splitlines()
            )
        super().__init__(detail, hint=hint)


class RemoteError(SparsekRemoteError):
    """SSH to a host failed: unreachable, refused, an unknown or changed host key."""

    exit_code = 5


class ImageError(SparsekRemoteError):
    """Building, shipping or verifying the Docker image failed.

    ``build_log`` holds the tail of the build output.
    """

    exit_code = 6

    def __init__(self, message: str, *, build_log: str = "", hint: str | None = None) -> None:
        self.build_log = build_log
        super().__init__(message, hint=hint)


class GateFailed(SparsekRemoteError):
    """The run finished and its bundle was stored, but some case failed its
    correctness gate, so those cases have no timing. ``failures`` names them."""

    exit_code = 7

    def __init__(self, failures: list[str]) -> None:
        self.failures = list(failures)
        super().__init__(
            "correctness gate failed for: " + ", ".join(self.failures),
            hint="no timing was recorded for these cases; see results.json for the errors",
        )
