"""verify reads KEY records as the store writes them: the key event, then the request context."""

from __future__ import annotations

from pathlib import Path

import pytest

import mqstore
from mqstore.ops.verify import verify_path

pytestmark = pytest.mark.filterwarnings("ignore:mqstore created a key-encryption key")


def test_a_store_whose_keys_were_rotated_and_shredded_verifies_clean(tmp_path: Path) -> None:
    """Before, every KEY record written by rotate_key/shred_key (which carry who asked) was
    reported as "does not decode: malformed key event: trailing bytes": NOT CLEAN, exit 1."""
    with mqstore.open(tmp_path / "s", background=False) as store:
        store.enqueue(mail_from="a@example.org", recipients=["b@example.net"], data=b"hi", namespace="a")
        old = store.rotate_key("b")
        store.rotate_key("b")
        store.rotate_key("a")
        store.shred_key(old)
    report = verify_path(tmp_path / "s")
    assert report.clean, "\n".join(report.lines())
