"""Run a child process until it is ready, let it work a while, then kill it with SIGKILL.

Used by the crash tests: the child prints ``ready`` once it has set up, then one line per
acknowledged operation. A line the kill cut off has no newline and was never a complete
acknowledgement, so only complete lines are returned."""

from __future__ import annotations

import subprocess
import sys
import threading
import time


def run_and_kill(module: str, args: list[str], delay_s: float) -> list[str]:
    """Run ``python -m module *args``, SIGKILL it ``delay_s`` after it printed ``ready``, and
    return the complete lines it printed after ``ready`` (without their newlines).

    Raises ``AssertionError`` if the child never became ready or exited by itself."""
    proc = subprocess.Popen([sys.executable, "-m", module, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines: list[bytes] = []
    ready = threading.Event()

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line == b"ready\n":
                ready.set()
            lines.append(line)
        ready.set()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    if not ready.wait(60):
        proc.kill()
        proc.wait(30)
        raise AssertionError(f"{module} never became ready")
    time.sleep(delay_s)
    proc.kill()  # SIGKILL: no cleanup, no flush, no atexit
    proc.wait(30)
    t.join(30)
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    assert proc.returncode == -9, f"{module} exited by itself ({proc.returncode}): {stderr}"
    return [ln.decode().rstrip("\n") for ln in lines if ln.endswith(b"\n") and ln != b"ready\n"]


#: A child that runs ``mqstore.ops.backup.<function>(Path(argv[1]), Path(argv[2]), progress=...)``
#: and stops inside its write: its first progress call prints "writing" and waits for a line on
#: stdin (so a test kills or overtakes it at a point it chose, not by a timer).
_STOPPED_OPERATION = """
import sys
from pathlib import Path
from mqstore.ops import backup

said = []

def progress(done, total):
    if not said:
        said.append(1)
        print("writing", flush=True)
        sys.stdin.readline()

getattr(backup, sys.argv[3])(Path(sys.argv[1]), Path(sys.argv[2]), progress=progress)
print("finished", flush=True)
"""


def stopped_in_write(function: str, source: str, target: str) -> subprocess.Popen[str]:
    """Start ``mqstore.ops.backup.<function>(source, target)`` (``backup_local``, ``restore``) in
    a child process and return it once it stopped inside its write (see _STOPPED_OPERATION): a
    line on its stdin lets it go on."""
    child = subprocess.Popen([sys.executable, "-c", _STOPPED_OPERATION, source, target, function],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout is not None
    line = child.stdout.readline()
    if line != "writing\n":
        child.kill()
        child.wait(timeout=60)
        said = child.stderr.read() if child.stderr else ""
        raise AssertionError(f"the child did not stop in its write: {line!r} {said}")
    return child
