"""Repairing damaged log records from a replica's copy (``mqstore.ops.repair``), without a cluster:
two stores that hold the same records stand for the damaged node and a healthy peer."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from mqstore.codec import RecordType, encode_record
from mqstore.crypto import create_key_file
from mqstore.errors import Corruption, InvalidArgument
from mqstore.ops.repair import READ_RECORDS_MAX, Fetch, find_damaged, repair_records, serve_records
from mqstore.store import LogStore, NewMessage
from mqstore.testing.mail import MailFactory


def _fill(store: LogStore) -> int:
    """20 blobs, then (after the namespace's KEY record) 3 messages; returns the first message's index."""
    store.append(RecordType.BLOB, [b"blob-%03d-" % i * 10 for i in range(1, 21)])
    mail = MailFactory(7)
    appended = store.append_messages([
        NewMessage(mail_from="a@example.org", recipients=["b@example.net"], data=mail.message(2048))
        for _ in range(3)
    ])
    return appended[0].index


def _flip(path: Path, needle: bytes, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    pos = raw.find(needle)
    assert pos >= 0, "the record's bytes are not in the file"
    raw[pos + offset] ^= 0x40
    path.write_bytes(bytes(raw))


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[LogStore, LogStore, int]]:
    """(damaged store, healthy copy of it, index of a damaged message record); the blob at index
    5 is damaged too."""
    key = create_key_file(tmp_path / "kek.key")
    with LogStore(tmp_path / "damaged", key_file=key) as s:
        first_message = _fill(s)
        message_header = encode_record(*s.read(first_message + 1))[:36]
    shutil.copytree(tmp_path / "damaged", tmp_path / "healthy")
    _flip(tmp_path / "damaged" / "data.mdb", b"blob-005-", 3)
    _flip(tmp_path / "damaged" / "data.mdb", message_header, 50)  # inside the sealed payload
    damaged = LogStore(tmp_path / "damaged", key_file=key)
    healthy = LogStore(tmp_path / "healthy", key_file=key)
    try:
        yield damaged, healthy, first_message + 1
    finally:
        damaged.close()
        healthy.close()


def _fetch_from(peer: LogStore, name: str = "node 2") -> Fetch:
    def fetch(indices: list[int]) -> tuple[dict[int, tuple[bytes, str]], list[str]]:
        found, notes = {}, []
        for index, raw, why in serve_records(peer, indices, peer.last_index):
            if raw:
                found[index] = (raw, name)
            else:
                notes.append(f"{name}: {why}")
        return found, notes

    return fetch


def test_damaged_records_are_found_by_scan_and_by_index(pair: tuple[LogStore, LogStore, int]) -> None:
    damaged, _, message = pair
    assert sorted(find_damaged(damaged, [], scan=True)) == [5, message]
    # Without a scan only the named indices (and those quarantined earlier) are checked; an
    # index outside the log is not damage.
    found = find_damaged(damaged, [5, 10_000], scan=False)
    assert list(found) == [5, message]  # the scan above quarantined the message record
    assert "checksum mismatch" in found[5]


def test_a_dry_run_names_what_it_would_repair_and_changes_nothing(pair: tuple[LogStore, LogStore, int]) -> None:
    damaged, healthy, message = pair
    report = repair_records(damaged, find_damaged(damaged, [], scan=True), _fetch_from(healthy), dry_run=True)
    assert report["dry_run"] and report["would_repair"] == 2 and report["repaired"] == 0
    assert [(r["index"], r["status"], r["source"]) for r in report["records"]] == [
        (5, "would repair", "node 2"), (message, "would repair", "node 2")]
    with pytest.raises(Corruption, match="log index 5"):
        damaged.read(5)


def test_good_copies_are_written_back_and_the_log_reads_clean(pair: tuple[LogStore, LogStore, int]) -> None:
    damaged, healthy, message = pair
    report = repair_records(damaged, find_damaged(damaged, [], scan=True), _fetch_from(healthy), dry_run=False)
    assert report["repaired"] == 2 and report["unresolved"] == []
    assert damaged.read(5).payload == b"blob-005-" * 10
    assert damaged.read_message(message).data == healthy.read_message(message).data
    assert damaged.scan().clean
    assert damaged.quarantined() == {}
    assert find_damaged(damaged, [5, message], scan=False) == {}


def test_a_copy_that_is_damaged_too_is_not_written(pair: tuple[LogStore, LogStore, int]) -> None:
    damaged, healthy, _ = pair

    def fetch_bad(indices: list[int]) -> tuple[dict[int, tuple[bytes, str]], list[str]]:
        good, notes = _fetch_from(healthy)(indices)
        spoiled = {i: (raw[:-1] + bytes([raw[-1] ^ 1]), src) for i, (raw, src) in good.items()}
        return spoiled, notes

    report = repair_records(damaged, {5: "checksum mismatch"}, fetch_bad, dry_run=False)
    assert report["repaired"] == 0 and report["unresolved"] == [5]
    (item,) = report["records"]
    assert item["status"] == "unavailable" and item["problem"].startswith("the copy is damaged too")
    with pytest.raises(Corruption):
        damaged.read(5)


def test_a_copy_sealed_under_another_key_is_not_written(pair: tuple[LogStore, LogStore, int], tmp_path: Path) -> None:
    damaged, _, message = pair
    # Another store with the same layout but its own key: its record at that index is intact
    # (CRC and index check out) but does not open with the damaged store's key.
    with LogStore(tmp_path / "stranger", key_file=create_key_file(tmp_path / "other.key")) as stranger:
        assert _fill(stranger) + 1 == message
        report = repair_records(damaged, {message: "checksum mismatch"}, _fetch_from(stranger, "node 9"),
                                dry_run=False)
    (item,) = report["records"]
    assert item["status"] == "unavailable" and item["source"] == "node 9"
    assert item["problem"].startswith("the copy does not open with this store's key")
    with pytest.raises(Corruption):
        damaged.read_message(message)


def test_no_copy_anywhere_leaves_the_record_unresolved(pair: tuple[LogStore, LogStore, int]) -> None:
    damaged = pair[0]
    peer_damaged_too = _fetch_from(damaged, "node 1")  # a peer whose copy is damaged as well
    report = repair_records(damaged, {5: "checksum mismatch"}, peer_damaged_too, dry_run=False)
    assert report["unresolved"] == [5]
    assert report["records"][0]["problem"] == "no reachable replica has this index committed"
    assert any("damaged here too" in note for note in report["notes"])


def test_what_a_peer_serves_and_refuses(pair: tuple[LogStore, LogStore, int]) -> None:
    _, healthy, message = pair
    answers = {i: (raw, why) for i, raw, why in serve_records(healthy, [1, message, message + 2], commit_index=message)}
    assert answers[1][0] and answers[message][0] and answers[1][1] == ""
    assert answers[message + 2] == (b"", f"index {message + 2} is not committed here (commit index {message})")
    healthy.delete_prefix(10)
    (answer,) = serve_records(healthy, [3], commit_index=healthy.last_index)
    assert answer == (3, b"", "index 3 is not in this node's log (compacted)")
    with pytest.raises(InvalidArgument, match=f"at most {READ_RECORDS_MAX} indices"):
        serve_records(healthy, list(range(1, READ_RECORDS_MAX + 2)), healthy.last_index)
