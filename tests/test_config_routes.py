"""The ``[[route]]`` tables and ``egress.proxy`` (``--proxy``) in the configuration
(tunlwip.config.routes, the loader, ``check-config``).

Why: a route sends flows around or through a proxy, so a typo must be an error naming the
table and key (``route[2].ports[1]``), never a route that silently matches something else; the
printed configuration must load back (without leaking proxy passwords); and until the gateway
applies routes it must refuse them rather than send their flows directly.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from tunlwip import MemoryDevice
from tunlwip import config as cfg
from tunlwip.cli import EXIT_CONFIG, EXIT_OK, Reloader, main, reload
from tunlwip.config import GatewayConfig
from tunlwip.config.routes import Route
from tunlwip.egress.via import Direct, HttpProxy, Reject, Socks5Proxy
from tunlwip.errors import ConfigError
from tunlwip.gateway import Gateway

from configfiles import flags, load_text, problems, write
from configfiles import no_etc as no_etc

ROUTES = """\
[[route]]
name      = "corp"
domains   = ["*.corp.example", "git.example.org"]
networks  = ["198.18.100.0/24", "fd00:100::/64"]
ports     = ["443", "8000-8100", 22]
protocols = ["tcp"]
clients   = ["198.18.0.0/24"]
via       = "socks5://user:s3cret@198.18.1.1:1080"
sniff     = true

[[route]]
protocols = ["udp"]
ports = [443]
via = "reject"

