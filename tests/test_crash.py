"""Crash safety, proven by kill -9: a writer process is killed at random moments; every record it
acknowledged must be present and intact after reopening, and no torn record may be visible.

``MQSTORE_CRASH_KILLS`` sets the number of kills (default 30); ``MQSTORE_CRASH_SEED`` the seed.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from mqstore.crypto import create_key_file
from mqstore.store import LogStore
from mqstore.testing.crash_writer import expected_message, expected_payload
from mqstore.testing.kill import run_and_kill

KILLS = int(os.environ.get("MQSTORE_CRASH_KILLS", "30"))
_READ_BACK_ALL_MAX = 20_000  # up to this many acknowledged records, every cycle reads all back
SEED = int(os.environ.get("MQSTORE_CRASH_SEED", "20261128"))


# Per cycle the store is scanned whole and the records acknowledged so far are read back: the
# work grows with the log, so a soak (MQSTORE_CRASH_KILLS=500) gets time in proportion.
@pytest.mark.timeout(max(600, KILLS * 20))
def test_kill9_never_loses_an_acknowledged_record(tmp_path: Path) -> None:
    path = tmp_path / "store"
    key = create_key_file(f"{path}.key")
    rng = random.Random(SEED)
    acked: dict[int, tuple[str, int, int]] = {}
    for cycle in range(KILLS):
        new: list[int] = []
        for line in run_and_kill("mqstore.testing.crash_writer", [str(path), str(cycle)], rng.uniform(0.01, 0.35)):
            _, index, kind, thread, seq = line.split()
            entry = (kind, int(thread), int(seq))
            # Every acknowledgement names a distinct index: a crash never reuses one.
            assert acked.setdefault(int(index), entry) == entry, f"index {index} acknowledged twice"
            new.append(int(index))
        with LogStore(path, key_file=key) as store:
            report = store.scan()
            assert report.clean, f"cycle {cycle}: torn or corrupt records after kill -9: {report.corrupt}"
            assert max(acked, default=0) <= store.last_index
            # Contents: everything acknowledged on the first and last cycles; in between, what
            # this cycle acknowledged and a sample of the older ones (the scan checked every CRC).
            if cycle in (0, KILLS - 1) or len(acked) <= _READ_BACK_ALL_MAX:
                check = list(acked.items())
            else:
                check = [(i, acked[i]) for i in new] + rng.sample(sorted(acked.items()), _READ_BACK_ALL_MAX)
            for index, (kind, thread, seq) in check:
                if kind == "blob":
                    assert store.read(index).payload == expected_payload(thread, seq), f"index {index}"
                else:
                    want = expected_message(thread, seq)
                    got = store.read_message(index)
                    assert got.data == want.data, f"index {index}"
                    assert got.envelope.recipients == tuple(want.recipients)
                    assert got.envelope.namespace == want.namespace
    # The test only proves something if the writer got work acknowledged before most kills.
    assert len(acked) >= KILLS, f"only {len(acked)} acknowledgements in {KILLS} kills"
