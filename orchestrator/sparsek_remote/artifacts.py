"""Result bundles on disk: describe, validate, store, quarantine, load, extract.

Nothing reaches ``results/`` unless all of it checks out: every file listed in the
manifest with its size and sha256 and nothing else present, both documents valid for
their schema version, the results about the cases of the job that was run. A bundle
that fails is moved aside with its reason, never merged. Stored bundles are
installed by one rename of a fully checked copy, so a reader never sees half of one.

The runner imports this module on the GPU host to describe its bundle
(:func:`file_entries`), so it needs only the standard library and pydantic.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

from sparsek_remote import _bundle_checks as checks
from sparsek_remote import _safe_tar
from sparsek_remote.errors import BundleError, ConfigError
from sparsek_remote.jobspec import TARGET_PATTERN
from sparsek_remote.schema import (
    MANIFEST_NAME,
    RUN_ID_PATTERN,
    FileEntry,
    Manifest,
    Results,
)

REASON_NAME = "REASON.txt"
QUARANTINED_BUNDLE = "bundle"
EXAMPLES_FOLDER = "examples"
_RUN_ID_RE = re.compile(RUN_ID_PATTERN)
_JOB_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True)
class ValidBundle:
    """A bundle folder whose every file and field has been checked."""

    path: Path
    manifest: Manifest
    results: Results

    @property
    def run_id(self) -> str:
        return self.manifest.run_id

    @property
    def host_alias(self) -> str:
        return self.manifest.provenance.host_alias


@dataclass(frozen=True)
class StoredRun:
    """One stored run: a checked bundle per host, by host alias."""

    run_id: str
    bundles: dict[str, ValidBundle]
    path: Path | None = None


@contextlib.contextmanager
def _about(folder: Path) -> Iterator[None]:
    """Give every refusal raised inside the bundle's location."""
    try:
        yield
    except BundleError as err:
        if err.bundle is not None:
            raise
        raise BundleError(err.reason, bundle=folder) from None
    except OSError as exc:
        what = exc.strerror or type(exc).__name__
        where = f" ({exc.filename})" if exc.filename else ""
        raise BundleError(f"reading or writing it failed: {what}{where}",
                          bundle=folder) from None


def file_entries(folder: Path) -> list[FileEntry]:
    """Every regular file under ``folder`` but the manifest, with size and sha256,
    sorted by path: the ``files`` list the runner writes into ``manifest.json``."""
    folder = Path(folder)
    with _about(folder):
        _check_is_folder(folder)
        entries = []
        for rel, size in sorted(checks.scan_tree(folder).items()):
            if rel == MANIFEST_NAME:
                continue
            got_size, sha = checks.digest(folder / rel, rel, stop_after=size)
            if got_size != size:
                raise BundleError(f"{rel} changed size while it was being described")
            entries.append(FileEntry(path=rel, size=size, sha256=sha))
    return entries


def validate_bundle(folder: Path, *, expected_run_id: str | None = None,
                    expected_host: str | None = None) -> ValidBundle:
    """Check a bundle folder completely; raise ``BundleError`` naming the first problem."""
    folder = Path(folder)
    with _about(folder):
        _check_is_folder(folder)
        found = checks.scan_tree(folder)
        manifest = _read_manifest(folder, found)
        _check_expected(manifest, expected_run_id, expected_host)
        checks.check_listing(manifest, found)
        raw_results = checks.verified_results_bytes(folder, manifest)
        checks.check_digests(folder, manifest)
        results = checks.read_results(raw_results, manifest)
    return ValidBundle(path=folder, manifest=manifest, results=results)


def _check_is_folder(folder: Path) -> None:
    try:
        mode = os.lstat(folder).st_mode
    except FileNotFoundError:
        raise BundleError("the bundle folder does not exist") from None
    if stat.S_ISLNK(mode):
        raise BundleError("the bundle path is a symbolic link; links are never followed")
    if not stat.S_ISDIR(mode):
        raise BundleError("the bundle path is not a folder")


def _read_manifest(folder: Path, found: dict[str, int]) -> Manifest:
    if MANIFEST_NAME not in found:
        raise BundleError(f"{MANIFEST_NAME} is missing: a bundle starts with its manifest, "
                          "which lists every other file")
    data = checks.parse_json(checks.read_document(folder / MANIFEST_NAME, MANIFEST_NAME),
                             MANIFEST_NAME)
    checks.check_version(data, MANIFEST_NAME)
    checks.check_listed_paths(data)
    return checks.validate_model(Manifest, data, MANIFEST_NAME)


def _check_expected(manifest: Manifest, run_id: str | None, host: str | None) -> None:
    if run_id is not None and manifest.run_id != run_id:
        raise BundleError(f"the bundle is for run {manifest.run_id}, but run {run_id} "
                          "was expected")
    if host is not None and manifest.provenance.host_alias != host:
        raise BundleError(f"the bundle comes from host {manifest.provenance.host_alias!r}, "
                          f"but host {host!r} was expected")


