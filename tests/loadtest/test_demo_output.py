"""`polarity demo` never overwrites a non-empty --out without --force (it refuses before any work)."""
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.demo import DemoOutputNotEmpty, run_demo


def test_the_cli_refuses_a_folder_with_files_and_leaves_them_alone(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    proc = subprocess.run([sys.executable, "-m", "model.cli", "demo", "--out", str(tmp_path), "--events", "1000"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "--force" in proc.stderr and str(tmp_path) in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert notes.read_text() == "mine"


def test_a_file_in_place_of_the_folder_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "demo"
    target.write_text("not a folder")
    with pytest.raises(DemoOutputNotEmpty):
        run_demo(out=target, events=1000, seed=0)
    assert target.read_text() == "not a folder"
