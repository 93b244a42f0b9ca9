"""The installed ``mqstore`` command, run as a subprocess: its JSON output and exit codes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mqstore.crypto import create_key_file


def _mqstore(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("mqstore", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-m", "mqstore"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120)


def test_demo_runs_a_full_cycle_and_scan_is_clean(tmp_path: Path) -> None:
    data = tmp_path / "data"
    key = create_key_file(tmp_path / "k.key")
    out = _mqstore("demo", "--data-dir", str(data), "--key-file", str(key), "--messages", "20", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["enqueued"] == 20 and report["leased"] == 20
    assert report["delivered"] + report["deferred"] == 20 and report["deferred"] == 5
    assert report["stats"]["recipients"]["delivered"] == 2 * report["delivered"]
    assert report["scan_clean"] is True
    scan = _mqstore("scan", "--data-dir", str(data), "--key-file", str(key), "--json")
    assert scan.returncode == 0, scan.stderr
    assert json.loads(scan.stdout)["clean"] is True


def test_demo_with_default_key_warns_once_on_stderr(tmp_path: Path) -> None:
    out = _mqstore("demo", "--data-dir", str(tmp_path / "d"), "--messages", "3")
    assert out.returncode == 0, out.stderr
    assert "production keys belong elsewhere" in out.stderr
    assert "enqueued 3 messages" in out.stdout


def test_scan_of_a_missing_store_is_a_clear_error(tmp_path: Path) -> None:
    out = _mqstore("scan", "--data-dir", str(tmp_path / "nothing"), "--json")
    assert out.returncode == 2
    assert json.loads(out.stdout)["error"] == "NotFound"


@pytest.mark.parametrize("args", [["--help"], ["demo", "--help"], ["scan", "--help"]])
def test_help(args: list[str]) -> None:
    out = _mqstore(*args)
    assert out.returncode == 0 and "usage: mqstore" in out.stdout