def store_bundle(src: Path, results_root: Path, *, quarantine_root: Path,
                 expected_run_id: str | None = None,
                 expected_host: str | None = None) -> Path:
    """Check ``src`` and install a copy at ``results_root/<run_id>/<host_alias>/``.

    A refused bundle is moved to ``quarantine_root`` with a REASON.txt (the error's
    ``quarantined_at`` says where) and nothing under ``results_root`` changes. A
    bundle already stored for the same run and host is never replaced or merged
    into: that refusal leaves both where they are. ``src`` itself is left in place
    when the bundle is stored. Returns the stored bundle's folder."""
    src, results_root, quarantine_root = Path(src), Path(results_root), Path(quarantine_root)
    try:
        bundle = validate_bundle(src, expected_run_id=expected_run_id,
                                 expected_host=expected_host)
    except BundleError as err:
        _quarantine(src, quarantine_root, err)
        raise
    target = results_root / bundle.run_id / bundle.host_alias
    if os.path.lexists(target):
        raise _already_stored(bundle, target, src)
    results_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=results_root))
    try:
        with _about(src):
            # mkdtemp makes it private; a stored bundle is as readable as the results.
            os.chmod(staging, 0o755)  # noqa: S103
            _copy_listed(bundle, staging)
            _recheck_copy(staging, bundle, src, quarantine_root)
            _install(staging, target, bundle, src)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _copy_listed(bundle: ValidBundle, staging: Path) -> None:
    # Copy only what was checked: the manifest and the files it lists.
    for rel in [MANIFEST_NAME, *(f.path for f in bundle.manifest.files)]:
        parts = rel.split("/")
        checks.copy_regular(bundle.path.joinpath(*parts), staging.joinpath(*parts), rel)


def _recheck_copy(staging: Path, bundle: ValidBundle, src: Path, quarantine_root: Path) -> None:
    # A file changed between the first check and the copy shows up here.
    try:
        validate_bundle(staging, expected_run_id=bundle.run_id, expected_host=bundle.host_alias)
    except BundleError as err:
        refusal = BundleError(f"it changed while being stored: {err.reason}", bundle=src)
        _quarantine(src, quarantine_root, refusal)
        raise refusal from None


def _already_stored(bundle: ValidBundle, target: Path, src: Path) -> BundleError:
    return BundleError(f"a bundle of run {bundle.run_id} from host {bundle.host_alias!r} is "
                       f"already stored at {target}; it is never overwritten or merged into, "
                       "and this one was left where it was", bundle=src)


def _install(staging: Path, target: Path, bundle: ValidBundle, src: Path) -> None:
    run_dir = target.parent
    made_run_dir = _make_real_dir(run_dir)
    try:
        _rename_into_place(staging, target, bundle, src)
    except BaseException:
        if made_run_dir:
            with contextlib.suppress(OSError):
                run_dir.rmdir()
        raise
    _fsync_dir(run_dir)


def _rename_into_place(staging: Path, target: Path, bundle: ValidBundle, src: Path) -> None:
    if os.path.lexists(target):
        raise _already_stored(bundle, target, src)
    try:
        # One rename: readers see the whole bundle or none. It fails on a non-empty
        # target, so a bundle stored meanwhile by someone else is never replaced.
        os.rename(staging, target)
    except OSError as exc:
        if os.path.lexists(target):
            raise _already_stored(bundle, target, src) from None
        raise BundleError(f"it could not be stored at {target}: {exc.strerror}",
                          bundle=src) from None


def _make_real_dir(path: Path) -> bool:
    """Create ``path``; True if this call made it. An existing link is refused."""
    try:
        path.mkdir()
        return True
    except FileExistsError:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            return False
        raise BundleError(f"{path} exists and is not a folder") from None


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _safe_name(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[:64]
    return cleaned or "bundle"


def _quarantine(src: Path, quarantine_root: Path, err: BundleError) -> None:
    """Move a refused bundle to ``quarantine_root/<UTC time>-<name>/bundle`` beside a
    REASON.txt. If it cannot be moved it stays where it was, unmarked."""
    if not os.path.lexists(src):
        return
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    try:
        place = _fresh_dir(quarantine_root, f"{stamp}-{_safe_name(src.name)}")
    except OSError:
        return
    try:
        shutil.move(os.fspath(src), os.fspath(place / QUARANTINED_BUNDLE))
    except (OSError, shutil.Error):
        shutil.rmtree(place, ignore_errors=True)
        return
    with contextlib.suppress(OSError):  # the bundle is aside already; the note is extra
        (place / REASON_NAME).write_text(
            f"refused: {err.reason}\nfrom: {src}\nat: {stamp}\n", encoding="utf-8")
    err.quarantined_at = place


def _fresh_dir(root: Path, name: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    try:
        (root / name).mkdir()
        return root / name
    except FileExistsError:
        return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))


