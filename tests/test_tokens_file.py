"""The tokens file decides who may call a node: other users must not be able to change it, and
what an operator does to it (remove a token, remove the file) takes effect on a running node."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from mqstore.errors import InvalidArgument
from mqstore.security import tokens as tokens_module
from mqstore.security.tokens import TokenStore


@pytest.fixture(autouse=True)
def _reload_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokens_module, "_RELOAD_CHECK_S", 0.0)


def test_a_tokens_file_other_users_can_write_is_refused(tmp_path: Path) -> None:
    """The salt is in the file: whoever can write it can add a digest of a token of their own
    choosing, with every role. Before, a 0666 file was accepted at start and reloaded live."""
    path = tmp_path / "tokens.json"
    store = TokenStore(path, create=True)
    ops = store.add("ops", ["admin"])
    assert store.lookup(ops) is not None
    for mode, said in ((0o666, "accessible to every user"), (0o620, "writable by its group")):
        os.chmod(path, mode)
        with pytest.raises(InvalidArgument, match=said):
            TokenStore(path)
        assert store.lookup(ops) is None  # the running store trusts no token of it ...
        os.chmod(path, 0o600)  # ... until it is fixed (a chmod alone: the content is the same)
        assert store.lookup(ops) is not None
    os.chmod(path, 0o640)  # group read stays allowed (a service group), as for key files
    assert TokenStore(path).lookup(ops) is not None


def test_removing_the_tokens_file_revokes_every_token(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    store = TokenStore(path, create=True)
    ops = store.add("ops", ["admin"])
    path.unlink()
    assert store.lookup(ops) is None  # before: still accepted for as long as the node ran


def test_a_tokens_file_edited_into_invalid_json_is_said_in_the_log(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A half-edited file must not lock everyone out, so the tokens read last stay valid; but
    it is said, with how to check the file (before: silently)."""
    path = tmp_path / "tokens.json"
    store = TokenStore(path, create=True)
    ops = store.add("ops", ["admin"])
    body = json.loads(path.read_text())
    path.write_text(json.dumps(body)[:-5])
    with caplog.at_level(logging.ERROR, logger="mqstore.security.tokens"):
        assert store.lookup(ops) is not None
    assert f"tokens file {path} cannot be read" in caplog.text
    assert "the tokens read before stay valid" in caplog.text
