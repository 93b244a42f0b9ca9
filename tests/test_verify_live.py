"""``mqstore verify --data-dir`` on a store in use: a healthy store whose writer appends while it is
verified is reported clean (a consistent copy of it is verified, and the report says so), and the
copy is removed afterwards. The writer is a real process that writes exactly when the test tells
it to: in the middle of verify's first phase."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import mqstore
from mqstore.crypto import create_key_file
from mqstore.ops.verify import verify_path

#: The application: holds the store open for writing; on each line "write" it enqueues 20 messages
#: and answers "done".
_WRITER = """
import sys
import mqstore
store = mqstore.open(sys.argv[1], key_file=sys.argv[2], background=False)
print("ready", flush=True)
for line in sys.stdin:
    store.enqueue_many([{"mail_from": "a@example.org", "recipients": [f"r{i}@example.net"],
                         "data": b"Subject: x\\r\\n\\r\\nbody\\r\\n"} for i in range(20)])
    print("done", flush=True)
store.close()
"""


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[tuple[Path, Path, subprocess.Popen[str]]]:
    key = create_key_file(tmp_path / "kek.key")
    with mqstore.open(tmp_path / "store", key_file=key, background=False) as store:
        store.enqueue_many([{"mail_from": "a@example.org", "recipients": ["b@example.net"], "data": b"x"}
                            for _ in range(10)])
    child = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path / "store"), str(key)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        yield tmp_path / "store", key, child
    finally:
        if child.stdin is not None:
            child.stdin.close()
        child.wait(timeout=60)


def _write(child: subprocess.Popen[str]) -> None:
    assert child.stdin is not None and child.stdout is not None
    child.stdin.write("write\n")
    child.stdin.flush()
    assert child.stdout.readline() == "done\n"


def test_a_store_written_to_while_it_is_verified_is_clean(
    writer: tuple[Path, Path, subprocess.Popen[str]], tmp_path: Path
) -> None:
    path, key, child = writer
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    wrote: list[str] = []

    def progress(phase: str, done: int, total: int) -> None:
        if not wrote:  # the records have been read: the writer appends before the state is
            wrote.append(phase)
            _write(child)

    report = verify_path(path, key_file=str(key), progress=progress, scratch_dir=scratch)
    assert wrote == ["records"]
    assert report.clean and report.replayed, report.problems
    assert report.consistent_copy and report.to_dict()["consistent_copy"] is True
    assert report.lines()[0] == ("the store is in use (its writer is running): verified a consistent copy of it, "
                                 "taken in one read transaction")
    assert report.messages_checked == 10  # the copy: the store as it was when verify began
    assert list(scratch.iterdir()) == []  # the copy is gone


def test_the_command_says_it_verified_a_copy_of_a_store_in_use(
    writer: tuple[Path, Path, subprocess.Popen[str]], tmp_path: Path
) -> None:
    path, key, child = writer
    _write(child)
    exe = shutil.which("mqstore", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-m", "mqstore"]
    args = [*cmd, "verify", "--data-dir", str(path), "--key-file", str(key), "--scratch", str(tmp_path)]
    out = subprocess.run([*args, "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert report["clean"] and report["consistent_copy"] and report["messages_checked"] == 30
    human = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert human.returncode == 0 and human.stdout.startswith("the store is in use (its writer is running): "
                                                             "verified a consistent copy"), human.stdout
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("mqstore-verify-")]
    # Once its writer stopped, the store itself is verified.
    child.stdin.close()  # type: ignore[union-attr]
    child.wait(timeout=60)
    stopped = json.loads(subprocess.run([*args, "--json"], capture_output=True, text=True, timeout=120).stdout)
    assert stopped["clean"] and stopped["consistent_copy"] is False


def test_a_killed_verifys_scratch_copy_is_removed_by_the_next(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Each verify holds a lock on its scratch directory (a store copy: as large as the store).
    One left by a verify that was killed (nobody holds its lock) is removed by the next verify
    and named; one in use, or not named as verify names them, is left alone."""
    import fcntl
    import os

    key = create_key_file(tmp_path / "kek.key")
    with mqstore.open(tmp_path / "store", key_file=key, background=False) as store:
        store.enqueue(mail_from="a@example.org", recipients=["b@example.net"], data=b"x")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    stale, busy = scratch / "mqstore-verify-replay-killed", scratch / "mqstore-verify-replay-running"
    foreign = scratch / "mqstore-verify-notes"  # not a name verify gives its directories
    for d in (stale, busy, foreign):
        d.mkdir()
        (d / "data.mdb").write_bytes(b"\0" * 4096)
    held = os.open(busy, os.O_RDONLY | os.O_DIRECTORY)  # as a running verify holds its directory
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        report = verify_path(tmp_path / "store", key_file=str(key), scratch_dir=scratch)
    finally:
        os.close(held)
    assert report.clean and report.replayed
    assert not stale.exists() and busy.exists() and foreign.exists()
    assert f"removed {stale}, left by a verify that was killed" in capsys.readouterr().err
    assert sorted(p.name for p in scratch.iterdir()) == sorted([busy.name, foreign.name])  # its own is gone too
