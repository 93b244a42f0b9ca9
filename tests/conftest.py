from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from mqstore.crypto import create_key_file
from mqstore.store import LogStore


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    return create_key_file(tmp_path / "kek.key")


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def store(store_path: Path, key_file: Path) -> Iterator[LogStore]:
    s = LogStore(store_path, key_file=key_file)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(autouse=True)
def _no_default_key_warning() -> Iterator[None]:
    # Tests that want the default-key warning assert it explicitly; elsewhere it is noise.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="mqstore created a key-encryption key")
        yield


def pytest_report_header() -> list[str]:
    from mqstore import codec

    return [f"mqstore codec: {codec.IMPLEMENTATION} (MQSTORE_PURE_PYTHON={os.environ.get('MQSTORE_PURE_PYTHON', '')})"]
