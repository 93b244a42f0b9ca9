"""The ``mqstore`` command, fuzzed: every subcommand (walked from the real argument parser, so a new
one is fuzzed too) run with random choices of its options and positionals, each given a valid or
a wrong value (paths that are missing, a file where a directory belongs, ids that do not exist,
negative, huge, NaN and non-numeric numbers, empty and over-long text), against a real embedded
store. The command must end with exit code 0, 1 or 2 and say why on error — as JSON with
``--json`` — and never escape with a traceback.

Left out: ``serve`` (it runs until stopped) and ``--server`` (calls to a cluster that is not
there would wait out their retries; the cluster paths have their own tests).
``MQSTORE_FUZZ_EXAMPLES`` sets the number of commands (default 300).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mqstore
from mqstore import cli
from mqstore.crypto import create_key_file

RAW = b"From: a@example.org\r\nSubject: fuzz\r\n\r\nbody\r\n"
SKIPPED_COMMANDS = {("serve",)}
SKIPPED_OPTIONS = {"--server", "-h", "--help", "--version"}
#: Options whose value sets how much work a command does: only small values.
SMALL = {"--messages": ["0", "-1", "3", "abc", "1e3"]}


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [(path, parser)]
    out = []
    for name, child in subs[0].choices.items():
        out += _commands(child, (*path, name))
    return out


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("cli-fuzz")
    key = create_key_file(root / "kek.key")
    data = root / "spool"
    with mqstore.open(data, key_file=key) as store:
        ids = store.enqueue_many([{"mail_from": "a@example.org", "recipients": [f"r{i}@d{i % 3}.example"],
                                   "data": RAW} for i in range(12)])
        for lease in store.lease("w", max_messages=3):
            store.defer(lease.token, reason="451 4.7.1 later")
        store.hold(ids[5])
    (root / "a-file").write_text("not a directory\n")
    (root / "bad.toml").write_text("node_id = 'x'\n")
    return {"root": root, "data": str(data), "key": str(key), "ids": ids}


def test_fuzzed_commands_exit_cleanly(shop: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root: Path = shop["root"]
    # Relative paths (a value such as "1h" given to --out or --dir) and the default data dir
    # land in a scratch directory, not wherever the tests run.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MQSTORE_DATA_DIR", str(tmp_path / "default-data"))
    paths = [shop["data"], shop["key"], str(root / "missing" / "x"), str(root / "a-file"), str(root / "out"),
             str(root / "bad.toml"), str(root)]
    texts = ["", "default", "x@example.org", "d0.example", "a" * 300, "compliance", "governance", "none",
             "1h", "5m", "-3d", "2026-01-01T00:00:00Z", "queued", "deferred", "held", "producer", "../x", "é"]
    numbers = ["0", "-1", "1", "2", "1e309", "nan", "abc", "99999999999999999999", "0.5"]
    ids = [*shop["ids"][:4], "0" * 26, "zz", shop["ids"][0].lower()]
    pool = st.sampled_from(paths + texts + numbers + ids)
    commands = [(p, sp) for p, sp in _commands(cli.build_parser()) if p not in SKIPPED_COMMANDS]
    assert len(commands) >= 40, [p for p, _ in commands]

    @st.composite
    def argv(draw: st.DrawFn) -> list[str]:
        path, parser = draw(st.sampled_from(commands))
        out = list(path)
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if not action.option_strings:  # positional: usually given, sometimes missing
                if draw(st.integers(0, 9)) > 0:
                    count = 1 if action.nargs in (None, 1, "?") else draw(st.integers(1, 3))
                    out += [draw(pool) for _ in range(count)]
                continue
            flag = action.option_strings[-1]
            if flag in SKIPPED_OPTIONS:
                continue
            # Mostly the real store and key, so commands get past opening it.
            real = {"--data-dir": shop["data"], "--key-file": shop["key"]}.get(flag)
            if real is not None and draw(st.integers(0, 9)) < 7:
                out += [flag, real]
                continue
            if draw(st.integers(0, 2)) != 0:
                continue
            out.append(flag)
            if action.nargs == 0:
                continue
            if flag in SMALL:
                out.append(draw(st.sampled_from(SMALL[flag])))
            elif flag in ("--data-dir", "--dir", "--file", "--out", "--in", "--config") and draw(st.booleans()):
                out.append(draw(st.sampled_from(paths)))
            else:
                out.append(draw(pool))
        return out

    outcomes: dict[str, set[int]] = {}

    @settings(max_examples=int(os.environ.get("MQSTORE_FUZZ_EXAMPLES", "300")), deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(argv())
    def one(args: list[str]) -> None:
        stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
        stderr = io.StringIO()
        handler = signal.getsignal(signal.SIGPIPE)
        old_stdin = sys.stdin
        sys.stdin = io.StringIO("")  # a command reading ids from "-" reads nothing
        try:
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                try:
                    code = cli.main(args)
                except SystemExit as exc:  # argparse refusing the arguments (2), or --help (0)
                    code = exc.code if isinstance(exc.code, int) else 2
        finally:
            sys.stdin = old_stdin
            signal.signal(signal.SIGPIPE, handler)
        stdout.flush()
        text = stdout.buffer.getvalue().decode("utf-8", "replace")
        outcomes.setdefault(" ".join(a for a in args[:2] if not a.startswith("-")), set()).add(code)
        assert code in (0, 1, 2), f"mqstore {args} -> {code}\n{text}\n{stderr.getvalue()}"
        assert "Traceback" not in stderr.getvalue(), f"mqstore {args}\n{stderr.getvalue()}"
        if code == 2 and "--json" in args and text.strip():
            err = json.loads(text.strip().splitlines()[-1])
            assert err["error"] and err["message"], (args, text)
        elif code == 2:
            assert stderr.getvalue().strip(), f"mqstore {args} failed without saying why"

    one()
    print({k: sorted(v) for k, v in sorted(outcomes.items())})


#: Commands the fuzzer found escaping with a traceback (kept as regressions): paths that cannot be
#: written, NaN and infinite times, and an error in the middle of a streamed --all listing.
FOUND = [
    ["certs", "init", "--dir", "{root}/a-file", "--force", "--json"],
    ["audit", "export-checkpoint", "--data-dir", "{data}", "--key-file", "{key}", "--json", "--out",
     "{root}/missing/x"],
    ["audit", "export-checkpoint", "--data-dir", "{data}", "--key-file", "{key}", "--json", "--out", "{data}",
     "--force"],
    ["verify", "--data-dir", "{data}", "--key-file", "{key}", "--json", "--scratch", "{key}"],
    ["queue", "list", "--data-dir", "{data}", "--key-file", "{key}", "--json", "--newer-than", "nan"],
    ["audit", "query", "--data-dir", "{data}", "--key-file", "{key}", "--json", "--until", "1e309"],
    ["queue", "list", "--data-dir", "{data}", "--key-file", "{key}", "--json", "--all", "--id-prefix", "/x"],
]


@pytest.mark.parametrize("template", FOUND, ids=[" ".join(t[:2]) + f"-{i}" for i, t in enumerate(FOUND)])
def test_commands_the_fuzzer_found_fail_cleanly(shop: dict[str, Any], template: list[str], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = [a.format(root=shop["root"], data=shop["data"], key=shop["key"]) for a in template]
    stdout, stderr = io.StringIO(), io.StringIO()
    handler = signal.getsignal(signal.SIGPIPE)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                code = cli.main(args)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 2
    finally:
        signal.signal(signal.SIGPIPE, handler)
    assert code == 2, (args, stdout.getvalue(), stderr.getvalue())
    text = stdout.getvalue().strip()
    if text:  # --json: one valid document naming the error
        doc = json.loads(text)
        assert doc["error"] and doc["message"], doc
    else:  # argparse's own refusal
        assert "error:" in stderr.getvalue()
