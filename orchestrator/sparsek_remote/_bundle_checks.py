"""The checks behind ``artifacts``: names, the file tree, JSON documents, digests.

A bundle comes back from a host we rent, not one we trust. So nothing here follows a
link (a link could point anywhere on this machine), every name is held to the
schema's path pattern before it becomes a path, and every size is bounded before
anything is read into memory. Each refusal raises ``BundleError`` with a reason that
names the file or field; ``artifacts`` adds the bundle's location.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from sparsek_remote.errors import BundleError
from sparsek_remote.schema import (
    BUNDLE_PATH_PATTERN,
    MANIFEST_NAME,
    RESULTS_NAME,
    SUPPORTED_SCHEMA_VERSIONS,
    FileEntry,
    Manifest,
    Results,
)

# An Nsight Compute report runs to hundreds of megabytes; a file of gigabytes means
# something went wrong on the host, and copying it would only fill this disk.
MAX_FILE_BYTES = 2 * 2**30
MAX_BUNDLE_BYTES = 16 * 2**30
# manifest.json and results.json are parsed in memory.
MAX_DOCUMENT_BYTES = 256 * 2**20
MAX_FILES = 10_000
MAX_PATH_CHARS = 255
MAX_DEPTH = 4
CHUNK_BYTES = 1 << 20

_PATH_RE = re.compile(BUNDLE_PATH_PATTERN)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
# A pipe swapped in after the tree was scanned must not block the open.
_READ_FLAGS = os.O_RDONLY | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | getattr(os, "O_BINARY", 0)

Model = TypeVar("Model", bound=BaseModel)


def show(text: object, limit: int = 80) -> str:
    """A name from a host, quoted and made printable (non-ASCII escaped, length capped)."""
    text = str(text)
    return ascii(text[:limit]) + ("..." if len(text) > limit else "")


def path_problem(path: str) -> str | None:
    """Why ``path`` may not name a file in a bundle, or None when it may."""
    if not path:
        return "is empty"
    if path.startswith("/"):
        return "is absolute"
    if "\\" in path:
        return "contains a backslash"
    parts = path.split("/")
    if ".." in parts:
        return "climbs out of the bundle with '..'"
    if "" in parts or "." in parts:
        return "has an empty or '.' component"
    if len(path) > MAX_PATH_CHARS:
        return f"is longer than {MAX_PATH_CHARS} characters"
    if len(parts) > MAX_DEPTH:
        return f"is nested deeper than {MAX_DEPTH} levels"
    if not _PATH_RE.fullmatch(path):
        return "holds characters other than letters, digits, '.', '_' and '-'"
    return None


def _kind(mode: int) -> str:
    kinds = [(stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device")]
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _check_regular(rel: str, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        links = ", and links are never followed" if stat.S_ISLNK(st.st_mode) else ""
        raise BundleError(f"{show(rel)} is {_kind(st.st_mode)}; a bundle holds only regular "
                          f"files and folders{links}")
    if st.st_nlink > 1:
        raise BundleError(f"{show(rel)} has {st.st_nlink} hard links; a bundle file must have "
                          "exactly one, so that it cannot alias a file outside the bundle")
    if st.st_size > MAX_FILE_BYTES:
        raise BundleError(f"{show(rel)} is {st.st_size} bytes, more than the "
                          f"{MAX_FILE_BYTES // 2**30} GiB one bundle file may hold")


def scan_tree(folder: Path) -> dict[str, int]:
    """Every regular file under ``folder``: relative POSIX path -> size in bytes.

    Refuses links of either kind, devices, pipes, sockets, names outside the path
    pattern and oversized files. An empty folder holds nothing to list or to lose
    (a profiler that wrote no report leaves one), so it is let be."""
    found: dict[str, int] = {}
    _scan_dir(folder, "", found)
    total = sum(found.values())
    if total > MAX_BUNDLE_BYTES:
        raise BundleError(f"the bundle holds {total} bytes, more than the "
                          f"{MAX_BUNDLE_BYTES // 2**30} GiB a bundle may hold")
    return found


def _scan_dir(folder: Path, prefix: str, found: dict[str, int]) -> None:
    with os.scandir(folder) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        rel = prefix + entry.name
        problem = path_problem(rel)
        if problem:
            raise BundleError(f"the bundle holds {show(rel)}, whose path {problem}")
        st = entry.stat(follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            _scan_dir(Path(entry.path), rel + "/", found)
            continue
        _check_regular(rel, st)
        found[rel] = st.st_size
        if len(found) > MAX_FILES:
            raise BundleError(f"the bundle holds more than {MAX_FILES} files")


def open_regular(path: Path, rel: str) -> int:
    """Open a bundle file for reading without following a link; check it once more
    on the open descriptor, so a file swapped after the scan is still caught."""
    try:
        fd = os.open(path, _READ_FLAGS)
    except FileNotFoundError:
        raise BundleError(f"{show(rel)} disappeared while the bundle was being read") from None
    except OSError as exc:
        raise BundleError(f"{show(rel)} cannot be opened ({exc.strerror}); a bundle holds "
                          "only regular files, and links are never followed") from None
    try:
        _check_regular(rel, os.fstat(fd))
    except BundleError:
        os.close(fd)
        raise
    return fd


def digest(path: Path, rel: str, *, stop_after: int) -> tuple[int, str]:
    """Size and sha256 of a bundle file, read in chunks (ncu reports are large).
    Reading stops once ``stop_after`` bytes are exceeded: the size is wrong then anyway."""
    sha = hashlib.sha256()
    size = 0
    with os.fdopen(open_regular(path, rel), "rb") as src:
        while size <= stop_after and (chunk := src.read(CHUNK_BYTES)):
            size += len(chunk)
            sha.update(chunk)
    return size, sha.hexdigest()


def read_document(path: Path, rel: str) -> bytes:
    """The bytes of a JSON document of the bundle, bounded in size."""
    with os.fdopen(open_regular(path, rel), "rb") as src:
        raw = src.read(MAX_DOCUMENT_BYTES + 1)
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise BundleError(f"{rel} is larger than the {MAX_DOCUMENT_BYTES // 2**20} MiB "
                          "a bundle document may hold")
    return raw


def copy_regular(src: Path, dst: Path, rel: str) -> None:
    """Copy one bundle file into a fresh location, never following or replacing a link."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with os.fdopen(open_regular(src, rel), "rb") as fin, \
            os.fdopen(os.open(dst, _WRITE_FLAGS, 0o644), "wb") as fout:
        while chunk := fin.read(CHUNK_BYTES):
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())