def list_runs(results_root: Path) -> list[str]:
    """Run ids stored under ``results_root``, newest first. Dot-folders (staging) and
    ``examples`` are not runs; a link is never taken for one."""
    try:
        with os.scandir(results_root) as it:
            entries = list(it)
    except (FileNotFoundError, NotADirectoryError):
        return []
    runs = [e.name for e in entries
            if _RUN_ID_RE.fullmatch(e.name) and e.is_dir(follow_symlinks=False)]
    return sorted(runs, reverse=True)  # the id starts with its UTC time


def load_run(results_root: Path, run: str | Path) -> StoredRun:
    """Load and re-check every host's bundle of a stored run.

    ``run`` is a run id (looked up in ``results_root``) or the path of a run folder,
    such as ``examples/<run_id>`` (tried as given, then under ``results_root``)."""
    results_root = Path(results_root)
    folder = _run_folder(results_root, run)
    run_id = folder.name
    bundles = {alias: validate_bundle(folder / alias, expected_run_id=run_id,
                                      expected_host=alias)
               for alias in _host_folders(folder)}
    return StoredRun(run_id=run_id, bundles=bundles, path=folder)


def _is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _run_folder(results_root: Path, run: str | Path) -> Path:
    if isinstance(run, str) and _RUN_ID_RE.fullmatch(run):
        if _is_real_dir(results_root / run):
            return results_root / run
        raise ConfigError(f"no run {run} is stored in {results_root}",
                          hint=_available_runs(results_root))
    given = Path(run)
    candidates = [given] if given.is_absolute() else [given, results_root / given]
    folder = next((c for c in candidates if _is_real_dir(c)), None)
    if folder is None:
        raise ConfigError(f"{checks.show(str(run))} is neither a run id nor a run folder",
                          hint=_available_runs(results_root))
    if not _RUN_ID_RE.fullmatch(folder.name):
        raise ConfigError(f"{folder} is not a run folder: its name is not a run id "
                          "(like 20250101T120000Z-job-1a2b3c)",
                          hint=_available_runs(results_root))
    return folder


def _available_runs(results_root: Path) -> str:
    runs = list_runs(results_root)
    examples = [f"{EXAMPLES_FOLDER}/{r}" for r in list_runs(results_root / EXAMPLES_FOLDER)]
    if not runs and not examples:
        return f"no runs are stored in {results_root} yet; `sparsek-remote run JOB` makes one"
    listed = runs[:10] + examples[:5]
    more = len(runs) + len(examples) - len(listed)
    return ("available runs, newest first: " + ", ".join(listed)
            + (f" and {more} more" if more > 0 else ""))


def _host_folders(folder: Path) -> list[str]:
    """The host aliases with a bundle in a run folder. Names that cannot be a host
    alias (reports, notes) are not bundles and are let be; a link named like one is
    refused, because it is never followed."""
    aliases = []
    with os.scandir(folder) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        if not re.fullmatch(TARGET_PATTERN, entry.name) or entry.is_file(follow_symlinks=False):
            continue
        if not entry.is_dir(follow_symlinks=False):
            raise BundleError(f"{checks.show(entry.name)} is named like a host's bundle "
                              "but is not a folder (links are never followed)", bundle=folder)
        aliases.append(entry.name)
    if not aliases:
        raise BundleError("the run folder holds no bundles", bundle=folder)
    return aliases


def new_run_id(job_name: str, now: datetime | None = None) -> str:
    """``YYYYMMDDTHHMMSSZ-<job_name>-<6 hex>`` in UTC; a naive ``now`` is taken as UTC."""
    if not _JOB_NAME_RE.fullmatch(job_name):
        raise ConfigError(f"the job name {checks.show(job_name)} cannot be part of a run id",
                          hint="use 1 to 64 letters, digits, '.', '_' or '-'")
    now = now or datetime.now(timezone.utc)
    now = now.replace(tzinfo=timezone.utc) if now.tzinfo is None else now.astimezone(timezone.utc)
    return f"{now:%Y%m%dT%H%M%SZ}-{job_name}-{secrets.token_hex(3)}"


def safe_extract_tar(archive: Path | BinaryIO, dest: Path) -> list[str]:
    """Extract a fetched tar (optionally gzip-compressed) into ``dest``.

    Every member is checked before the first byte is written: links, devices,
    pipes, absolute names, '..' and names outside the bundle path pattern are
    refused, and then nothing is written at all. ``dest`` must be absent or an empty
    folder; if writing fails midway it is emptied again. Returns the extracted
    files' relative paths, sorted."""
    dest = Path(dest)
    with _about(dest):
        return _safe_tar.extract(archive, dest)
