"""A node's configuration, fuzzed: starting from a valid configuration, any value of any key (top
level, in its tables, in a peer or a client entry) replaced by a random TOML value, a key removed
or an unknown one added, gives either a valid configuration or a ConfigError naming the file —
never another exception (a TypeError from a value of the wrong type, say) that an operator would
see as a traceback from ``mqstore serve``.

``MQSTORE_FUZZ_EXAMPLES`` sets the number of configurations (default 300).
"""

from __future__ import annotations

import copy
import datetime as dt
import os
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mqstore.config import ConfigError, NodeConfig, parse

SOURCE = "fuzz.toml"


def _valid() -> dict[str, Any]:
    return {
        "node_id": 1,
        "site": "ams",
        "listen": "127.0.0.1:7001",
        "advertise": "mq1.example.net:7001",
        "data_dir": "/var/lib/mqstore",
        "key_file": "/etc/mqstore/kek.key",
        "min_sites": 2,
        "cluster_id": "prod",
        "election_tick": 10,
        "heartbeat_ms": 100,
        "log_level": "info",
        "log_json": False,
        "peers": [{"id": 2, "site": "fra", "address": "127.0.0.1:7002"},
                  {"id": 3, "site": "lon", "address": "127.0.0.1:7003"}],
        "insecure": True,  # a [tls] table would name files that must exist (tests/test_security.py)
        "auth": {"anonymous": False,
                 "clients": [{"name": "mta-1", "roles": ["producer"], "namespaces": ["default"]}]},
        "limits": {"message_bytes_max": 1 << 20, "recipients_max": 100},
        "metrics": {"listen": "127.0.0.1:9464"},
        "health": {"disk_free_min_bytes": 1 << 30, "disk_free_min_percent": 5},
    }


#: Values a TOML file can hold (tomllib gives these types), with edge cases.
_SCALARS = st.one_of(
    st.integers(-(2**64), 2**64),
    st.sampled_from([0, -1, 1, 2**63 - 1, 2**63, 7001, 65_536]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=30),
    st.sampled_from(["", " ", "ams", "127.0.0.1:0", "127.0.0.1:99999", "host:", ":7001", "../x", "\x00",
                     "debug", "a" * 300, "[::1]:7001", "127.0.0.1:\u00b2", "127.0.0.1:\u0661\u0662"]),
    st.datetimes(min_value=dt.datetime(1970, 1, 1), max_value=dt.datetime(2100, 1, 1)),
    st.dates(min_value=dt.date(1970, 1, 1)),
    st.times(),
)
_VALUES = st.recursive(_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(st.text(max_size=10), inner, max_size=3)),
                       max_leaves=6)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a key or list item in a configuration."""
    out = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        out.append((*prefix, key))
        out.extend(_paths(child, (*prefix, key)))
    return out


@st.composite
def configs(draw: st.DrawFn) -> dict[str, Any]:
    data = _valid()
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(data)
        path = draw(st.sampled_from(paths))
        parent: Any = data
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "replace", "replace", "remove", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(_VALUES)
        elif action == "remove":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=12))] = draw(_VALUES)
        else:
            parent.append(draw(_VALUES))
    return data


def test_the_valid_starting_point_parses() -> None:
    config = parse(copy.deepcopy(_valid()), SOURCE)
    assert config.node_id == 1 and [p.id for p in config.peers] == [2, 3]


@settings(max_examples=int(os.environ.get("MQSTORE_FUZZ_EXAMPLES", "300")), deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(configs())
def test_a_damaged_configuration_is_valid_or_a_config_error(data: dict[str, Any]) -> None:
    try:
        config = parse(data, SOURCE)
    except ConfigError as exc:
        assert str(exc).startswith(SOURCE), str(exc)
        return
    assert isinstance(config, NodeConfig)


#: A port written with digits other than ASCII ones: '²' (int() refuses it), Arabic-Indic '١٢'
#: (int() reads 12), fullwidth '７００１'.
_ODD_PORTS = ["127.0.0.1:\u00b2", "127.0.0.1:\u0661\u0662", "127.0.0.1:\uff17\uff10\uff10\uff11"]


@pytest.mark.parametrize("port", _ODD_PORTS)
@pytest.mark.parametrize("key", ["listen", "advertise", "peers[0].address", "metrics.listen"])
def test_a_port_in_other_digits_than_ascii_is_a_config_error_naming_the_key(key: str, port: str) -> None:
    data = _valid()
    if key == "peers[0].address":
        data["peers"][0]["address"] = port
    elif key == "metrics.listen":
        data["metrics"]["listen"] = port
    else:
        data[key] = port
    with pytest.raises(ConfigError, match="^" + re.escape(f"{SOURCE}: {key} must be")):
        parse(data, SOURCE)


@pytest.mark.parametrize("key, value", [("cluster_id", False), ("cluster_id", 0), ("cluster_id", ""),
                                        ("cluster_id", "bad id!"), ("advertise", 0), ("advertise", False),
                                        ("advertise", "")])
def test_a_present_key_is_checked_even_when_its_value_is_falsy(key: str, value: Any) -> None:
    data = _valid()
    data[key] = value
    with pytest.raises(ConfigError, match=rf"^{SOURCE}: {key} must be"):
        parse(data, SOURCE)
