"""This machine's record of runs started on hosts: ``<state_dir>/runs/<run_id>.json``.

It lets ``run --resume`` and ``fetch`` find a run again after the link or this
process went away. It names hosts by alias only: no addresses, users or secrets.
Written whole and renamed into place; updates from the threads of one run are
serialised by a lock.
"""

from __future__ import annotations

import os
import re
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sparsek_remote.errors import ConfigError
from sparsek_remote.schema import RUN_ID_PATTERN

RUNS_FOLDER = "runs"
RECORD_VERSION = 1
HostStage = Literal["starting", "launched", "stored", "failed", "not_started"]


class HostRecord(BaseModel):
    """One host's part of a run. ``stage``: ``launched`` (the job runs or ran there,
    its bundle not yet stored), ``stored``, ``failed`` (for good: the runner failed
    or the bundle was refused), ``not_started`` (it never started there)."""

    model_config = ConfigDict(extra="ignore")

    kind: Literal["bare", "docker"] = "bare"
    remote_dir: str
    stage: HostStage = "starting"
    detail: str = ""


class RunRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")

    version: int = RECORD_VERSION
    run_id: str = Field(pattern=RUN_ID_PATTERN)
    job_name: str
    created_at: str
    connect_timeout_s: float = 15.0
    hosts: dict[str, HostRecord] = Field(default_factory=dict)

    def pending(self) -> list[str]:
        """Hosts whose job was launched and whose bundle is not stored yet."""
        return [a for a, h in sorted(self.hosts.items()) if h.stage == "launched"]


class RunBook:
    """The record of one run, saved after every change."""

    def __init__(self, state_dir: Path, record: RunRecord) -> None:
        self.path = record_path(state_dir, record.run_id)
        self.record = record
        self._lock = threading.Lock()

    @classmethod
    def new(cls, state_dir: Path, *, run_id: str, job_name: str, connect_timeout_s: float,
            hosts: dict[str, HostRecord]) -> RunBook:
        record = RunRecord(run_id=run_id, job_name=job_name,
                           created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           connect_timeout_s=connect_timeout_s, hosts=hosts)
        book = cls(state_dir, record)
        book.save()
        return book

    @classmethod
    def open(cls, state_dir: Path, run_id: str) -> RunBook:
        return cls(state_dir, load(state_dir, run_id))

    def set_stage(self, alias: str, stage: HostStage, detail: str = "") -> None:
        self._update(alias, stage=stage, detail=detail[:500])

    def set_kind(self, alias: str, kind: Literal["bare", "docker"]) -> None:
        if self.record.hosts[alias].kind != kind:
            self._update(alias, kind=kind)

    def _update(self, alias: str, **changes: object) -> None:
        with self._lock:
            host = self.record.hosts[alias]
            self.record.hosts[alias] = host.model_copy(update=changes)
            self._save_locked()

    def save(self) -> None:
        with self._lock:
            self._save_locked()

    def _save_locked(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(f".{self.path.name}.partial")
        partial.write_text(self.record.model_dump_json(indent=2) + "\n", encoding="utf-8")
        os.replace(partial, self.path)


def record_path(state_dir: Path, run_id: str) -> Path:
    if not re.fullmatch(RUN_ID_PATTERN, run_id):
        raise ConfigError(f"{run_id!r} is not a run id",
                          hint="run ids look like 20250101T120000Z-job-1a2b3c")
    return Path(state_dir) / RUNS_FOLDER / f"{run_id}.json"


def load(state_dir: Path, run_id: str) -> RunRecord:
    path = record_path(state_dir, run_id)
    try:
        return RunRecord.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        known = list_run_ids(state_dir)
        raise ConfigError(
            f"no run {run_id} was started on hosts from here (nothing in {path.parent})",
            hint=("runs started here: " + ", ".join(known[:10])) if known
            else "start one with `sparsek-remote run JOB` on a host") from None
    except (OSError, ValidationError, ValueError) as exc:
        raise ConfigError(f"the record {path} cannot be read: {type(exc).__name__}",
                          hint="it is written by `run`; restore or remove it") from None


def list_run_ids(state_dir: Path) -> list[str]:
    """Run ids with a record, newest first."""
    folder = Path(state_dir) / RUNS_FOLDER
    if not folder.is_dir():
        return []
    ids = [p.stem for p in folder.glob("*.json") if re.fullmatch(RUN_ID_PATTERN, p.stem)]
    return sorted(ids, reverse=True)