class _JsonProblem(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two readers could disagree about which of two equal keys wins: refuse both.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _JsonProblem(f"the key {show(key)} appears twice in one object")
        out[key] = value
    return out


def _no_constants(name: str) -> Any:
    raise _JsonProblem(f"it holds {name}, which is not valid JSON: every number must be finite")


def parse_json(raw: bytes, name: str) -> dict[str, Any]:
    """Decode a bundle document; errors name the file and the position in it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BundleError(f"{name} is not UTF-8 text (invalid byte at offset {exc.start})") \
            from None
    if not text.strip():
        raise BundleError(f"{name} is empty")
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except json.JSONDecodeError as exc:
        raise BundleError(_json_error(exc, text, name)) from None
    except _JsonProblem as exc:
        raise BundleError(f"{name}: {exc}") from None
    except (ValueError, RecursionError) as exc:
        # Numbers of thousands of digits, or thousands of nested brackets.
        raise BundleError(f"{name} cannot be read as JSON: {type(exc).__name__}") from None
    if not isinstance(data, dict):
        raise BundleError(f"{name} must hold a JSON object at the top level, not a "
                          f"{type(data).__name__}")
    return data


def _json_error(exc: json.JSONDecodeError, text: str, name: str) -> str:
    where = f"line {exc.lineno}, column {exc.colno} (byte {exc.pos})"
    # Cut off anywhere (even inside a number, as in '"ratio": 2.'), a document has
    # nothing left after the error that could close it.
    truncated = (exc.pos >= len(text.rstrip()) or exc.msg.startswith("Unterminated")
                 or not any(c in text[exc.pos:] for c in "]}"))
    tail = "; it ends early, so the file looks truncated" if truncated else ""
    return f"{name} is not valid JSON: {exc.msg.removesuffix(' at')} at {where}{tail}"


def check_version(data: dict[str, Any], name: str) -> int:
    """The document's schema version, read before anything else in it."""
    if "schema_version" not in data:
        raise BundleError(f"{name} has no schema_version, so it cannot be read")
    version = data["schema_version"]
    if type(version) is not int:
        raise BundleError(f"{name}: schema_version must be a whole number")
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        known = ", ".join(str(v) for v in sorted(SUPPORTED_SCHEMA_VERSIONS))
        shown = str(version) if abs(version) < 10**12 else "(a huge number)"
        raise BundleError(f"{name} has schema_version {shown}, which this "
                          f"sparsek-remote cannot read (it reads version {known}); upgrade "
                          "sparsek-remote to read bundles from a newer runner")
    return version


def check_listed_paths(data: dict[str, Any]) -> None:
    """Name a bad path in the manifest's file list before the schema would, plainly."""
    files = data.get("files")
    for i, item in enumerate(files if isinstance(files, list) else []):
        path = item.get("path") if isinstance(item, dict) else None
        problem = path_problem(path) if isinstance(path, str) else None
        if problem:
            raise BundleError(f"{MANIFEST_NAME}: files[{i}].path {show(path)} {problem}; "
                              "a bundle lists only relative paths of plain names")


def validate_model(model: type[Model], data: dict[str, Any], name: str) -> Model:
    """Strict schema validation; errors name the field path, never the value found."""
    try:
        return model.model_validate(data, strict=True)
    except ValidationError as exc:
        problems = [_problem(err) for err in exc.errors(include_input=False, include_url=False)]
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise BundleError(f"{name} does not match the bundle schema: "
                          + "; ".join(problems[:5]) + more) from None


def _problem(err: Any) -> str:
    loc = [p for p in err["loc"] if p not in ("sparsek", "sdpa")]  # union tags
    field = ""
    for part in loc:
        field += f"[{part}]" if isinstance(part, int) else (f".{part}" if field else str(part))
    if err["type"] == "string_pattern_mismatch":
        msg = "holds characters or a form that is not allowed here"
    elif err["type"] == "missing":
        msg = "is required"
    else:
        msg = err["msg"].removeprefix("Value error, ")
    return f"{field or '(top level)'}: {msg}"


def names(paths: list[str]) -> str:
    """A few paths, quoted, for a message; how many more there are."""
    shown = ", ".join(show(p) for p in paths[:5])
    return shown + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")


def check_listing(manifest: Manifest, found: dict[str, int]) -> None:
    """Exactly the listed files are present, each of its listed size."""
    listed = {f.path for f in manifest.files}
    present = set(found) - {MANIFEST_NAME}
    missing = sorted(listed - present)
    if missing:
        raise BundleError(f"listed in {MANIFEST_NAME} but absent from the bundle (missing): "
                          f"{names(missing)}")
    extra = sorted(present - listed)
    if extra:
        raise BundleError(f"present in the bundle but not listed in {MANIFEST_NAME} (extra): "
                          f"{names(extra)}; every file must be listed with its sha256")
    for entry in manifest.files:
        check_size(entry, found[entry.path])


def check_size(entry: FileEntry, size: int) -> None:
    if size != entry.size:
        raise BundleError(f"{entry.path} is {size} bytes but {MANIFEST_NAME} lists "
                          f"{entry.size}: it was changed or cut short after the manifest "
                          "was written (tampered)")


def check_sha(entry: FileEntry, sha: str) -> None:
    if sha != entry.sha256:
        raise BundleError(f"{entry.path} does not match its sha256 in {MANIFEST_NAME} "
                          f"(tampered or corrupted): listed {entry.sha256[:12]}..., "
                          f"found {sha[:12]}...")


def verified_results_bytes(folder: Path, manifest: Manifest) -> bytes:
    # Hash the very bytes that are parsed, so the file cannot change in between.
    entry = next(f for f in manifest.files if f.path == RESULTS_NAME)
    raw = read_document(folder / RESULTS_NAME, RESULTS_NAME)
    check_size(entry, len(raw))
    check_sha(entry, hashlib.sha256(raw).hexdigest())
    return raw


def check_digests(folder: Path, manifest: Manifest) -> None:
    """Every listed file but results.json (checked as it is read) matches its sha256."""
    for entry in manifest.files:
        if entry.path == RESULTS_NAME:
            continue
        size, sha = digest(folder / entry.path, entry.path, stop_after=entry.size)
        check_size(entry, size)
        check_sha(entry, sha)


def read_results(raw: bytes, manifest: Manifest) -> Results:
    """Parse results.json and check that it belongs to the manifest's run and job."""
    data = parse_json(raw, RESULTS_NAME)
    check_version(data, RESULTS_NAME)
    results = validate_model(Results, data, RESULTS_NAME)
    if results.schema_version != manifest.schema_version:
        raise BundleError(f"{RESULTS_NAME} has schema_version {results.schema_version} but "
                          f"{MANIFEST_NAME} has {manifest.schema_version}")
    if results.run_id != manifest.run_id:
        raise BundleError(f"{RESULTS_NAME} is for run {results.run_id} but {MANIFEST_NAME} "
                          f"is for run {manifest.run_id}")
    check_results_match_job(results, manifest)
    check_gpu_indices(results, manifest)
    return results


def check_results_match_job(results: Results, manifest: Manifest) -> None:
    cases = {c.name for c in manifest.job.cases}
    impls = {i.label for i in manifest.job.implementations}
    seen: set[tuple[str, str]] = set()
    for i, res in enumerate(results.results):
        where = f"{RESULTS_NAME}: results[{i}]"
        if res.case not in cases:
            raise BundleError(f"{where} names case {res.case!r}, which is not a case of the "
                              f"job in {MANIFEST_NAME} (its cases: {', '.join(sorted(cases))})")
        if res.implementation not in impls:
            raise BundleError(f"{where} names implementation {res.implementation!r}, which "
                              f"is not an implementation of the job in {MANIFEST_NAME} "
                              f"(its implementations: {', '.join(sorted(impls))})")
        if (res.case, res.implementation) in seen:
            raise BundleError(f"{where} repeats case {res.case!r} with implementation "
                              f"{res.implementation!r}")
        seen.add((res.case, res.implementation))


def check_gpu_indices(results: Results, manifest: Manifest) -> None:
    """Every GPU a result names is one the manifest's provenance describes."""
    listed = {gpu.index for gpu in manifest.provenance.gpus}
    for i, res in enumerate(results.results):
        if res.gpu_index is not None and res.gpu_index not in listed:
            known = ", ".join(str(n) for n in sorted(listed)) or "none"
            raise BundleError(f"{RESULTS_NAME}: results[{i}] ({res.case}/{res.implementation}) "
                              f"was measured on GPU {res.gpu_index}, which {MANIFEST_NAME} does "
                              f"not describe (its provenance.gpus lists: {known})")
