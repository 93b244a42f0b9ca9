"""A process opening the store read-only while its writer swaps the database (a key shred's
scrub, a snapshot install: Environment.replace_data).

LMDB opens ``data.mdb``, then ``lock.mdb``, then locks byte 0 of it; only an opener that gets that
lock exclusively sets the lock table up (from the data file it opened). Before, the swap unlinked
``lock.mdb`` and let go of its lock before the writer reopened: a reader that had opened the old
``lock.mdb`` and locked it just after took it exclusively and kept a lock table of its own on the
deleted file, unseen by the writer (``in_use_elsewhere()`` said nobody had the store open, later
swaps went on under it) and never seeing its writes; a reader that opened the old ``lock.mdb``
before a forced swap joined the old table after it. Now an open checks that both files are still
the ones at their paths once LMDB has them, and opens again if not; an alone swap keeps
``lock.mdb`` and its lock until the writer's reopen has set the table up from the new file.

The races are made deterministic: the writer's wait for the exclusive lock (``_lock_alone``) is
where the reader is started, and held at the right point of its open — blocked on the lock
(/proc/locks shows it waiting), or, in one test, delayed between LMDB's open() of ``lock.mdb`` and
its fcntl() by a small LD_PRELOAD shim (compiled here; skipped without a C compiler)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from mqstore.crypto import create_key_file
from mqstore.store import LogStore, NewMessage
from mqstore.store import env as env_mod

pytestmark = [
    pytest.mark.filterwarnings("ignore:mqstore created a key-encryption key"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/locks, fcntl lock semantics of Linux"),
]

_READER = textwrap.dedent("""
    import sys
    from mqstore.store import LogStore
    log = LogStore(sys.argv[1], key_file=sys.argv[2], readonly=True, create=False)
    def n():
        with log.env.read() as txn:
            return txn.stat(log.env.dbs[b"log"])["entries"]
    print("open", n(), flush=True)
    for line in sys.stdin:
        if not line.strip():
            break
        print("now", n(), flush=True)
    log.close()
""")

_HOLDER = textwrap.dedent("""
    import fcntl, os, sys
    fd = os.open(sys.argv[1], os.O_RDWR)
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0, os.SEEK_SET)
    print("locked", flush=True)
    sys.stdin.readline()
""")

_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
static int done;
static void maybe_delay(int fd, int cmd) {
    if (cmd != F_SETLK || done || !getenv("DELAY_LOCK_MS")) return;
    char p[64], t[4096];
    snprintf(p, sizeof p, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(p, t, sizeof t - 1);
    if (n > 0) { t[n] = 0; if (strstr(t, "lock.mdb")) { done = 1; fprintf(stderr, "[shim] delaying\n");
        fflush(stderr); usleep(atoi(getenv("DELAY_LOCK_MS")) * 1000); } }
}
int fcntl(int fd, int cmd, ...) {
    va_list ap; va_start(ap, cmd); void *arg = va_arg(ap, void *); va_end(ap);
    static int (*real)(int, int, ...);
    if (!real) real = dlsym(RTLD_NEXT, "fcntl");
    maybe_delay(fd, cmd);
    return real(fd, cmd, arg);
}
int fcntl64(int fd, int cmd, ...) {
    va_list ap; va_start(ap, cmd); void *arg = va_arg(ap, void *); va_end(ap);
    static int (*real)(int, int, ...);
    if (!real) real = dlsym(RTLD_NEXT, "fcntl64");
    maybe_delay(fd, cmd);
    return real(fd, cmd, arg);
}
"""


def _messages(n: int, body: bytes) -> list[NewMessage]:
    return [NewMessage("a@example.org", ["b@example.net"], body) for _ in range(n)]


def _entries(log: LogStore) -> int:
    with log.env.read() as txn:
        return int(txn.stat(log.env.dbs[b"log"])["entries"])


