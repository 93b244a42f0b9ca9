"""A child process for crash tests: appends to a store and reports every acknowledged write.

Run as ``python -m mqstore.testing.crash_writer DIR SEED``. Several threads append (single
records, single messages, batches of messages) as fast as they can; after each durable append the
child prints one line per acknowledged record to stdout, flushed at once::

    ack <index> <kind> <thread> <sequence>

The parent kills the child with SIGKILL at a random moment, reopens the store and checks that
every acknowledged record is present and intact (:func:`expected_payload` and
:func:`expected_message` rebuild what each one must contain).
"""

from __future__ import annotations

import hashlib
import sys
import threading

from mqstore.codec import RecordType
from mqstore.store import LogStore, NewMessage

KINDS = ("blob", "msg", "batch")


def expected_payload(thread: int, seq: int) -> bytes:
    """The BLOB payload thread ``thread`` appended as its ``seq``-th record."""
    seed = hashlib.sha256(f"blob {thread} {seq}".encode()).digest()
    return seed * (1 + (seed[0] % 40))


def expected_message(thread: int, seq: int) -> NewMessage:
    """The message thread ``thread`` appended as its ``seq``-th message."""
    seed = hashlib.sha256(f"msg {thread} {seq}".encode()).hexdigest()
    body = (f"Subject: crash test {thread}/{seq}\r\n\r\n" + seed * (4 + int(seed[:2], 16) % 60)).encode()
    return NewMessage(
        mail_from=f"sender{thread}@example.org",
        recipients=[f"r{seq}@example.net", f"t{thread}@example.com"],
        data=body,
        namespace=f"ns{thread % 2}",
        priority=seq % 5,
    )


def main(argv: list[str]) -> int:
    path, seed = argv[0], int(argv[1])
    store = LogStore(path, key_file=f"{path}.key")
    out_lock = threading.Lock()

    def report(lines: list[str]) -> None:
        with out_lock:
            sys.stdout.write("".join(lines))
            sys.stdout.flush()

    def worker(thread: int) -> None:
        seq = 0
        kind = KINDS[(thread + seed) % len(KINDS)]
        while True:
            if kind == "blob":
                (index,) = store.append(RecordType.BLOB, [expected_payload(thread, seq)])
                report([f"ack {index} blob {thread} {seq}\n"])
                seq += 1
            elif kind == "msg":
                appended = store.append_messages([expected_message(thread, seq)])
                report([f"ack {appended[0].index} msg {thread} {seq}\n"])
                seq += 1
            else:
                n = 1 + (seq % 17)
                appended = store.append_messages([expected_message(thread, seq + i) for i in range(n)])
                report([f"ack {a.index} msg {thread} {seq + i}\n" for i, a in enumerate(appended)])
                seq += n

    threads = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(6)]
    # Keys are created before the threads start so the first lines arrive quickly.
    store.ensure_keys(["ns0", "ns1"])
    report(["ready\n"])
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
