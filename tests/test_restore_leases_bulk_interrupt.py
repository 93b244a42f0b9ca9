"""Stop 31 review, backup/restore: restore's progress shows verify's record counts as records
(they were shown as bytes, "973 B/973 B"); restore says, as an ACTION NEEDED line and
``lease_tokens`` in ``--json``, that workers must drop the leases they held before it (the
restored store grants again the lease tokens the lost store granted after the backup); Ctrl-C in
a bulk change ends with the summary so far (exit 130, one JSON document). Run in this process on
embedded stores (cli.main)."""

from __future__ import annotations

import json
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import mqstore
from mqstore import cli
from mqstore.api import Store
from mqstore.crypto import create_key_file

RAW = b"From: a@example.org\r\nSubject: hi\r\n\r\nbody\r\n"


@pytest.fixture(autouse=True)
def _keep_sigpipe() -> Iterator[None]:
    handler = signal.getsignal(signal.SIGPIPE)
    yield
    signal.signal(signal.SIGPIPE, handler)


class _Terminal:
    """A stderr that says it is a terminal (so the progress bar is drawn) and keeps the text."""

    def __init__(self) -> None:
        self.text = ""

    def isatty(self) -> bool:
        return True

    def write(self, s: str) -> int:
        self.text += s
        return len(s)

    def flush(self) -> None:
        pass


def _backed_up(tmp_path: Path, n: int = 20) -> tuple[Path, Path, list[str]]:
    """An embedded store of ``n`` messages backed up: (backup file, KEK, ids)."""
    key = create_key_file(tmp_path / "kek.key")
    with mqstore.open(tmp_path / "store", key_file=key, background=False) as s:
        ids = s.enqueue_many([{"mail_from": "a@example.org", "recipients": [f"r{i}@x.example"], "data": RAW}
                              for i in range(n)])
    out = tmp_path / "b.mqbak"
    assert cli.main(["backup", "--data-dir", str(tmp_path / "store"), "--out", str(out), "--json"]) == 0
    return out, key, ids


def test_restore_shows_verifys_record_counts_as_records_not_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mqstore.ops import progress

    backup, key, _ = _backed_up(tmp_path)
    capsys.readouterr()
    terminal = _Terminal()
    monkeypatch.setattr(progress, "_REDRAW_S", 0.0)  # draw every update
    monkeypatch.setattr("sys.stderr", terminal)
    assert cli.main(["restore", "--in", str(backup), "--data-dir", str(tmp_path / "r"), "--key-file", str(key)]) == 0
    shown = [line.replace("\x1b[K", "") for line in re.split(r"[\r\n]", terminal.text) if "%" in line]
    restoring = [line for line in shown if line.startswith("restore")]
    verifying = [line for line in shown if line.startswith(("records:", "state:", "replay:"))]
    assert restoring and all(re.search(r"\d (B|KiB|MiB)/", line) for line in restoring), shown
    assert verifying, shown
    for line in verifying:  # "replay: [####...] 100.0% 20/20 0s", never "20 B/20 B"
        assert not re.search(r"\b(B|KiB|MiB)\b", line), line
        assert re.search(r"% [\d,]+/[\d,]+ \d+s$", line), line


def test_restore_says_workers_must_drop_the_leases_they_held(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A lease granted by the lost store after the backup has a token the restored store grants
    again, to another message: the reproducer's w1 acked X's token and settled Y's lease."""
    backup, key, _ = _backed_up(tmp_path, n=2)
    with mqstore.open(tmp_path / "store", key_file=key, background=False) as s:  # after the backup
        lost = s.lease(worker="w1", max_messages=1, lease_seconds=600)[0]
    capsys.readouterr()
    assert cli.main(["restore", "--in", str(backup), "--data-dir", str(tmp_path / "r"), "--key-file", str(key),
                     "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    applied = out["header"]["applied_index"]
    assert out["lease_tokens"]["reissued_above"] == applied
    assert "every worker must drop every lease it holds from before the restore" in out["lease_tokens"]["action"]
    assert "ANOTHER message's lease" in out["lease_tokens"]["action"]
    with mqstore.open(tmp_path / "r", key_file=key, background=False) as r:  # what it warns of, still true
        again = r.lease(worker="w2", max_messages=1, lease_seconds=600)[0]
        assert int(again.token) == int(lost.token) > applied
    assert cli.main(["restore", "--in", str(backup), "--data-dir", str(tmp_path / "r2"), "--key-file", str(key)]) == 0
    human = capsys.readouterr().out
    assert re.search(r"^ACTION NEEDED: lease tokens are log indices, and this store's log goes on after index "
                     rf"{applied}\b.*drop every lease it holds from before the restore", human, re.M), human


def _bulk(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any, str]:
    code = cli.main([*argv, "--json"])
    out, err = capsys.readouterr()
    return code, json.loads(out), err  # one document, or json.loads raises


@pytest.mark.parametrize("selection", ["ids", "filter"])
def test_ctrl_c_in_a_bulk_change_ends_with_the_summary_so_far(
    selection: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    key = create_key_file(tmp_path / "kek.key")
    path = tmp_path / "store"
    with mqstore.open(path, key_file=key, background=False) as s:
        ids = s.enqueue_many([{"mail_from": "a@example.org", "recipients": [f"r{i}@x.example"], "data": RAW}
                              for i in range(6)])
    target = ["--data-dir", str(path), "--key-file", str(key)]
    held: list[str] = []
    real_hold = Store.hold

    def hold(self: Store, message_id: str, **kw: Any) -> Any:
        if len(held) == 2:
            raise KeyboardInterrupt  # Ctrl-C while the third message's change is sent
        held.append(message_id)
        return real_hold(self, message_id, **kw)

    monkeypatch.setattr(Store, "hold", hold)
    chosen = [*ids] if selection == "ids" else ["--all"]
    code, out, _ = _bulk(capsys, "hold", *target, *chosen)
    assert code == 130, out
    assert out["error"] == "Interrupted" and out["message"] == "interrupted (Ctrl-C)", out
    assert out["changed"] == 2 and out["matched"] == 3, out
    assert out["uncertain"] is not None and out["uncertain"] not in held, out
    assert out["not_attempted"] == (3 if selection == "ids" else None), out

    held.clear()  # run again, as the human output says: the 2 held need no change, 2 more, Ctrl-C again
    code = cli.main(["hold", *target, *chosen])
    text, err = capsys.readouterr()
    assert code == 130
    assert "hold: changed 2 of 5 matching message(s), 2 needed no change" in text, text
    assert "STOPPED: Interrupted: interrupted (Ctrl-C)" in text, text
    assert "may or may not have been held" in text, text
    assert "mqstore: hold interrupted" in err, err
