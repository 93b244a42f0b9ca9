"""The backup file format (``mqstore.ops.backup``): what is written reads back byte for byte, and a
damaged file — any byte altered, cut short anywhere, bytes added — is refused with ``Corruption``,
never read as good data and never another exception. Frames are made small here so a file has
several of them."""

from __future__ import annotations

import io
import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mqstore.errors import Corruption
from mqstore.ops import backup

EXAMPLES = int(os.environ.get("MQSTORE_BACKUP_EXAMPLES", "300"))
FRAME = 4096
# Zero pages (as in an LMDB file, highly compressible), random bytes, and a partial last frame.
_NOISE = random.Random(20261206)
DATA = bytes(FRAME) + _NOISE.randbytes(FRAME) + b"mail " * 1000 + _NOISE.randbytes(1000)
HEADER = {"format": backup.FORMAT_VERSION, "data_bytes": len(DATA), "source": {"kind": "store"}}


@pytest.fixture(autouse=True)
def _small_frames(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backup, "FRAME_RAW_BYTES", FRAME)


def _file(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("backup") / "data.mdb"
    path.write_bytes(DATA)
    return b"".join(backup.backup_bytes(path, HEADER))


@pytest.fixture
def good(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return _file(tmp_path_factory)


def _read(raw: bytes) -> bytes:
    out = io.BytesIO()
    backup.read_backup(io.BytesIO(raw), out)
    return out.getvalue()


def test_a_backup_reads_back_byte_for_byte(good: bytes) -> None:
    seen: list[tuple[int, int]] = []
    out = io.BytesIO()
    header, trailer = backup.read_backup(io.BytesIO(good), out, progress=lambda done, total: seen.append((done, total)))
    assert out.getvalue() == DATA and header == HEADER
    assert trailer["frames"] == 4 and trailer["data_bytes"] == len(DATA)
    assert seen[-1] == (len(DATA), len(DATA)) and len(seen) == 4


_SLOW = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_SLOW
@given(data=st.data())
def test_any_altered_byte_is_refused(good: bytes, data: st.DataObject) -> None:
    at = data.draw(st.integers(0, len(good) - 1))
    xor = data.draw(st.integers(1, 255))
    damaged = bytearray(good)
    damaged[at] ^= xor
    with pytest.raises(Corruption):
        _read(bytes(damaged))


@_SLOW
@given(data=st.data())
def test_a_frame_length_altered_to_look_like_the_trailer_is_refused(good: bytes, data: st.DataObject) -> None:
    # The raw length of each data frame set to 0 (the trailer's marker), its CRC left as it was:
    # the frame's compressed bytes are then read as the trailer.
    offsets = []
    at = len(backup.MAGIC) + 8 + int.from_bytes(good[len(backup.MAGIC) : len(backup.MAGIC) + 4], "little")
    while True:
        raw_len, packed_len, _ = backup._FRAME.unpack_from(good, at)
        if raw_len == 0:
            break
        offsets.append(at)
        at += backup._FRAME.size + packed_len
    assert len(offsets) == 4
    damaged = bytearray(good)
    frame = data.draw(st.sampled_from(offsets))
    damaged[frame : frame + 4] = bytes(4)
    with pytest.raises(Corruption):
        _read(bytes(damaged))


@_SLOW
@given(data=st.data())
def test_a_file_cut_short_or_with_bytes_added_is_refused(good: bytes, data: st.DataObject) -> None:
    if data.draw(st.booleans()):
        damaged = good[: data.draw(st.integers(0, len(good) - 1))]
    else:
        damaged = good + data.draw(st.binary(min_size=1, max_size=64))
    with pytest.raises(Corruption):
        _read(damaged)
