"""Bad configuration values are reported with their key path (tunlwip.config).

Why: a typo must be reported with the key path (and, in the structs embedders build, the field),
every problem at once, so that the operator fixes the file in one go; the command then exits 78
(test_config_cli.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tunlwip import DnsConfig, GatewayConfig, StackConfig
from tunlwip import config as cfg
from tunlwip.config import ConfigProblems
from tunlwip.errors import ConfigError
from tunlwip.udp import UdpConfig

from configfiles import UPSTREAM, problems, write
from configfiles import no_etc as no_etc

# -- errors name their key path ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[udp]\nidle_timeout = "abc"\n', 'udp.idle_timeout: expected a number, got "abc"'),
        ("[udp]\nidle_timeout = 0\n", "udp.idle_timeout: must be > 0, got 0"),
        ("[udp]\nidle_timeout = nan\n", "udp.idle_timeout: must be a finite number"),
        ("[tcp]\nidel_timeout = 3\n", "unknown key tcp.idel_timeout (did you mean idle_timeout?)"),
        (
            "[tcp]\nmax_sessions = 3\n",
            "unknown key tcp.max_sessions (did you mean udp.max_sessions?)",
        ),
        ("[tpc]\nidle_timeout = 3\n", "unknown section [tpc] (did you mean [tcp]?)"),
        ("mtu = 1400\n", "unknown key mtu (did you mean device.mtu?)"),
        ("tcp = 3\n", "tcp: expected a table [tcp], got 3"),
        ("[device]\nmtu = 100\n", "device.mtu: must be between 576 and 65520, got 100"),
        ("[device]\nmtu = 1500.0\n", "device.mtu: expected an integer, got 1500.0"),
        ("[device]\nmtu = true\n", "device.mtu: expected an integer, got true"),
        ('[device]\nname = "a-much-too-long-name"\n', "device.name: expected an interface name"),
        ('[device]\nipv4 = "fd00::1"\n', 'device.ipv4: expected an IPv4 address, got "fd00::1"'),
        (
            '[device]\nclient_networks = ["198.18.0.0/15", "300.1.2.0/24"]\n',
            'device.client_networks[1]: expected a network such as "198.18.0.0/15", got "300.1.2',
        ),
        (
            '[device]\nclient_networks = "198.18.0.0/15"\n',
            "device.client_networks: expected a list",
        ),
        (
            "[device]\nclient_networks = ["
            + ", ".join(f'"198.18.{i}.0/24"' for i in range(17))
            + "]\n",
            "device.client_networks: at most 16 entries, got 17",
        ),
        ('[tcp]\ndial_before_accept = "yes"\n', "tcp.dial_before_accept: expected true or false"),
        (
            '[quic]\nmode = "block"\n',
            'quic.mode: expected one of "reject", "drop", "off", got "block',
        ),
        ("[quic]\nports = [443, 70000]\n", "quic.ports[1]: must be between 1 and 65535, got 70000"),
        ('[protect]\nfwmark = "0xzz"\n', "protect.fwmark: expected an integer or a string like"),
        ("[protect]\nfwmark = 0\n", "protect.fwmark: must be between 1 and 4294967295, got 0"),
        (
            '[protect]\nfwmark = 1\ninterface = "eth0"\n',
            "protect: fwmark and interface are mutually",
        ),
        (
            f'[dns]\nupstreams = ["{UPSTREAM}", "udp://1.1.1.1", "ftp://x"]\n',
            "dns.upstreams[2]: not a valid upstream URL: the scheme must be",
        ),
        (
            '[dns]\nupstreams = ["https://dns.example/dns-query"]\n',
            "dns.upstreams[0]: not a valid upstream URL: a host name needs '#IP'",
        ),
        ('[dns]\nblock_lists = ["missing.list"]\n', "dns.block_lists[0]: cannot read "),
        (
            '[dns.overrides]\n"nas.test" = ["198.18.9.9", "nope"]\n',
            "dns.overrides.\"nas.test\": 'nope' is not an IPv4 or IPv6 address",
        ),
        ('[dns.overrides]\n"nas.test" = 5\n', 'dns.overrides."nas.test": expected an address'),
        ("[dns]\nmin_ttl = 700\nmax_ttl = 600\n", "dns.min_ttl: must be <= dns.max_ttl (600)"),
        ("[dns]\ntcp_query_timeout = 0\n", "dns.tcp_query_timeout: must be > 0, got 0"),
        ('[dns]\nreject_encrypted = "yes"\n', "dns.reject_encrypted: expected true or false"),
        ('[logging]\nlevel = "loud"\n', 'logging.level: expected one of "debug"'),
        ("[logging]\nlevel = 6\n", "logging.level: expected one of"),
        ("[limits]\ngrace = -1\n", "limits.grace: must be >= 0, got -1"),
        ("[device\nmtu = 1\n", "not valid TOML"),
    ],
)
def test_errors_name_the_key_path(tmp_path: Path, text: str, message: str) -> None:
    found = problems(tmp_path, text)
    assert len(found) == 1 and message in found[0], found


def test_bad_ca_file_is_a_config_error(tmp_path: Path) -> None:
    write(tmp_path / "ca.pem", "not a certificate\n")
    found = problems(tmp_path, '[dns]\nca_file = "ca.pem"\n')
    assert found[0].startswith("dns.ca_file: not a PEM CA bundle"), found


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    found = problems(tmp_path, '[tcp]\nidel_timeout = 1\n[udp]\nidle_timeout = "x"\n[x]\n')
    assert [p.split(" ", 2)[:2] for p in found] == [
        ["unknown", "key"],
        ["udp.idle_timeout:", "expected"],
        ["unknown", "section"],
    ]


def test_struct_errors_name_the_key_path_and_the_field() -> None:
    """The structs check their fields with the file's rules: every bad field at once, each
    with its key path (and, for embedders, the field), as a ConfigError and a ValueError."""
    with pytest.raises(ValueError, match=r"^device\.mtu: must be between 576 and 65520"):
        StackConfig(mtu=100)
    bad: dict[str, object] = {"predial_claim_timeout": 0, "keepalive_count": 0}
    with pytest.raises(ConfigError) as exc:
        GatewayConfig(unreachable_reply="x", **bad)  # type: ignore[arg-type]
    assert isinstance(exc.value, ConfigProblems) and exc.value.problems == [
        "tcp.keepalive_count: must be between 1 and 127, got 0",
        'tcp.unreachable: expected one of "icmp", "rst", got "x"',
        "tcp.claim_timeout: must be > 0, got 0",
    ]
    assert str(exc.value).endswith("got 0 (GatewayConfig.predial_claim_timeout)")
    with pytest.raises(ValueError, match=r"^dns\.min_ttl: must be <= dns\.max_ttl \(600\)"):
        DnsConfig(min_ttl=700, max_ttl=600)
    assert UdpConfig(max_sessions_per_client=None).session_share == 1024  # None: automatic
    with pytest.raises(ValueError, match=r'^device\.ipv4: expected an IPv4 address, got "198'):
        StackConfig(ipv4_address="198.18.0.1")  # type: ignore[arg-type]


def test_config_key_maps_fields_to_keys() -> None:
    assert cfg.config_key("stack.mtu") == "device.mtu"
    assert cfg.config_key("stack.icmp_echo (to forward)") == "icmp.echo (to forward)"
    assert cfg.config_key("dial_before_accept") == "tcp.dial_before_accept"
    assert cfg.config_key("something.new") == "something.new"
