"""Validation of what callers hand to mqstore: addresses, namespaces, message data.

Every function raises :class:`~mqstore.errors.InvalidArgument` with a message naming the field
and the problem, and returns the normalised value. Called before anything is written, so bad
input never changes state.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from typing import Any

from mqstore import limits
from mqstore.errors import InvalidArgument

# Namespaces name queues/tenants in paths, metrics and CLI arguments: keep them plain. Names
# starting with "__" are reserved for mqstore's own records.
_NAMESPACE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
# A domain label: letters, digits, hyphens (not at either end), or any non-ASCII (IDN in UTF-8,
# RFC 6531). Address literals ([192.0.2.1], [IPv6:...]) are accepted separately.
_LABEL_CHAR = "A-Za-z0-9\u0080-\U0010FFFF"
_LABEL_RE = re.compile(f"[{_LABEL_CHAR}](?:[{_LABEL_CHAR}-]{{0,61}}[{_LABEL_CHAR}])?\\Z")
_LITERAL_RE = re.compile(r"\[(?:[0-9.]{7,15}|IPv6:[0-9A-Fa-f:.]{2,45})\]\Z")
# Characters never valid in an unquoted local part: controls, space, the RFC 5322 specials, and
# angle brackets (callers pass the path without them).
_FORBIDDEN_RE = re.compile(r'[\x00-\x20\x7f<>(),;:\\"@\[\]]')


_GOOD_NAMESPACES: set[str] = set()


def namespace(value: object, field: str = "namespace") -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"{field} must be a string, not {type(value).__name__}")
    if value in _GOOD_NAMESPACES:
        return value
    if not _NAMESPACE_RE.match(value):
        raise InvalidArgument(
            f"{field} {value!r} is not valid: use 1-64 characters from A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    if len(_GOOD_NAMESPACES) < 65_536:
        _GOOD_NAMESPACES.add(value)
    return value


def _domain_problem(value: str) -> str | None:
    if _LITERAL_RE.match(value):
        return None
    try:
        size = len(value.encode("utf-8"))
        # Domains are kept and matched lower-cased, and lower-casing may lengthen a name
        # ("İ" is 2 bytes, "i̇" 3): the limit holds for the form that is stored.
        lowered = len(value.lower().encode("utf-8"))
    except UnicodeEncodeError:
        return "domain is not valid Unicode (lone surrogate)"
    if size > limits.DOMAIN_BYTES_MAX:
        return f"domain is {size} bytes, the limit is {limits.DOMAIN_BYTES_MAX}"
    if lowered > limits.DOMAIN_BYTES_MAX:
        return f"domain is {lowered} bytes once lower-cased, the limit is {limits.DOMAIN_BYTES_MAX}"
    if not all(_LABEL_RE.match(label) for label in value.split(".")):
        return f"{value!r} is not a valid domain"
    return None


@functools.lru_cache(maxsize=65_536)
def _address_problem(value: str) -> str | None:
    """What is wrong with a non-empty address string, or None. Pure, so its answers are cached:
    a spool sees the same recipients over and over."""
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not valid Unicode (lone surrogate)"
    if size > limits.ADDRESS_BYTES_MAX:
        return f"is {size} bytes, the limit is {limits.ADDRESS_BYTES_MAX}"
    local, sep, dom = value.rpartition("@")
    if not sep or not local or not dom:
        return f"{value!r} is not an address of the form local@domain"
    local_bytes = len(local.encode("utf-8"))
    if local_bytes > limits.LOCAL_PART_BYTES_MAX:
        return f"local part is {local_bytes} bytes, the limit is {limits.LOCAL_PART_BYTES_MAX}"
    if len(local) >= 2 and local.startswith('"') and local.endswith('"'):
        # A quoted local part ("john smith"@example.org) may hold specials, never controls.
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in local):
            return f"{value!r} has a control character"
    elif _FORBIDDEN_RE.search(local):
        return f"{value!r} has a character not allowed in an address"
    elif local.startswith(".") or local.endswith(".") or ".." in local:
        return f"{value!r}: a dot may not start, end or repeat in the local part"
    return _domain_problem(dom)


def domain(value: object, field: str = "domain") -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"{field} must be a string, not {type(value).__name__}")
    problem = _domain_problem(value)
    if problem is not None:
        raise InvalidArgument(f"{field}: {problem}")
    return value


def address(value: object, field: str, *, allow_null: bool = False) -> str:
    """An SMTP path without angle brackets: ``local@domain`` (``""`` when ``allow_null``)."""
    if not isinstance(value, str):
        raise InvalidArgument(f"{field} must be a string, not {type(value).__name__}")
    if value == "":
        if allow_null:
            return value
        raise InvalidArgument(f"{field} is empty")
    problem = _address_problem(value)
    if problem is not None:
        raise InvalidArgument(f"{field}: {problem}" if not problem.startswith("is ") else f"{field} {problem}")
    return value


def recipients(value: object, field: str = "recipients") -> tuple[str, ...]:
    # Hot (every enqueued message): lists and tuples of plain strings take the short way.
    if type(value) is tuple:
        out: tuple[Any, ...] = value
    elif type(value) is list:
        out = tuple(value)
    elif isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise InvalidArgument(f"{field} must be a list of addresses, not {type(value).__name__}")
    else:
        out = tuple(value)
    if not out:
        raise InvalidArgument(f"{field} is empty: a message needs at least one recipient")
    if len(out) > limits.RECIPIENTS_MAX:
        raise InvalidArgument(f"{field} has {len(out)} addresses, the limit is {limits.RECIPIENTS_MAX}")
    for i, rcpt in enumerate(out):
        if type(rcpt) is not str or not rcpt or _address_problem(rcpt) is not None:
            address(rcpt, f"{field}[{i}]")  # raises, naming the problem (or accepts a str subclass)
    if len(out) > 1 and len(set(out)) != len(out):
        seen: set[str] = set()
        for i, rcpt in enumerate(out):
            if rcpt in seen:
                raise InvalidArgument(f"{field}[{i}] {rcpt!r} is listed twice")
            seen.add(rcpt)
    return out


def data(value: object, field: str = "data") -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise InvalidArgument(f"{field} must be bytes (the raw RFC 5322 message), not {type(value).__name__}")
    out = bytes(value)
    if len(out) > limits.MESSAGE_BYTES_MAX:
        raise InvalidArgument(f"{field} is {len(out)} bytes, the limit is {limits.MESSAGE_BYTES_MAX}")
    return out


def nbytes(value: bytes | bytearray | memoryview) -> int:
    """The size in bytes of message data :func:`data` accepted (a memoryview's ``len`` counts its
    items, which may be wider than a byte)."""
    return value.nbytes if isinstance(value, memoryview) else len(value)


def listed(value: object, field: str, noun: str) -> list[Any]:
    """``value`` (any iterable but text) as a list; InvalidArgument naming ``field`` otherwise."""
    if isinstance(value, (str, bytes, bytearray)) or not isinstance(value, Iterable):
        what = "a string" if isinstance(value, str) else type(value).__name__
        raise InvalidArgument(f"{field} must be a list of {noun}, not {what}")
    return list(value)


def integer(value: object, field: str, lo: int, hi: int) -> int:
    if type(value) is int and lo <= value <= hi:
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{field} must be an integer, not {type(value).__name__}")
    if not lo <= value <= hi:
        raise InvalidArgument(f"{field} must be in {lo}..{hi}, not {value}")
    return value


def idempotency_key(value: object, field: str = "idempotency_key") -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidArgument(f"{field} must be a string or None, not {type(value).__name__}")
    try:
        encoded = value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(f"{field} is not valid Unicode (lone surrogate)") from None
    if not encoded:
        raise InvalidArgument(f"{field} must not be empty (use None)")
    if len(encoded) > limits.IDEMPOTENCY_KEY_BYTES_MAX:
        raise InvalidArgument(f"{field} is {len(encoded)} bytes, the limit is {limits.IDEMPOTENCY_KEY_BYTES_MAX}")
    return value
