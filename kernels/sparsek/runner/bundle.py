"""Writing the bundle folder: every file appears whole under its final name, and the
manifest comes last, so a folder with a manifest is a complete bundle."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from pydantic import BaseModel

from sparsek_remote.artifacts import file_entries
from sparsek_remote.errors import ConfigError
from sparsek_remote.jobspec import JobSpec
from sparsek_remote.schema import (
    MANIFEST_NAME,
    RESULTS_NAME,
    SCHEMA_VERSION,
    Manifest,
    Provenance,
    Results,
)


def prepare_out_dir(path: Path) -> Path:
    """Create ``path``, or accept it if it is an empty folder; anything else is refused,
    so a bundle never mixes with files of another run."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"the output path {path} exists and is not a folder",
                          hint="pass --out a new folder name")
    if path.is_dir() and any(path.iterdir()):
        raise ConfigError(f"the output folder {path} is not empty",
                          hint="pass --out a new or empty folder; the runner never "
                               "overwrites or mixes bundles")
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_atomically(path: Path, text: str) -> None:
    """Write to a hidden temporary name in the same folder, sync, then rename."""
    temporary = path.with_name(f".{path.name}.partial")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def write_results(folder: Path, results: Results) -> None:
    write_atomically(folder / RESULTS_NAME, _json(results))


def write_manifest(folder: Path, *, run_id: str, job: JobSpec, provenance: Provenance) -> Manifest:
    """List every file already in ``folder`` with its size and sha256, then write the
    manifest. Call it last: whatever is written after it is not covered."""
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        run_id=run_id,
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        job=job,
        provenance=provenance,
        files=file_entries(folder),
    )
    write_atomically(folder / MANIFEST_NAME, _json(manifest))
    return manifest


def _json(model: BaseModel) -> str:
    return model.model_dump_json(indent=2) + "\n"
