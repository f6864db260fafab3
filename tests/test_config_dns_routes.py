"""The ``[[dns.route]]`` tables and ``dns.via`` in the configuration (tunlwip.config.dns_routes,
the loader, ``check-config``, ``--print``).

Why: a DNS route decides which servers learn a name, so a typo must be an error naming the table
and key (``dns.route[1].upstreams[0]``), never a route that silently sends names elsewhere; a
combination the proxy cannot carry (``udp://`` through a proxy) must be refused with what to
use instead; and the printed configuration must load back.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from tunlwip.cli import EXIT_CONFIG, EXIT_OK, main
from tunlwip.config import DnsConfig
from tunlwip.config.dns_routes import DnsRoute
from tunlwip.egress.via import Direct, Socks5Proxy
from tunlwip.errors import ConfigError

from configfiles import load_text, problems, write
from configfiles import no_etc as no_etc

ROUTES = """\
[dns]
upstreams = ["udp://198.18.1.2:53"]
via = "direct?fwmark=0x1d"

[[dns.route]]
name = "corp"
domains = ["*.corp.example", "git.example.org"]
upstreams = ["tls://198.18.100.53#dns.corp.example", "tcp://198.18.100.54:5353"]
via = "socks5://198.18.1.1:1080"

[[dns.route]]
domains = ["||home.arpa^"]
upstreams = ["udp://198.18.1.3"]
"""


def test_dns_routes_load_in_order(tmp_path: Path) -> None:
    dns = load_text(tmp_path, ROUTES).gateway.dns
    assert dns.via == Direct(fwmark=0x1D)
    assert dns.routes == (
        DnsRoute(name="corp", domains=("*.corp.example", "git.example.org"),
                 upstreams=("tls://198.18.100.53#dns.corp.example", "tcp://198.18.100.54:5353"),
                 via=Socks5Proxy("198.18.1.1", 1080)),
        DnsRoute(domains=("||home.arpa^",), upstreams=("udp://198.18.1.3",)),
    )  # fmt: skip


def test_print_round_trips(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "r.toml", '[device]\nname = "tlw0"\n' + ROUTES)
    assert main(["check-config", "--config", str(path), "--print"]) == EXIT_OK
    printed = capsys.readouterr().out
    assert "[[dns.route]]" in printed and 'via = "direct?fwmark=29"' in printed
    tomllib.loads(printed)  # valid TOML: the [[dns.route]] tables come after [dns]
    again = load_text(tmp_path, printed)
    assert again.gateway.dns == load_text(tmp_path, ROUTES).gateway.dns


BAD = [
    ('domains = ["a.test"]\nupstreams = ["tcp://198.18.1.2", "ftp://198.18.1.2"]',
     "dns.route[0].upstreams[1]: not a valid upstream URL: the scheme must be udp://"),
    ('domains = ["a.test"]\nupstreams = ["tcp://ns.example"]',
     "dns.route[0].upstreams[0]: not a valid upstream URL: the host 'ns.example' is not an IP"),
    ('domains = ["bad name!"]\nupstreams = ["udp://198.18.1.2"]',
     'dns.route[0].domains[0]: "bad name!" is not a name'),
    ('domains = []\nupstreams = ["udp://198.18.1.2"]',
     "dns.route[0].domains: an empty list"),
    ('upstreams = ["udp://198.18.1.2"]', "dns.route[0].domains: required"),
    ('domains = ["a.test"]', "dns.route[0].upstreams: required"),
    ('domains = ["a.test"]\nupstreams = ["tcp://198.18.1.2", "udp://198.18.1.2"]\n'
     'via = "socks5://198.18.1.1:1080"',
     "dns.route[0].upstreams[1]: 'udp://198.18.1.2' is udp://, which cannot go through the "
     "proxy socks5://198.18.1.1:1080: use tcp:// or tls://"),
    ('domains = ["a.test"]\nupstreams = ["tcp://198.18.1.2"]\nvia = "socks5://proxy.example:1080"',
     "dns.route[0].via: the proxy socks5://proxy.example:1080 must be given by IP address"),
    ('domains = ["a.test"]\nupstreams = ["tcp://198.18.1.2"]\nvia = "reject"',
     "dns.route[0].via: reject is not a way to reach a DNS upstream"),
    ('domains = ["a.test"]\nupstreams = ["tcp://198.18.1.2"]\nvia = "ftp://198.18.1.1:21"',
     "dns.route[0].via: 'ftp://198.18.1.1:21': unknown proxy scheme"),
    ('domains = ["a.test"]\nupstreams = ["tcp://198.18.1.2"]\nname = "default"',
     'dns.route[0].name: "default" is reserved'),
    ('domains = ["a.test"]\nupstream = ["tcp://198.18.1.2"]',
     "unknown key dns.route[0].upstream (did you mean upstreams?)"),
]  # fmt: skip


@pytest.mark.parametrize(("table", "expected"), BAD)
def test_bad_dns_routes_name_their_key_path(tmp_path: Path, table: str, expected: str) -> None:
    text = "[dns]\n\n[[dns.route]]\n" + table + "\n"
    found = problems(tmp_path, text)
    assert any(p.startswith(expected) for p in found), found


def test_every_bad_table_is_reported_with_its_index(tmp_path: Path) -> None:
    text = (
        '[[dns.route]]\ndomains = ["a.test"]\nupstreams = ["tcp://198.18.1.2"]\nname = "x"\n'
        '[[dns.route]]\ndomains = ["b.test"]\nupstreams = ["tcp://198.18.1.2:99999"]\n'
        '[[dns.route]]\ndomains = ["c.test"]\nupstreams = ["tcp://198.18.1.2"]\nname = "x"\n'
    )
    found = problems(tmp_path, text)
    assert found[0].startswith("dns.route[1].upstreams[0]: not a valid upstream URL"), found
    assert found[1] == 'dns.route[2].name: "x" is already dns.route[0]\'s name', found
    assert problems(tmp_path, "[dns]\nroute = 3\n") == [
        "dns.route: expected [[dns.route]] tables, got 3"
    ]


def test_dns_via_rules(tmp_path: Path) -> None:
    found = problems(tmp_path, '[dns]\nupstreams = ["udp://198.18.1.2"]\n'
                               'via = "http://198.18.1.1:3128"\n')  # fmt: skip
    assert found == ["dns.upstreams[0]: 'udp://198.18.1.2' is udp://, which cannot go through "
                     "the proxy http://198.18.1.1:3128: use tcp:// or tls:// to the same "
                     "server"]  # fmt: skip
    found = problems(tmp_path, '[dns]\nvia = "socks5://198.18.1.1:1080"\n')
    assert found == ["dns.via: a proxy needs dns.upstreams given as tcp://, tls:// or https:// "
                     "(the nameservers of /etc/resolv.conf are udp://)"]  # fmt: skip
    found = problems(tmp_path, '[dns]\nvia = "drop"\n')
    assert found[0].startswith("dns.via: drop is not a way to reach a DNS upstream"), found
    # A direct variant takes any upstream, the resolv.conf ones included.
    assert load_text(tmp_path, '[dns]\nvia = "direct?interface=eth9"\n').gateway.dns.via == \
        Direct(interface="eth9")  # fmt: skip


def test_embedders_meet_the_same_rules() -> None:
    with pytest.raises(ConfigError, match=r"dns.route.upstreams\[0\]: 'udp://198.18.1.2' is udp"):
        DnsRoute(domains=("a.test",), upstreams=("udp://198.18.1.2",),
                 via=Socks5Proxy("198.18.1.1", 1080))  # fmt: skip
    with pytest.raises(ConfigError, match=r"dns\.route\.upstreams: required"):
        DnsRoute(domains=("a.test",))
    route = DnsRoute(name="x", domains=("a.test",), upstreams=("tcp://198.18.1.2",))
    with pytest.raises(ConfigError, match=r"dns.route\[1\].name: \"x\" is already"):
        DnsConfig(routes=(route, route))
    with pytest.raises(ConfigError, match=r"dns\.route: expected a tuple of DnsRoute"):
        DnsConfig(routes=[route])  # type: ignore[arg-type]


def test_check_config_exits_78_on_a_bad_dns_route(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path / "bad.toml", '[device]\nname = "tlw0"\n[[dns.route]]\n'
                 'domains = ["a.test"]\nupstreams = ["tls://198.18.1.2#bad name"]\n')  # fmt: skip
    assert main(["check-config", "--config", str(path)]) == EXIT_CONFIG
    assert "dns.route[0].upstreams[0]: not a valid upstream URL: bad server name" in \
        capsys.readouterr().err  # fmt: skip
