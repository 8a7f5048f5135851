"""Result bundles on disk: a good bundle is stored whole; every hostile one is refused
with a readable reason, kept aside with that reason, and leaves results/ untouched."""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import stat
import subprocess
import tarfile
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from sparsek_remote import _bundle_checks
from sparsek_remote.artifacts import (
    REASON_NAME,
    file_entries,
    list_runs,
    load_run,
    new_run_id,
    safe_extract_tar,
    store_bundle,
    validate_bundle,
)
from sparsek_remote.errors import BundleError, ConfigError
from sparsek_remote.schema import LOG_NAME, MANIFEST_NAME, RESULTS_NAME, RUN_ID_PATTERN

from .bundle_factory import NCU_FILE, RUN_ID, edit_json, relist, write_bundle

EARLIER_RUN = "20241231T235959Z-smoke-0f0f0f"


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` (hidden ones too) with its kind and content hash."""
    seen: dict[str, tuple] = {}
    if not os.path.lexists(root):
        return seen
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = os.lstat(path)
            rel = path.relative_to(root).as_posix()
            if stat.S_ISLNK(st.st_mode):
                seen[rel] = ("link", os.readlink(path))
            elif stat.S_ISREG(st.st_mode):
                seen[rel] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
            else:
                seen[rel] = ("other", stat.S_IFMT(st.st_mode))
    return seen


@dataclass
class Places:
    root: Path
    incoming: Path
    results: Path
    quarantine: Path

    def store(self, src: Path, **expected: str) -> Path:
        return store_bundle(src, self.results, quarantine_root=self.quarantine, **expected)


@pytest.fixture
def places(tmp_path: Path) -> Places:
    """A results folder that already holds one run, so 'unchanged' protects something."""
    p = Places(tmp_path, tmp_path / "incoming", tmp_path / "results", tmp_path / "quarantine")
    p.store(write_bundle(p.incoming / "earlier", run_id=EARLIER_RUN, host_alias="h100a"))
    return p


# A valid bundle


def test_valid_bundle_is_stored_whole_at_run_and_host(places: Places) -> None:
    src = write_bundle(places.incoming / "fresh")
    before = snapshot(src)

    stored = places.store(src)

    assert stored == places.results / RUN_ID / "local"
    assert snapshot(stored) == before
    assert snapshot(src) == before
    assert not [p for p in places.results.iterdir() if p.name.startswith(".staging-")]
    assert stat.S_IMODE(os.stat(stored).st_mode) == 0o755
    bundle = validate_bundle(stored, expected_run_id=RUN_ID, expected_host="local")
    assert {r.status for r in bundle.results.results} == {"ok", "gate_failed"}


def test_file_entries_describe_every_file_but_the_manifest(tmp_path: Path) -> None:
    src = write_bundle(tmp_path / "b")
    bundle = validate_bundle(src)

    entries = file_entries(src)

    assert entries == sorted(bundle.manifest.files, key=lambda e: e.path)
    assert [e.path for e in entries] == [NCU_FILE, RESULTS_NAME, LOG_NAME]


def test_file_entries_refuse_a_link(tmp_path: Path) -> None:
    src = write_bundle(tmp_path / "b")
    (src / "ncu" / "link").symlink_to(src / LOG_NAME)

    with pytest.raises(BundleError, match="ncu/link' is a symbolic link"):
        file_entries(src)


def test_an_empty_folder_is_let_be_and_not_stored(places: Places) -> None:
    src = write_bundle(places.incoming / "b")
    (src / "ncu" / "empty").mkdir()

    stored = places.store(src)

    assert not (stored / "ncu" / "empty").exists()


def test_a_file_swapped_for_a_link_after_the_scan_is_not_followed(tmp_path: Path) -> None:
    # The scan refuses links first; this is the second line, on the open itself.
    (tmp_path / "secret").write_text("secret\n")
    (tmp_path / "swapped").symlink_to(tmp_path / "secret")

    with pytest.raises(BundleError, match="'swapped' cannot be opened"):
        _bundle_checks.digest(tmp_path / "swapped", "swapped", stop_after=100)


def test_a_passing_only_bundle_validates(tmp_path: Path) -> None:
    src = write_bundle(tmp_path / "b", with_gate_failure=False, with_ncu=False)
    assert {r.status for r in validate_bundle(src).results.results} == {"ok"}


# Hostile bundles. Each changes a valid bundle; the words must appear in the reason.


def _flip_byte(b: Path, tmp: Path) -> None:
    data = bytearray((b / LOG_NAME).read_bytes())
    data[0] ^= 0x01
    (b / LOG_NAME).write_bytes(bytes(data))


def _append(b: Path, tmp: Path) -> None:
    with open(b / LOG_NAME, "ab") as f:
        f.write(b"one more line\n")


def _listed_path(path: str):
    def change(b: Path, tmp: Path) -> None:
        edit_json(b / MANIFEST_NAME, lambda m: m["files"].append(
            {"path": path, "size": 1, "sha256": "0" * 64}))
    return change


def _results(change, *, relisted: bool = True):
    """Edit results.json; relisting reaches the schema checks behind the digests."""
    def tamper(b: Path, tmp: Path) -> None:
        edit_json(b / RESULTS_NAME, change)
        if relisted:
            relist(b)
    return tamper


def _manifest(change):
    def tamper(b: Path, tmp: Path) -> None:
        edit_json(b / MANIFEST_NAME, change)
    return tamper


def _truncate(name: str, *, relisted: bool):
    def tamper(b: Path, tmp: Path) -> None:
        data = (b / name).read_bytes()
        (b / name).write_bytes(data[: len(data) // 2])
        if relisted:
            relist(b)
    return tamper


def _write(rel: str, data: bytes = b"x"):
    def tamper(b: Path, tmp: Path) -> None:
        (b / rel).write_bytes(data)
    return tamper


def _link_out(b: Path, tmp: Path) -> None:
    (tmp / "outside.txt").write_text("secret\n")
    (b / "ncu" / "peek").symlink_to(tmp / "outside.txt")


def _log_as_link(b: Path, tmp: Path) -> None:
    # Same bytes behind the link: only refusing to follow it catches this.
    shutil.move(b / LOG_NAME, tmp / "real.log")
    (b / LOG_NAME).symlink_to(tmp / "real.log")


def _hardlink(b: Path, tmp: Path) -> None:
    os.link(b / LOG_NAME, tmp / "alias.log")


def _fifo(b: Path, tmp: Path) -> None:
    os.mkfifo(b / "ncu" / "pipe")


def _sparse_giant(b: Path, tmp: Path) -> None:
    with open(b / "ncu" / "giant.ncu-rep", "wb") as f:
        f.truncate(2 * 2**30 + 1)  # sparse: no disk used, no byte read


def _set(path: str, value):
    """Set a value at a dotted path like 'results.0.timing.stats.median_ms'."""
    def change(data) -> None:
        *parents, last = path.split(".")
        for part in parents:
            data = data[int(part)] if part.isdigit() else data[part]
        data[int(last) if last.isdigit() else last] = value
    return change


def _drop(path: str):
    def change(data) -> None:
        *parents, last = path.split(".")
        for part in parents:
            data = data[int(part)] if part.isdigit() else data[part]
        del data[last]
    return change


def _timing_on_failed_case(data) -> None:
    data["results"][3]["timing"] = data["results"][0]["timing"]


HOSTILE = [
    pytest.param(_flip_byte, ["runner.log", "sha256", "tampered"], id="tampered-checksum"),
    pytest.param(_append, ["runner.log is 93 bytes", "lists 79", "tampered"],
                 id="tampered-size"),
    pytest.param(lambda b, t: (b / NCU_FILE).unlink(), ["absent", "missing", NCU_FILE],
                 id="missing-listed-file"),
    pytest.param(_write("notes.txt"), ["not listed", "extra", "'notes.txt'"],
                 id="extra-unlisted-file"),
    pytest.param(_write(".x"), ["not listed", "extra", "'.x'"], id="extra-hidden-file"),
    pytest.param(_write("bad name.txt"), ["'bad name.txt'", "characters other than"],
                 id="name-with-space"),
    pytest.param(_listed_path("../evil"), ["files[3].path '../evil'", "'..'"],
                 id="listed-dotdot"),
    pytest.param(_listed_path("/etc/passwd"), ["files[3].path '/etc/passwd' is absolute"],
                 id="listed-absolute"),
    pytest.param(_listed_path("ncu\\x"), ["backslash"], id="listed-backslash"),
    pytest.param(_link_out, ["'ncu/peek' is a symbolic link", "never followed"],
                 id="symlink-pointing-outside"),
    pytest.param(_log_as_link, ["'runner.log' is a symbolic link"], id="listed-file-is-symlink"),
    pytest.param(_hardlink, ["'runner.log' has 2 hard links"], id="hardlink"),
    pytest.param(_fifo, ["'ncu/pipe' is a named pipe"], id="fifo"),
    pytest.param(_sparse_giant, ["2147483649 bytes", "2 GiB"], id="oversized-file"),
    pytest.param(lambda b, t: (b / MANIFEST_NAME).unlink(), ["manifest.json is missing"],
                 id="no-manifest"),
    pytest.param(_manifest(_set("schema_version", 99)),
                 ["schema_version 99", "cannot read", "reads version 1"],
                 id="unknown-schema-version"),
    pytest.param(_results(_set("schema_version", 99)), ["results.json has schema_version 99"],
                 id="unknown-results-schema-version"),
    pytest.param(_truncate(RESULTS_NAME, relisted=True),
                 ["results.json is not valid JSON", "line", "truncated"],
                 id="truncated-results-relisted"),
    pytest.param(_truncate(RESULTS_NAME, relisted=False), ["results.json is", "tampered"],
                 id="truncated-results"),
    pytest.param(_truncate(MANIFEST_NAME, relisted=False),
                 ["manifest.json is not valid JSON", "line", "truncated"],
                 id="truncated-manifest"),
    pytest.param(_write(MANIFEST_NAME, b"[1, 2, 3]"), ["JSON object", "not a list"],
                 id="manifest-not-an-object"),
    pytest.param(_write(MANIFEST_NAME, b'{"run_id": "\xff"}'), ["manifest.json is not UTF-8"],
                 id="manifest-not-utf8"),
    pytest.param(_write(MANIFEST_NAME, b'{"schema_version": 1, "schema_version": 1}'),
                 ["'schema_version' appears twice"], id="duplicate-key"),
    pytest.param(_manifest(_drop("provenance")), ["provenance: is required"],
                 id="missing-field"),
    pytest.param(_manifest(_set("provenance.host_alias", "10.0.0.1")),
                 ["provenance.host_alias", "not allowed"], id="address-as-host-alias"),
    pytest.param(_results(_set("results.0.timing.stats.median_ms", -1.0)),
                 ["results[0].timing.stats.median_ms", "greater than or equal to 0"],
                 id="negative-median"),
    pytest.param(_results(_set("results.0.timing.stats.median_ms", float("nan"))),
                 ["results.json", "NaN", "finite"], id="nan-token"),
    pytest.param(_results(_set("results.0.timing.samples_ms", [float("inf")])),
                 ["Infinity", "finite"], id="infinity-token"),
    pytest.param(_results(_set("results.0.timing.stats.median_ms", "NaN")),
                 ["results[0].timing.stats.median_ms", "valid number"], id="nan-string"),
    pytest.param(_results(_set("results.0.flops", True)), ["results[0].flops", "valid number"],
                 id="bool-as-number"),
    pytest.param(_results(_set("results.0.timing.stats.q1_ms", 99.0)), ["not ordered"],
                 id="stats-out-of-order"),
    pytest.param(_results(_set("results.0.timing", None)),
                 ["results[0]", "must carry its timing"], id="ok-without-timing"),
    pytest.param(_results(_timing_on_failed_case),
                 ["results[3]", "'gate_failed' must not carry timing"],
                 id="gate-failed-with-timing"),
    pytest.param(_results(_set("run_id", EARLIER_RUN)),
                 [f"results.json is for run {EARLIER_RUN}", f"manifest.json is for run {RUN_ID}"],
                 id="run-id-mismatch"),
    pytest.param(_results(_set("results.0.case", "huge")),
                 ["results[0] names case 'huge'", "not a case of the job"], id="unknown-case"),
    pytest.param(_results(_set("results.0.implementation", "flash3")),
                 ["implementation 'flash3'", "not an implementation"],
                 id="unknown-implementation"),
    pytest.param(_results(_set("results.1.implementation", "sparsek-reference")),
                 ["results[1] repeats case 'small'"], id="repeated-result"),
]


@pytest.mark.parametrize(("tamper", "words"), HOSTILE)
def test_hostile_bundle_is_refused_kept_aside_and_changes_nothing(
        places: Places, tamper, words: list[str]) -> None:
    src = write_bundle(places.incoming / "hostile")
    tamper(src, places.root)
    before = snapshot(places.results)

    with pytest.raises(BundleError) as caught:
        places.store(src)

    err = caught.value
    for word in words:
        assert word in err.reason
    assert snapshot(places.results) == before
    assert err.quarantined_at is not None and err.quarantined_at.parent == places.quarantine
    assert not os.path.lexists(src)
    assert os.path.lexists(err.quarantined_at / "bundle" / "results.json")
    note = (err.quarantined_at / REASON_NAME).read_text(encoding="utf-8")
    assert err.reason in note and str(src) in note
    assert str(err.quarantined_at) in str(err)


@pytest.mark.parametrize(("expected", "words"), [
    ({"expected_host": "h100a"}, ["from host 'local'", "host 'h100a' was expected"]),
    ({"expected_run_id": EARLIER_RUN}, [f"run {RUN_ID}", f"run {EARLIER_RUN} was expected"]),
])
def test_bundle_from_another_run_or_host_is_refused(places: Places, expected, words) -> None:
    src = write_bundle(places.incoming / "b")
    before = snapshot(places.results)

    with pytest.raises(BundleError) as caught:
        places.store(src, **expected)

    assert all(word in caught.value.reason for word in words)
    assert snapshot(places.results) == before
    assert (caught.value.quarantined_at / REASON_NAME).is_file()


def test_schema_errors_do_not_echo_the_values_found(places: Places) -> None:
    src = write_bundle(places.incoming / "b")
    edit_json(src / MANIFEST_NAME, _set("provenance.host_alias", "203.0.113.7"))

    with pytest.raises(BundleError) as caught:
        places.store(src)

    assert "203.0.113.7" not in str(caught.value)


def test_a_missing_folder_is_refused_plainly(places: Places) -> None:
    with pytest.raises(BundleError, match="the bundle folder does not exist") as caught:
        places.store(places.incoming / "nowhere")
    assert caught.value.quarantined_at is None


def test_storing_the_same_run_and_host_twice_keeps_the_first(places: Places) -> None:
    first = places.store(write_bundle(places.incoming / "first"))
    second = write_bundle(places.incoming / "second")
    (second / LOG_NAME).write_text("a different log\n")
    relist(second)
    stored_before, second_before = snapshot(places.results), snapshot(second)

    with pytest.raises(BundleError) as caught:
        places.store(second)

    assert "already stored" in caught.value.reason
    assert "never overwritten or merged" in caught.value.reason
    assert caught.value.quarantined_at is None
    assert snapshot(places.results) == stored_before
    assert snapshot(second) == second_before
    assert validate_bundle(first).manifest.files != validate_bundle(second).manifest.files


def test_a_second_host_joins_the_same_run(places: Places) -> None:
    places.store(write_bundle(places.incoming / "a"))
    places.store(write_bundle(places.incoming / "b", host_alias="h100a"))

    run = load_run(places.results, RUN_ID)

    assert sorted(run.bundles) == ["h100a", "local"]
    assert run.bundles["h100a"].host_alias == "h100a"


# Loading stored runs


def test_list_runs_newest_first_without_staging_or_examples(places: Places) -> None:
    places.store(write_bundle(places.incoming / "b"))
    (places.results / ".staging-leftover").mkdir()
    (places.results / "examples").mkdir()
    (places.results / "notes.md").write_text("not a run")

    assert list_runs(places.results) == [RUN_ID, EARLIER_RUN]
    assert list_runs(places.root / "nowhere") == []


def test_load_run_by_id_and_by_example_path(places: Places) -> None:
    example = places.results / "examples" / RUN_ID
    example.mkdir(parents=True)
    shutil.copytree(write_bundle(places.incoming / "b"), example / "local")

    assert load_run(places.results, EARLIER_RUN).bundles["h100a"].run_id == EARLIER_RUN
    assert load_run(places.results, f"examples/{RUN_ID}").path == example
    assert load_run(places.root, example).run_id == RUN_ID


@pytest.mark.parametrize("run", ["20250101T000000Z-smoke-abcdef", "no-such-run", "../../etc"])
def test_load_run_names_the_available_runs(places: Places, run: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_run(places.results, run)
    assert EARLIER_RUN in str(caught.value.hint)


def test_load_run_rechecks_the_stored_bundle(places: Places) -> None:
    stored = places.results / EARLIER_RUN / "h100a"
    _flip_byte(stored, places.root)

    with pytest.raises(BundleError, match="runner.log does not match its sha256"):
        load_run(places.results, EARLIER_RUN)


def test_load_run_lets_be_what_cannot_be_a_host(places: Places) -> None:
    run = places.results / EARLIER_RUN
    (run / "REPORT").mkdir()
    (run / "notes.md").write_text("not a bundle")
    (run / ".partial").mkdir()

    assert sorted(load_run(places.results, EARLIER_RUN).bundles) == ["h100a"]


def test_load_run_refuses_a_link_named_like_a_host(places: Places) -> None:
    run = places.results / EARLIER_RUN
    (run / "local").symlink_to(run / "h100a")

    with pytest.raises(BundleError, match="'local' is named like a host's bundle"):
        load_run(places.results, EARLIER_RUN)


def test_load_run_checks_every_host_named_folder(places: Places) -> None:
    (places.results / EARLIER_RUN / "report").mkdir()

    with pytest.raises(BundleError, match="manifest.json is missing"):
        load_run(places.results, EARLIER_RUN)


# Run ids


def test_new_run_id_is_utc_and_matches_the_schema() -> None:
    now = datetime(2025, 1, 2, 5, 4, 5, tzinfo=timezone(timedelta(hours=2)))
    run_id = new_run_id("h100_gpt4", now)
    assert re.fullmatch(RUN_ID_PATTERN, run_id)
    assert run_id.startswith("20250102T030405Z-h100_gpt4-")
    assert new_run_id("smoke") != new_run_id("smoke")


def test_new_run_id_refuses_a_name_unfit_for_a_path() -> None:
    with pytest.raises(ConfigError, match="cannot be part of a run id"):
        new_run_id("a/b")


# Extracting fetched archives


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, **attrs) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in attrs.items():
        setattr(info, key, value)
    return info


BAD_MEMBERS = [
    pytest.param(lambda t: (_member("../x"), b"escape"), ["'../x'", "'..'"], id="dotdot"),
    pytest.param(lambda t: (_member("ok/../../x"), b"escape"), ["'..'"], id="nested-dotdot"),
    pytest.param(lambda t: (_member(str(t / "outside" / "x")), b"escape"), ["is absolute"],
                 id="absolute"),
    pytest.param(lambda t: (_member("link", tarfile.SYMTYPE, linkname=str(t / "outside")), None),
                 ["'link' is a symbolic link"], id="symlink"),
    pytest.param(lambda t: (_member("hard", tarfile.LNKTYPE, linkname="good.txt"), None),
                 ["'hard' is a hard link"], id="hardlink"),
    pytest.param(lambda t: (_member("dev", tarfile.CHRTYPE, devmajor=1, devminor=3), None),
                 ["'dev' is a device"], id="char-device"),
    pytest.param(lambda t: (_member("fifo", tarfile.FIFOTYPE), None),
                 ["'fifo' is a device or named pipe"], id="fifo"),
    pytest.param(lambda t: (_member("a\\b"), b"x"), ["backslash"], id="backslash"),
    pytest.param(lambda t: (_member("good.txt"), b"again"), ["'good.txt' twice"],
                 id="duplicate"),
    pytest.param(lambda t: (_member("good.txt/under"), b"x"), ["lies under 'good.txt'"],
                 id="under-a-file"),
]


@pytest.mark.parametrize("gz", [False, True], ids=["tar", "tar.gz"])
@pytest.mark.parametrize(("bad", "words"), BAD_MEMBERS)
def test_hostile_archive_writes_nothing_anywhere(tmp_path: Path, bad, words, gz: bool) -> None:
    archive = _tar(tmp_path / "fetched.tar", [(_member("good.txt"), b"fine"), bad(tmp_path)],
                   "w:gz" if gz else "w")
    dest = tmp_path / "dest"
    before = snapshot(tmp_path)

    with pytest.raises(BundleError) as caught:
        safe_extract_tar(archive, dest)

    assert all(word in caught.value.reason for word in words)
    assert snapshot(tmp_path) == before
    assert not dest.exists()


def _bundle_tar(tmp: Path, mode: str) -> Path:
    src = write_bundle(tmp / "remote" / "b")
    archive = tmp / ("b.tar.gz" if "gz" in mode else "b.tar")
    with tarfile.open(archive, mode) as tar:
        tar.add(src, arcname=".")  # as `tar -C b -c .` writes it
    return archive


@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_fetched_bundle_extracts_and_validates(tmp_path: Path, mode: str) -> None:
    archive = _bundle_tar(tmp_path, mode)

    names = safe_extract_tar(archive, tmp_path / "dest")

    assert names == sorted([MANIFEST_NAME, RESULTS_NAME, LOG_NAME, NCU_FILE])
    assert validate_bundle(tmp_path / "dest").run_id == RUN_ID


def test_extract_reads_a_stream_that_cannot_seek(tmp_path: Path) -> None:
    archive = _bundle_tar(tmp_path, "w:gz")
    with subprocess.Popen(["cat", str(archive)], stdout=subprocess.PIPE) as cat:
        assert not cat.stdout.seekable()
        names = safe_extract_tar(cat.stdout, tmp_path / "dest")
    assert MANIFEST_NAME in names


def test_extract_refuses_a_folder_that_holds_files(tmp_path: Path) -> None:
    archive = _bundle_tar(tmp_path, "w")
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "old.txt").write_text("keep me")

    with pytest.raises(BundleError, match="must be absent or an empty folder"):
        safe_extract_tar(archive, tmp_path / "dest")
    assert [p.name for p in (tmp_path / "dest").iterdir()] == ["old.txt"]


def test_extract_refuses_a_truncated_archive(tmp_path: Path) -> None:
    archive = _bundle_tar(tmp_path, "w:gz")
    archive.write_bytes(archive.read_bytes()[:-200])

    with pytest.raises(BundleError, match="the archive cannot be read"):
        safe_extract_tar(archive, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()

