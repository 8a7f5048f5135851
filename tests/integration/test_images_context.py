"""The image's content hash: the same tree gives the same tag anywhere, any input the
build sees changes it, and caches or timestamps never do."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from sparsek_remote import images
from sparsek_remote.errors import ImageError

pytestmark = pytest.mark.integration

PROJECT_ROOT = Path(__file__).resolve().parents[2]
_INPUTS = ("docker/Dockerfile", "docker/requirements.lock", "pyproject.toml", "README.md",
           "LICENSE", "orchestrator/sparsek_remote", "kernels/sparsek")


def copy_inputs(dest: Path) -> Path:
    """A copy of what the image is built from, without caches."""
    for name in _INPUTS:
        source, target = PROJECT_ROOT / name, dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, target)
    return dest


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return copy_inputs(tmp_path / "a")


def test_hash_is_the_same_for_a_copy_with_caches_and_new_dates(tree: Path, tmp_path: Path
                                                              ) -> None:
    other = copy_inputs(tmp_path / "b")
    cache = other / "kernels/sparsek/__pycache__"
    cache.mkdir(exist_ok=True)
    (cache / "api.cpython-311.pyc").write_bytes(b"\0junk")
    (other / "orchestrator/sparsek_remote/.pytest_cache").mkdir()
    (other / "orchestrator/sparsek_remote/stale.pyc").write_bytes(b"junk")
    for path in (other / "kernels").rglob("*.py"):
        os.utime(path, (1, 1))
    first, second = images.collect_context(tree), images.collect_context(other)
    assert first.content_hash == second.content_hash
    assert first.tag == second.tag
    assert first.tag.startswith("sparsek-remote:") and len(first.content_hash) == 64


def test_hash_follows_a_one_byte_kernel_change_and_its_undo(tree: Path) -> None:
    before = images.collect_context(tree).content_hash
    kernel = tree / "kernels/sparsek/reference.py"
    original = kernel.read_bytes()
    kernel.write_bytes(original + b"\n")
    changed = images.collect_context(tree).content_hash
    kernel.write_bytes(original)
    assert changed != before
    assert images.collect_context(tree).content_hash == before


@pytest.mark.parametrize("change", ["lock", "dockerfile", "new_source_file", "torch_spec",
                                    "runtime_image", "executable_bit"])
def test_every_input_of_the_build_counts(tree: Path, change: str) -> None:
    before = images.collect_context(tree).content_hash
    options = images.BuildOptions()
    if change == "lock":
        _append(tree / "docker/requirements.lock", "filelock==3.0.0\n")
    elif change == "dockerfile":
        _append(tree / "docker/Dockerfile", "# a comment\n")
    elif change == "new_source_file":
        (tree / "orchestrator/sparsek_remote/extra.py").write_text("X = 1\n")
    elif change == "torch_spec":
        options = images.BuildOptions(torch_spec="torch==2.12.0")
    elif change == "runtime_image":
        options = images.BuildOptions(runtime_image="nvidia/cuda:13.0.0-runtime-ubuntu24.04")
    elif change == "executable_bit":
        (tree / "kernels/sparsek/api.py").chmod(0o755)
    assert images.collect_context(tree, options).content_hash != before


def test_the_ca_bundle_and_files_outside_the_inputs_do_not_count(tree: Path, tmp_path: Path
                                                                ) -> None:
    before = images.collect_context(tree).content_hash
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    (tree / "notes.md").write_text("not an input\n")
    (tree / "tests").mkdir()
    (tree / "tests/test_x.py").write_text("def test(): pass\n")
    assert images.collect_context(tree, images.BuildOptions(ca_bundle=ca)).content_hash == before


def test_context_tar_is_byte_identical_and_holds_exactly_the_inputs(tree: Path, tmp_path: Path
                                                                   ) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    context = images.collect_context(tree, images.BuildOptions(ca_bundle=ca))
    first, second = io.BytesIO(), io.BytesIO()
    images.write_context_tar(context, first)
    images.write_context_tar(context, second)
    assert first.getvalue() == second.getvalue()
    with tarfile.open(fileobj=io.BytesIO(first.getvalue())) as tar:
        names = set(tar.getnames())
    assert {"docker/Dockerfile", "docker/requirements.lock", "pyproject.toml", "LICENSE",
            "docker/ca/ca.pem", "kernels/sparsek/reference.py",
            "orchestrator/sparsek_remote/images/layers.py"} <= names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert not [n for n in names if n.startswith(("tests/", "jobs/", "results/"))]


def test_a_missing_input_is_an_image_error_with_a_hint(tree: Path) -> None:
    (tree / "LICENSE").unlink()
    with pytest.raises(ImageError) as caught:
        images.collect_context(tree)
    assert "LICENSE" in str(caught.value) and caught.value.hint


def _append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)
