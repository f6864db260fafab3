"""``via`` values: every form a route may name, and the errors for the rest."""

from __future__ import annotations

import pytest

from tunlwip.egress import Direct, Drop, HttpProxy, Reject, Socks5Proxy, parse_via
from tunlwip.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("direct", Direct()),
        (" direct ", Direct()),
        ("direct?fwmark=100", Direct(fwmark=100)),
        ("direct?fwmark=0x1f", Direct(fwmark=31)),
        ("direct?interface=eth1", Direct(interface="eth1")),
        ("reject", Reject()),
        ("drop", Drop()),
        ("socks5://198.18.1.1:1080", Socks5Proxy("198.18.1.1", 1080)),
        ("SOCKS5://proxy.example:1080", Socks5Proxy("proxy.example", 1080)),
        ("socks5://[fd00:1::2]:1080", Socks5Proxy("fd00:1::2", 1080)),
        (
            "socks5://u:p%40ss@10.1.1.1:1080?remote_dns=true",
            Socks5Proxy("10.1.1.1", 1080, "u", "p@ss", remote_dns=True),
        ),
        ("http://proxy.example:3128", HttpProxy("proxy.example", 3128)),
        (
            "http://alice:secret@proxy.example:3128",
            HttpProxy("proxy.example", 3128, "alice", "secret"),
        ),
    ],
)
def test_parses(text: str, expected: object) -> None:
    assert parse_via(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "expected direct"),
        ("directly", "expected direct"),
        ("direct?fwmark=0", "fwmark must be"),
        ("direct?fwmark=x", "fwmark must be"),
        ("direct?fwmark=1&interface=eth0", "exactly one"),
        ("direct?colour=red", "unknown option"),
        ("direct?interface=a/b", "not a valid interface name"),
        ("ftp://h:21", "unknown proxy scheme"),
        ("socks5://h", "give the proxy's port"),
        ("socks5://h:0", "give the proxy's port"),
        ("socks5://h:99999", "out of range"),
        ("socks5://:1080", "no proxy host"),
        ("socks5://bad_host!:1080", "not a host name"),
        ("socks5://h:1080/path", "no path"),
        ("socks5://u@h:1080", "needs a password"),
        ("socks5://h:1080?remote_dns=maybe", "true or false"),
        ("socks5://h:1080?x=1", "unknown option"),
        ("http://h:3128?remote_dns=true", "no options"),
        ("socks5://u:" + "p" * 256 + "@h:1080", "1-255 bytes"),
    ],
)
def test_refuses(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_via(text)


def test_passwords_stay_out_of_text() -> None:
    via = parse_via("socks5://alice:hunter2@h:1080")
    assert "hunter2" not in str(via) and "hunter2" not in repr(via)
    assert str(via) == "socks5://alice@h:1080"
    with pytest.raises(ConfigError) as caught:
        parse_via("socks5://alice:hunter2@h:1080/x")
    assert "hunter2" not in str(caught.value)


def test_round_trips() -> None:
    for text in ("direct", "direct?fwmark=7", "direct?interface=wg0", "reject", "drop",
                 "socks5://h:1080", "http://[fd00::1]:3128"):  # fmt: skip
        assert str(parse_via(text)) == text
