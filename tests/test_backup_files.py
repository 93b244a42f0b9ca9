"""``mqstore backup``'s files beside its output: a backup killed with SIGKILL does not stand in the
way of the next one (its leftovers are removed and named), and two backups to the same file at
once never delete each other's work; the output appears only complete. Each backup that is
"killed" or overtaken here is a real process stopped inside its write (in its progress callback,
the file half written) by the test, not by a timer."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import mqstore
from mqstore.crypto import create_key_file
from mqstore.ops.backup import check_file
from mqstore.testing.kill import stopped_in_write


def _mqstore(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("mqstore", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-m", "mqstore"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    key = create_key_file(tmp_path / "kek.key")
    with mqstore.open(tmp_path / "store", key_file=key, background=False) as s:
        s.enqueue_many([{"mail_from": "a@example.org", "recipients": [f"r{i}@example.net"],
                         "data": b"Subject: x\r\n\r\n" + bytes(range(256)) * 40} for i in range(50)])
    return tmp_path / "store"


@pytest.fixture
def stopped(store: Path, tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """A backup of ``store`` to ``backups/spool.mqbak``, stopped half way through its write."""
    (tmp_path / "backups").mkdir()
    child = stopped_in_write("backup_local", str(store), str(tmp_path / "backups" / "spool.mqbak"))
    try:
        yield child
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=60)


def test_the_backup_after_one_killed_mid_write_succeeds_and_removes_its_leftovers(
    store: Path, tmp_path: Path, stopped: subprocess.Popen[str]
) -> None:
    backups = tmp_path / "backups"
    out = backups / "spool.mqbak"
    left = sorted(p.name for p in backups.iterdir())
    assert left and not out.exists()  # its temporary files, and no output yet
    stopped.send_signal(signal.SIGKILL)
    stopped.wait(timeout=60)
    done = _mqstore("backup", "--data-dir", str(store), "--out", str(out), "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["leftovers_removed"] == [str(backups / name) for name in left]
    for name in left:
        assert f"mqstore: removed {backups / name}, left by a backup to {out} that was killed" in done.stderr
    assert sorted(p.name for p in backups.iterdir()) == ["spool.mqbak"]  # nothing else left beside it
    check_file(out)


def test_two_backups_to_one_file_at_once_keep_each_others_files(
    store: Path, tmp_path: Path, stopped: subprocess.Popen[str]
) -> None:
    backups = tmp_path / "backups"
    out = backups / "spool.mqbak"
    first = sorted(p.name for p in backups.iterdir())
    second = _mqstore("backup", "--data-dir", str(store), "--out", str(out), "--json")
    assert second.returncode == 0, second.stdout + second.stderr
    assert json.loads(second.stdout)["leftovers_removed"] == []
    assert sorted(p.name for p in backups.iterdir()) == sorted([*first, "spool.mqbak"])  # the first's kept
    written = out.read_bytes()
    # The first goes on and finds the file there: it refuses to overwrite it and cleans up after itself.
    assert stopped.stdin is not None
    stopped.stdin.write("\n")
    stopped.stdin.flush()
    assert stopped.wait(timeout=60) != 0
    assert stopped.stderr is not None and f"{out} exists: refusing to overwrite a backup" in stopped.stderr.read()
    assert sorted(p.name for p in backups.iterdir()) == ["spool.mqbak"]
    assert out.read_bytes() == written
    check_file(out)


def test_what_an_earlier_version_may_have_left_is_named_not_removed(store: Path, tmp_path: Path) -> None:
    """``OUT.partial`` and ``mqstore-backup-*`` (the temporary names of earlier versions) may belong
    to a backup of that version still running: named in a warning, left alone."""
    backups = tmp_path / "backups"
    (backups / "mqstore-backup-x1y2").mkdir(parents=True)
    (backups / "spool.mqbak.partial").write_bytes(b"half a backup")
    out = backups / "spool.mqbak"
    done = _mqstore("backup", "--data-dir", str(store), "--out", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("mqstore-backup-x1y2", "spool.mqbak.partial"):
        assert (f"mqstore: warning: {backups / name} looks left by an interrupted backup of an earlier mqstore "
                "version") in done.stderr
    assert sorted(p.name for p in backups.iterdir()) == ["mqstore-backup-x1y2", "spool.mqbak", "spool.mqbak.partial"]
