"""Host credentials and defaults, read once from ``.env`` (and the process environment).

Every key starts with ``SPARSEK_``; hosts are named by an alias, nested with ``__``::

    SPARSEK_DEFAULT_TARGET=lab
    SPARSEK_HOSTS__LAB__ADDRESS=203.0.113.7
    SPARSEK_HOSTS__LAB__USER=ubuntu
    SPARSEK_HOSTS__LAB__KEY_PATH=~/.ssh/lab_ed25519
    SPARSEK_HOSTS__LAB__KEY_PASSPHRASE=...
    SPARSEK_HOSTS__LAB__HOST_KEY_FINGERPRINT=SHA256:...
    SPARSEK_HOSTS__LAB__GPUS=all

``GPUS`` (and ``SPARSEK_LOCAL_GPUS`` for the ``local`` target) says which GPUs a run
spreads over, in the runner's ``--gpus`` grammar (``gpuspec``); every GPU by default.

The command line builds one ``Settings`` and passes it down; nothing else reads ``.env``.
Secrets are ``SecretStr``: their repr is masked, and error messages never echo values.
A variable in the process environment overrides the same key in ``.env`` (for CI).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from sparsek_remote.errors import SettingsError
from sparsek_remote.gpuspec import ALL, canonical_gpu_spec
from sparsek_remote.jobspec import LOCAL_TARGET, TARGET_PATTERN

ENV_PREFIX = "SPARSEK_"
# A DNS name, an IPv4 address or a bracket-free IPv6 address: nothing a shell would read.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
ADDRESS_PATTERN = rf"^(?:{_LABEL}(?:\.{_LABEL})*|[0-9A-Fa-f:.]{{2,45}})$"
USER_PATTERN = r"^[a-z_][a-z0-9_-]{0,31}$"
FINGERPRINT_PATTERN = r"^SHA256:[A-Za-z0-9+/]{43}=?$"
REMOTE_DIR_PATTERN = r"^[A-Za-z0-9._-]+(?:/[A-Za-z0-9._-]+)*$"
# Which GPUs a run there spreads over (the runner's --gpus), kept in its written form.
GpuChoice = Annotated[str, AfterValidator(canonical_gpu_spec)]


class HostSettings(BaseModel):
    """One rented machine, as the user's ``.env`` describes it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    address: Annotated[str, Field(pattern=ADDRESS_PATTERN, max_length=253)]
    port: Annotated[int, Field(ge=1, le=65535)] = 22
    user: Annotated[str, Field(pattern=USER_PATTERN)] = "root"
    key_path: Path | None = None
    key_passphrase: SecretStr | None = None
    host_key_fingerprint: Annotated[str, Field(pattern=FINGERPRINT_PATTERN)] | None = None
    kind: Literal["auto", "docker", "bare"] = "auto"
    remote_dir: Annotated[str, Field(pattern=REMOTE_DIR_PATTERN, max_length=200)] = (
        "sparsek-remote"
    )
    gpus: GpuChoice = ALL

    def public_view(self) -> dict[str, object]:
        """What may be shown to the user: no passphrase, and the address only on request."""
        return {
            "user": self.user,
            "port": self.port,
            "key_path": str(self.key_path) if self.key_path else None,
            "key_passphrase": "set" if self.key_passphrase else "not set",
            "host_key_fingerprint": self.host_key_fingerprint or "not pinned",
            "kind": self.kind,
            "gpus": self.gpus,
        }


class Settings(BaseSettings):
    """Everything the orchestrator needs to know about where it may run."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        env_file=".env",
        env_file_encoding="utf-8",
        case_sensitive=False,
        extra="forbid",
        frozen=True,
    )

    hosts: dict[str, HostSettings] = Field(default_factory=dict)
    default_target: str = LOCAL_TARGET
    results_dir: Path = Path("results")
    state_dir: Path = Path(".sparsek")
    local_gpus: GpuChoice = ALL

    @model_validator(mode="after")
    def _aliases_and_default(self) -> Settings:
        for alias in self.hosts:
            if alias == LOCAL_TARGET or not re.fullmatch(TARGET_PATTERN, alias):
                raise ValueError(
                    f"host alias {alias!r} must be lower-case letters, digits, '-' or '_' "
                    f"and not {LOCAL_TARGET!r}"
                )
        if self.default_target != LOCAL_TARGET and self.default_target not in self.hosts:
            raise ValueError(
                f"default_target {self.default_target!r} is not a configured host "
                f"(configured: {sorted(self.hosts) or 'none'})"
            )
        return self

    def host(self, alias: str) -> HostSettings:
        try:
            return self.hosts[alias]
        except KeyError:
            raise SettingsError(
                f"no host named {alias!r} is configured",
                hint=f"add SPARSEK_HOSTS__{alias.upper()}__ADDRESS (and USER, KEY_PATH) to "
                f".env; configured: {sorted(self.hosts) or 'none'}",
            ) from None

    def gpus_for(self, target: str) -> str:
        """Which GPUs a run on ``target`` (``local`` or a host alias) spreads over."""
        return self.local_gpus if target == LOCAL_TARGET else self.host(target).gpus

    @property
    def quarantine_dir(self) -> Path:
        return self.state_dir / "quarantine"

    @property
    def work_dir(self) -> Path:
        return self.state_dir / "work"


def load_settings(env_file: Path | str | None = ".env") -> Settings:
    """Build the settings from ``env_file`` (absent is fine: the local target remains)."""
    path = Path(env_file) if env_file is not None else None
    try:
        return Settings(_env_file=path if path is not None and path.is_file() else None)
    except ValidationError as exc:
        raise SettingsError(
            f"{path or 'the environment'}: the settings are not valid\n"
            + "\n".join(f"  - {_describe(err)}" for err in exc.errors(include_input=False)),
            hint="compare with .env.example; values are not shown here on purpose",
        ) from None


def _describe(err: dict) -> str:
    loc = [str(p) for p in err["loc"]]
    if err["type"] == "extra_forbidden":
        key = loc[-1].upper() if loc else "?"
        return f"{key}: not a setting of sparsek-remote; remove it or check its spelling"
    if loc[:1] == ["hosts"] and len(loc) >= 3:
        key = f"{ENV_PREFIX}HOSTS__{loc[1].upper()}__{'__'.join(loc[2:]).upper()}"
    else:
        key = ENV_PREFIX + "__".join(loc).upper() if loc else "(settings)"
    if err["type"] == "string_pattern_mismatch":
        return f"{key}: contains characters that are not allowed here"
    return f"{key}: {err['msg'].removeprefix('Value error, ')}"