def _spawn(script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", script, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _line(child: subprocess.Popen[str], prefix: str) -> str:
    assert child.stdout is not None
    line = child.stdout.readline()
    if not line.startswith(prefix):
        child.kill()
        raise AssertionError(f"expected {prefix!r}, got {line!r}; stderr: {child.communicate(timeout=30)[1]}")
    return line


def _ask(reader: subprocess.Popen[str]) -> int:
    assert reader.stdin is not None
    reader.stdin.write("again\n")
    reader.stdin.flush()
    return int(_line(reader, "now ").split()[1])


def _wait_blocked_on_a_lock(pid: int, timeout: float = 30.0) -> None:
    """Until process ``pid`` waits for an fcntl lock (a "->" line of /proc/locks)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if "->" in fields and str(pid) in fields:
                return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} never waited for a lock")


@contextmanager
def _children() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    try:
        yield started
    finally:
        for child in started:
            if child.poll() is None:
                if child.stdin is not None:
                    with contextlib.suppress(OSError):
                        child.stdin.close()
                try:
                    child.wait(10)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait(10)


def _store(tmp_path: Path) -> tuple[LogStore, Path, Path]:
    key = create_key_file(tmp_path / "k.key")
    path = tmp_path / "s"
    log = LogStore(path, key_file=str(key))
    log.append_messages(_messages(100, b"x" * 100))
    return log, path, key


def _check_shared(log: LogStore, reader: subprocess.Popen[str]) -> None:
    """The reader shares the writer's lock table on the new file: the writer sees it, and it
    sees what the writer commits."""
    assert int(_line(reader, "open ").split()[1]) == _entries(log)
    assert log.env.in_use_elsewhere() == f"process {reader.pid}"
    log.append_messages(_messages(200, b"y" * 100))
    assert _ask(reader) == _entries(log)


def _compile_shim(tmp_path: Path) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler for the LD_PRELOAD shim")
    (tmp_path / "shim.c").write_text(_SHIM)
    so = tmp_path / "shim.so"
    done = subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(so), str(tmp_path / "shim.c"), "-ldl"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot build the LD_PRELOAD shim: {done.stderr.strip()}")
    return so


def test_a_reader_that_opened_lock_mdb_before_a_scrub_and_locks_after_it_joins_the_new_table(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The finding: the reader has opened data.mdb and lock.mdb when the scrub's rewrite takes
    the exclusive lock, and calls fcntl() only once the swap is done. Before: it got the lock on
    the unlinked lock.mdb exclusively and set up a table of its own — the writer said nobody had
    the store open, and the reader never saw the writer's commits."""
    so = _compile_shim(tmp_path)
    log, path, key = _store(tmp_path)
    real_lock_alone = env_mod._lock_alone
    with _children() as children:
        def reader_in_the_window(fd: int, wait_s: float) -> bool:
            env = dict(os.environ, LD_PRELOAD=str(so), DELAY_LOCK_MS="1500")
            reader = _spawn(_READER, str(path), str(key), env=env)
            children.append(reader)
            assert reader.stderr is not None
            while "[shim] delaying" not in (line := reader.stderr.readline()):  # LMDB opened lock.mdb
                assert line, "the reader ended before it locked lock.mdb"
            return real_lock_alone(fd, wait_s)

        monkeypatch.setattr(env_mod, "_lock_alone", reader_in_the_window)
        try:
            log.rewrite_compacted(tmp_path / "scratch", wait_s=0.5)  # alone: the reader has no lock yet
            monkeypatch.setattr(env_mod, "_lock_alone", real_lock_alone)
            reader = children[0]
            _check_shared(log, reader)
            # the next swap waits for it (before: it went on under the reader)
            with pytest.raises(env_mod.StoreInUse, match=f"process {reader.pid}"):
                log.rewrite_compacted(tmp_path / "scratch2", wait_s=0.2)
        finally:
            log.close()


def test_a_reader_that_opened_the_old_data_file_before_an_alone_swap_opens_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reader opened the old data.mdb and waits for the lock while the writer swaps: the
    writer's reopen sets the table up from the NEW file before the reader gets the lock; the
    reader sees that data.mdb is not the file it has open, and opens again."""
    log, path, key = _store(tmp_path)
    real_lock_alone = env_mod._lock_alone
    with _children() as children:
        def reader_waiting_for_the_lock(fd: int, wait_s: float) -> bool:
            alone = real_lock_alone(fd, wait_s)
            reader = _spawn(_READER, str(path), str(key))
            children.append(reader)
            _wait_blocked_on_a_lock(reader.pid)  # it has both files open, and waits for the writer
            return alone

        monkeypatch.setattr(env_mod, "_lock_alone", reader_waiting_for_the_lock)
        try:
            log.rewrite_compacted(tmp_path / "scratch", wait_s=0.5)
            monkeypatch.setattr(env_mod, "_lock_alone", real_lock_alone)
            reader = children[0]
            _check_shared(log, reader)
        finally:
            log.close()


def test_a_reader_that_opened_lock_mdb_before_a_forced_swap_opens_again_on_the_new_table(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A snapshot install (forced) while another process holds the lock and a reader waits for it
    on the old lock.mdb. Before: once let in, the reader joined the OLD table, unseen by the
    writer, and never saw its commits."""
    log, path, key = _store(tmp_path)
    copy = log.copy_to(tmp_path / "copy")
    real_lock_alone = env_mod._lock_alone
    with _children() as children:
        def holder_and_reader(fd: int, wait_s: float) -> bool:
            holder = _spawn(_HOLDER, str(path / "lock.mdb"))
            children.append(holder)
            _line(holder, "locked")
            reader = _spawn(_READER, str(path), str(key))
            children.append(reader)
            _wait_blocked_on_a_lock(reader.pid)
            return real_lock_alone(fd, wait_s)  # the holder has it: not alone

        monkeypatch.setattr(env_mod, "_lock_alone", holder_and_reader)
        try:
            log.replace_data(copy, wait_s=0.2)  # force, the default (a snapshot install)
            monkeypatch.setattr(env_mod, "_lock_alone", real_lock_alone)
            holder, reader = children
            assert holder.stdin is not None
            holder.stdin.write("\n")
            holder.stdin.flush()
            holder.wait(30)  # its lock on the old lock.mdb goes: the reader goes on
            _check_shared(log, reader)
        finally:
            log.close()


def test_after_a_forced_swap_beside_a_reader_a_new_reader_joins_the_writers_table(tmp_path: Path) -> None:
    """A reader open during a forced swap keeps its old view; one opening afterwards shares the
    writer's new table (and the writer sees it, not the old one)."""
    log, path, key = _store(tmp_path)
    with _children() as children:
        try:
            old = _spawn(_READER, str(path), str(key))
            children.append(old)
            before = int(_line(old, "open ").split()[1])
            assert before == _entries(log)
            log.replace_data(log.copy_to(tmp_path / "copy"), wait_s=0.1)
            assert log.env.in_use_elsewhere() is None  # the old reader is on the old table
            new = _spawn(_READER, str(path), str(key))
            children.append(new)
            _check_shared(log, new)
            assert _ask(old) == before  # the old reader: its old file, whole
            assert not (path / "lock.mdb.new").exists()
        finally:
            log.close()