[[route]]
networks = ["198.18.200.0/24"]
via = "direct?fwmark=0x1d"
"""


def test_routes_load_in_order(tmp_path: Path) -> None:
    routes = load_text(tmp_path, ROUTES).gateway.routes
    assert routes[0] == Route(
        name="corp",
        domains=("*.corp.example", "git.example.org"),
        networks=tuple(map(ipaddress.ip_network, ("198.18.100.0/24", "fd00:100::/64"))),
        ports=((443, 443), (8000, 8100), (22, 22)),
        protocols=("tcp",),
        clients=(ipaddress.ip_network("198.18.0.0/24"),),
        via=Socks5Proxy("198.18.1.1", 1080, "user", "s3cret"),
        sniff=True,
    )
    assert routes[1] == Route(protocols=("udp",), ports=((443, 443),), via=Reject())
    assert routes[2].via == Direct(fwmark=0x1D) and routes[2].match_keys == ("networks",)
    assert load_text(tmp_path, "").gateway.routes == ()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[route]]\nports = ["443", "80-70"]\n',
         'route[0].ports[1]: "80-70" is not a port range (a port 1-65535 such as 443'),
        ("[[route]]\n[[route]]\n[[route]]\nports = [0]\n", "route[2].ports[0]: 0 is not a port"),
        ('[[route]]\nports = ["http"]\n', 'route[0].ports[0]: "http" is not a port range'),
        ('[[route]]\ndomain = ["a.example"]\n',
         "unknown key route[0].domain (did you mean domains?)"),
        ('[[route]]\ndomains = ["a..example"]\n',
         'route[0].domains[0]: "a..example" is not a name'),
        ('[[route]]\ndomains = ["@@||a.example^"]\n', "route[0].domains[0]: \"@@||a.example^\""),
        ('[[route]]\nnetworks = ["10.0.0.300/8"]\n', "route[0].networks[0]: expected a network"),
        ('[[route]]\nclients = "198.18.0.0/24"\n', "route[0].clients: expected a list"),
        ("[[route]]\nports = []\n", "route[0].ports: an empty list matches nothing"),
        ('[[route]]\nprotocols = ["icmp"]\n',
         'route[0].protocols[0]: expected one of "tcp", "udp", got "icmp"'),
        ('[[route]]\nvia = "socks4://h:1"\n',
         "route[0].via: 'socks4://h:1': unknown proxy scheme 'socks4'"),
        ('[[route]]\nvia = "http://u:pw@h:3128"\n',
         'route[0].via: an HTTP CONNECT proxy carries TCP only: add protocols = ["tcp"]'),
        ('[[route]]\nprotocols = ["tcp", "udp"]\nvia = "http://h:3128"\n',
         "route[0].via: an HTTP CONNECT proxy carries TCP only"),
        ("[[route]]\nsniff = true\n", "route[0].sniff: needs domains"),
        ('[[route]]\nsniff = true\ndomains = ["a.example"]\nprotocols = ["udp"]\n',
         "route[0].sniff: sniffing reads a TCP client's first bytes"),
        ('[[route]]\nname = "a"\n[[route]]\nname = "a"\n',
         'route[1].name: "a" is already route[0]'),
        ('[[route]]\nname = "12"\n', 'route[0].name: expected a name of 1-64 letters'),
        ('[[route]]\nname = "proxy"\n', 'route[0].name: "proxy" is reserved'),
        ("route = 3\n", "route: expected [[route]] tables, got 3"),
        ('[route]\nvia = "drop"\n', "route: expected [[route]] tables"),
        ('[egress]\nproxy = "socks5://h"\n', "egress.proxy: socks5://h: give the proxy's port"),
        ('[egress]\nproxy = "http://u:pw@h:x"\n', "egress.proxy: http://u:***@h:x: Port could"),
    ],
)  # fmt: skip
def test_errors_name_the_table_and_key(tmp_path: Path, text: str, message: str) -> None:
    found = problems(tmp_path, text)
    assert any(p.startswith(message) for p in found), found
    assert not any("pw" in p or "s3cret" in p for p in found), "passwords stay out of errors"


def test_every_route_problem_at_once(tmp_path: Path) -> None:
    text = ('[[route]]\nports = ["80-70"]\nvia = "ftp://x"\n[[route]]\nprotocol = ["tcp"]\n'
            "[udp]\nidle_timeout = 0\n")  # fmt: skip
    assert [p.split(":")[0] for p in problems(tmp_path, text)] == [
        "route[0].ports[0]", "route[0].via", "unknown key route[1].protocol (did you mean "
        "protocols?)", "udp.idle_timeout"]  # fmt: skip


def test_proxy_flag_and_key(tmp_path: Path) -> None:
    settings = load_text(tmp_path, "", **flags("--proxy", "socks5://198.18.1.1:1080"))
    assert settings.gateway.proxy == Socks5Proxy("198.18.1.1", 1080)
    file = '[egress]\nproxy = "socks5://198.18.1.1:1080"\n'
    flagged = load_text(tmp_path, file, **flags("--proxy", "http://198.18.1.2:3128"))
    assert flagged.gateway.proxy == HttpProxy("198.18.1.2", 3128), "the flag wins"
    assert problems(tmp_path, "", **flags("--proxy", "gopher://x:1"))[0].startswith(
        "egress.proxy: 'gopher://x:1': unknown proxy scheme 'gopher' (socks5 or http) (flag "
        "--proxy)")  # fmt: skip


def test_check_config_on_real_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write(tmp_path / "good.toml", '[device]\nname = "tlw0"\n' + ROUTES)
    assert main(["check-config", "--config", str(good)]) == EXIT_OK
    out, err = capsys.readouterr()
    assert "configuration OK" in out
    assert err == "", "routes are applied: no note"
    bad = write(tmp_path / "bad.toml", ROUTES.replace('"8000-8100"', '"8100-8000"'))
    proc = subprocess.run([sys.executable, "-m", "tunlwip", "check-config", "--config", str(bad),
                           "--iface", "tlw0", "--proxy", "http://u:hunter2@198.18.1.1:x"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == EXIT_CONFIG
    first, second = proc.stderr.splitlines()
    assert first == ('tunlwip check-config: route[0].ports[1]: "8100-8000" is not a port range '
                     '(a port 1-65535 such as 443, or "low-high" such as "8000-8100")')  # fmt: skip
    assert second.startswith("tunlwip check-config: egress.proxy: http://u:***@198.18.1.1:x: ")
    assert second.endswith("(flag --proxy)") and "hunter2" not in proc.stderr


def test_print_round_trips_routes_without_passwords(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path / "r.toml", ROUTES)
    argv = ["check-config", "--print", "--config", str(path), "--iface", "tlw0"]
    assert main([*argv, "--proxy", "http://admin:hunter2@198.18.1.2:3128"]) == EXIT_OK
    printed = capsys.readouterr().out
    assert "s3cret" not in printed and "hunter2" not in printed
    assert 'via = "socks5://user@198.18.1.1:1080"  # password not shown' in printed
    assert 'proxy = "http://admin@198.18.1.2:3128"  # password not shown' in printed
    assert "[egress]" in printed and printed.splitlines().count("[[route]]") == 3
    with pytest.raises(ConfigError, match="a user name needs a password"):
        cfg.load(write(tmp_path / "p.toml", printed))  # loud, never a wrong password
    restored = printed.replace("user@", "user:s3cret@").replace("admin@", "admin:hunter2@")
    again = cfg.load(write(tmp_path / "p.toml", restored))
    original = cfg.load(path, {"device.name": "tlw0",
                               "egress.proxy": "http://admin:hunter2@198.18.1.2:3128"})  # fmt: skip
    assert again.gateway == original.gateway


def test_gateway_takes_routes_and_checks_them() -> None:
    for config in (GatewayConfig(routes=(Route(via=Reject()),)),
                   GatewayConfig(proxy=Socks5Proxy("198.18.1.1", 1080))):  # fmt: skip
        gateway = Gateway(MemoryDevice(), config)
        assert len(gateway.routes) == 1, gateway.routes
    with pytest.raises(ConfigError, match="route: expected a tuple of Route"):
        GatewayConfig(routes=[Route()])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r'route\[1\].name: "a" is already'):
        GatewayConfig(routes=(Route(name="a"), Route(name="a")))


async def test_reload_applies_routes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path / "r.toml", "[quic]\nports = [443]\n")
    reloader = Reloader(str(path), {"device.name": "tlw0"})
    running = reloader.load()
    gateway = Gateway(MemoryDevice(), running.gateway)
    caplog.set_level(logging.INFO, logger="tunlwip")
    path.write_text("[quic]\nports = [8443]\n" + ROUTES)
    assert reload(gateway, running, running, reloader) is not running
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == []
    assert gateway.config.stack.blocked_udp_ports == (8443,) and len(gateway.config.routes) == 3
    assert gateway.routes.names[:3] == ("corp", "1", "2"), gateway.routes
    await trio.lowlevel.checkpoint()


def test_routing_docs_examples_are_accepted(tmp_path: Path) -> None:
    docs = Path(__file__).resolve().parents[1] / "docs" / "routing.md"
    blocks = re.findall(r"```toml\n(.*?)```", docs.read_text(), re.S)
    assert len(blocks) >= 5
    for i, block in enumerate(blocks):
        cfg.load(write(tmp_path / f"routing{i}.toml", block), {"device.name": "tlw0"})
