"""`polarity export RUN --out DIR` never destroys data: a non-empty DIR that is not a bundle is refused (the run
itself included), an existing bundle is replaced only with --force, nothing outside the new bundle is deleted,
and the new bundle arrives by one rename (no staging or old directory is left beside it)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from export.bundle import MANIFEST_FILE, load_manifest
from loadtest.harness.random_bundle import random_run
from model.cli import main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An untrained tiny DIN run (a checkpoint is all `export` reads)."""
    root = tmp_path_factory.mktemp("export_target")
    yield random_run(root, seq_len=8, d_model=8, arch="din", n_items=50, n_categories=4, export=False).run_dir


def _export(run_dir: Path, out: Path, *extra: str) -> int:
    return main(["export", str(run_dir), "--out", str(out), "--no-check", *extra])


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_run_directory_and_its_neighbours_survive_an_out_pointing_at_them(
        run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parent = run_dir.parent
    notes = parent / "notes.txt"
    notes.write_text("my experiment notes\n")
    before_run, before_parent = _tree(run_dir), _tree(parent)

    assert _export(run_dir, run_dir) == 2  # --out = the run
    assert "holds the run being exported" in capsys.readouterr().err
    assert _export(run_dir, parent) == 2  # --out = the folder holding the run and the notes
    assert "holds the run being exported" in capsys.readouterr().err
    assert _export(run_dir, parent, "--force") == 2  # --force does not make it a bundle
    assert _tree(run_dir) == before_run
    assert _tree(parent) == before_parent
    assert notes.read_text() == "my experiment notes\n"


def test_a_non_empty_directory_that_is_not_a_bundle_is_refused(run_dir: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "mine"
    (out / "sub").mkdir(parents=True)
    (out / "data.csv").write_text("a,b\n1,2\n")
    (out / "sub" / "model.onnx").write_bytes(b"not yours")
    before = _tree(out)
    for extra in ((), ("--force",)):
        assert _export(run_dir, out, *extra) == 2
        err = capsys.readouterr().err
        assert "is not empty and is not a bundle" in err and "data.csv" in err
        assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no staging directory left beside it


def test_an_existing_bundle_is_replaced_only_with_force_and_atomically(run_dir: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bundle"
    out.mkdir()  # an empty directory is fine
    assert _export(run_dir, out, "--name", "first") == 0
    assert load_manifest(out).name == "first"
    inode = out.stat().st_ino

    assert _export(run_dir, out, "--name", "second") == 2
    assert "already holds a bundle; pass --force" in capsys.readouterr().err
    assert load_manifest(out).name == "first" and out.stat().st_ino == inode  # untouched

    assert _export(run_dir, out, "--name", "second", "--force") == 0
    manifest = load_manifest(out)  # verifies every file's sha256: a whole bundle, not a mix
    assert manifest.name == "second"
    assert out.stat().st_ino != inode  # a new directory renamed into place, not files rewritten in the old one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # the old bundle and the staging area are gone


def test_a_bundle_holding_a_file_of_the_user_is_not_replaced(run_dir: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bundle"
    assert _export(run_dir, out) == 0
    notes = out / "NOTES.md"
    notes.write_text("why this model is live\n")
    before = _tree(out)
    assert _export(run_dir, out, "--force") == 2
    assert "files its manifest does not list: NOTES.md" in capsys.readouterr().err
    assert _tree(out) == before
    notes.unlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / "data").symlink_to(elsewhere, target_is_directory=True)  # a link to the user's data is not the bundle's
    assert _export(run_dir, out, "--force") == 2
    assert "files its manifest does not list: data" in capsys.readouterr().err
    assert (out / "data").is_symlink() and elsewhere.is_dir()


def test_a_file_or_a_foreign_manifest_is_refused(run_dir: Path, tmp_path: Path) -> None:
    as_file = tmp_path / "out.onnx"
    as_file.write_bytes(b"x")
    assert _export(run_dir, as_file, "--force") == 2
    assert as_file.read_bytes() == b"x"
    other = tmp_path / "other"
    other.mkdir()
    (other / MANIFEST_FILE).write_text('{"format": "someone-else", "files": {}}')
    assert _export(run_dir, other, "--force") == 2
    assert os.listdir(other) == [MANIFEST_FILE]
