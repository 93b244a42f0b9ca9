"""A child process for queue crash tests: producers enqueue and workers lease, ack, defer and
bounce (and sometimes let leases expire) as fast as they can, reporting every acknowledged
operation on stdout, one line each, flushed at once::

    enq <message id> <recipient count>
    lease <token> <message id> <address,address,...>
    ack|defer|bounce <token> <message id> <address,address,...>

Run as ``python -m mqstore.testing.crash_queue DIR KEYFILE SEED``; the parent kills it with
SIGKILL and checks the reopened store against what was acknowledged.
"""

from __future__ import annotations

import random
import sys
import threading

import mqstore


def main(argv: list[str]) -> int:
    path, key_file, seed = argv[0], argv[1], int(argv[2])
    store = mqstore.open(path, key_file=key_file, background=False)
    store.set_namespace_policy("default", backoff=[0.05])
    out_lock = threading.Lock()

    def report(line: str) -> None:
        with out_lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def producer(n: int) -> None:
        rng = random.Random(seed * 100 + n)
        k = 0
        while True:
            batch: list[dict[str, object]] = []
            counts: list[int] = []
            for _ in range(rng.randint(1, 5)):
                k += 1
                rcpts = [f"u{n}-{k}-{j}@d{rng.randint(0, 3)}.example" for j in range(rng.randint(1, 3))]
                counts.append(len(rcpts))
                batch.append({"mail_from": f"p{n}@example.org", "recipients": rcpts,
                              "data": f"Subject: {n}/{k}\r\n\r\n".encode() + rng.randbytes(rng.randint(10, 3000)),
                              "priority": rng.randint(-1, 1)})
            ids = store.enqueue_many(batch)
            for mid, count in zip(ids, counts, strict=True):
                report(f"enq {mid} {count}")

    def worker(n: int) -> None:
        rng = random.Random(seed * 1000 + n)
        while True:
            leases = store.lease(f"w{n}", max_messages=3, lease_seconds=rng.uniform(0.2, 2.0))
            for lease in leases:
                report(f"lease {lease.token} {lease.message_id} {','.join(lease.recipients)}")
            for lease in leases:
                choice = rng.random()
                try:
                    if choice < 0.5:
                        store.ack(lease.token)
                        report(f"ack {lease.token} {lease.message_id} {','.join(lease.recipients)}")
                    elif choice < 0.7 and len(lease.recipients) > 1:
                        first, rest = lease.recipients[:1], lease.recipients[1:]
                        store.ack(lease.token, recipients=first)
                        report(f"ack {lease.token} {lease.message_id} {','.join(first)}")
                        store.defer(lease.token, recipients=rest, reason="451 4.7.1 later")
                        report(f"defer {lease.token} {lease.message_id} {','.join(rest)}")
                    elif choice < 0.8:
                        store.bounce(lease.token, reason="550 5.1.1 unknown")
                        report(f"bounce {lease.token} {lease.message_id} {','.join(lease.recipients)}")
                    elif choice < 0.9:
                        store.defer(lease.token, reason="451 try again")
                        report(f"defer {lease.token} {lease.message_id} {','.join(lease.recipients)}")
                    # else: abandon the lease and let it expire
                except mqstore.StaleLease:
                    pass  # it expired before we settled: that is allowed, and reported by nothing

    threads = [threading.Thread(target=producer, args=(i,), daemon=True) for i in range(2)]
    threads += [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(3)]
    report("ready")
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
