"""The configuration file, flags and ``check-config`` (tunlwip.config, tunlwip.cli).

Why: operators meet the configuration first; a typo must be reported with the key path and exit
78, flags must override the file, ``check-config --print`` must round-trip, SIGHUP must apply a
new file (or keep the old one when it is broken), and docs/configuration.md must describe exactly
the keys and defaults the code has.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tunlwip import DnsConfig, GatewayConfig, MemoryDevice, StackConfig
from tunlwip import config as cfg
from tunlwip.cli import (
    EXIT_CONFIG,
    EXIT_OK,
    Reloader,
    build_parser,
    main,
    overrides_from_args,
    reload,
)
from tunlwip.config import SCHEMA, ConfigProblems, Settings
from tunlwip.dialer import Keepalive
from tunlwip.errors import ConfigError
from tunlwip.gateway import Gateway
from tunlwip.service import configure_logging
from tunlwip.udp import UdpConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "configuration.md"
EXAMPLE = ROOT / "contrib" / "tunlwip.example.toml"
UPSTREAM = "udp://198.18.1.2:53"


@pytest.fixture(autouse=True)
def no_etc(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Default files come from an empty directory, never the machine's /etc/tunlwip."""
    etc = tmp_path / "etc"
    etc.mkdir()
    monkeypatch.setattr(cfg.loader, "CONFIG_DIR", etc)
    return etc


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def load_text(tmp_path: Path, text: str, **overrides: object) -> Settings:
    return cfg.load(write(tmp_path / "t.toml", text), {"device.name": "tlw0", **overrides})


def problems(tmp_path: Path, text: str, **overrides: object) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        load_text(tmp_path, text, **overrides)
    return exc.value.problems if isinstance(exc.value, ConfigProblems) else [str(exc.value)]


# -- defaults and mapping ---------------------------------------------------------------------


def test_defaults_are_the_command_line_defaults() -> None:
    """No file, no flags but --iface: what `tunlwip up --iface X` always ran with."""
    settings = cfg.load(None, {"device.name": "tlw0"})
    assert settings.source is None and settings.iface == "tlw0"
    clients = tuple(map(ipaddress.ip_network, ("198.18.0.0/15", "fd00:18::/64")))
    assert settings.gateway == GatewayConfig(
        stack=StackConfig(client_networks=clients), udp=UdpConfig(sweep_interval=30.0)
    )
    assert settings.protect == (None, None) and settings.grace == 5.0
    assert settings.log_level == "info" and settings.log_file is None


def test_every_field_of_the_structs_is_a_key() -> None:
    """Each field of the embedders' structs is declared with its key path (or is a nested
    struct), and the file's defaults are the structs' but for the documented exceptions."""
    nested = {"stack", "udp", "dns"}
    keys = {opt.field: opt for opt in SCHEMA if opt.field is not None}
    for owner, prefix in (
        (GatewayConfig, ""),
        (StackConfig, "stack."),
        (UdpConfig, "udp."),
        (DnsConfig, "dns."),
    ):
        for f in dataclasses.fields(owner):
            if f.name in nested and owner is GatewayConfig:
                continue
            opt = keys[prefix + f.name]
            struct_default = f.default_factory() if callable(f.default_factory) else f.default
            if opt.path not in ("device.client_networks", "udp.sweep_interval"):
                assert opt.default == struct_default, opt.path
    assert cfg.OPTIONS["device.client_networks"].default == tuple(
        map(ipaddress.ip_network, ("198.18.0.0/15", "fd00:18::/64"))
    )
    assert cfg.OPTIONS["udp.sweep_interval"].default is None  # min(30, idle / 2)


NON_DEFAULT = """\
[device]
name = "tlwfile0"
mtu = 9000
ipv4 = "198.18.0.9"
ipv6 = "fd00:18::9"
client_networks = ["198.18.4.0/24"]
verify_checksums = false

[protect]
fwmark = "0x1d"

[tcp]
dial_timeout = 7
idle_timeout = 70.5
dial_before_accept = false
unreachable = "rst"
max_pending_dials = 77
claim_timeout = 3
max_connections = 500

[udp]
idle_timeout = 11
dns_idle_timeout = 4
sweep_interval = 2
max_sessions = 99
queue_datagrams = 8

[quic]
mode = "drop"
ports = [8443]

[icmp]
echo = "off"
idle_timeout = 9

[dns]
hijack = "gateway"
upstreams = ["udp://198.18.1.2:53", "tls://198.18.1.2#dot.test"]
block_lists = ["block.list"]
allow_lists = ["lists/allow.list"]
blocked_answer = "refused"
query_timeout = 4
attempt_timeout = 1.5
tcp_idle_timeout = 12
tcp_query_timeout = 6
reject_encrypted = true
cache_size = 0
min_ttl = 5
max_ttl = 600
max_negative_ttl = 60
max_in_flight = 10

[dns.overrides]
"nas.home.arpa" = ["198.18.9.9", "fd00:9::9"]
"one.test" = "198.18.9.1"

[logging]
level = "debug"
file = "log/tunlwip.log"

[limits]
grace = 0
"""


@pytest.fixture
def full_file(tmp_path: Path) -> Path:
    """NON_DEFAULT in tmp_path/conf, with its relative list files."""
    conf = tmp_path / "conf"
    (conf / "lists").mkdir(parents=True)
    write(conf / "block.list", "ads.test\n")
    write(conf / "lists" / "allow.list", "ok.ads.test\n")
    return write(conf / "full.toml", NON_DEFAULT)


def test_every_key_reaches_its_setting(
    full_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # relative paths are the file's, not the working directory's
    settings = cfg.load(full_file)
    g, conf = settings.gateway, full_file.parent
    assert settings.iface == "tlwfile0" and settings.protect == (0x1D, None)
    assert g.stack == StackConfig(
        mtu=9000,
        ipv4_address=ipaddress.IPv4Address("198.18.0.9"),
        ipv6_address=ipaddress.IPv6Address("fd00:18::9"),
        client_networks=(ipaddress.ip_network("198.18.4.0/24"),),
        verify_checksums=False,
        max_tcp_connections=500,
        blocked_udp_ports=(8443,),
        blocked_udp_action="drop",
        icmp_echo="off",
    )
    assert (g.dial_timeout, g.idle_timeout, g.dial_before_accept, g.unreachable_reply) == (
        7.0,
        70.5,
        False,
        "rst",
    )
    assert (g.max_pending_dials, g.predial_claim_timeout, g.icmp_echo_idle_timeout) == (77, 3, 9)
    assert g.udp == UdpConfig(
        idle_timeout=11, dns_idle_timeout=4, sweep_interval=2, max_sessions=99, queue_datagrams=8
    )
    assert g.dns == DnsConfig(
        upstreams=(UPSTREAM, "tls://198.18.1.2#dot.test"),
        block_files=(str(conf / "block.list"),),
        allow_files=(str(conf / "lists/allow.list"),),
        overrides={"nas.home.arpa": ("198.18.9.9", "fd00:9::9"), "one.test": ("198.18.9.1",)},
        blocked_answer="refused",
        hijack="gateway",
        query_timeout=4,
        attempt_timeout=1.5,
        tcp_idle_timeout=12,
        tcp_query_timeout=6,
        reject_encrypted=True,
        cache_size=0,
        min_ttl=5,
        max_ttl=600,
        max_negative_ttl=60,
        max_in_flight=10,
    )
    assert settings.log_level == "debug" and settings.log_file == str(conf / "log/tunlwip.log")
    assert settings.grace == 0.0
    assert settings.protector().__doc__ == "fwmark 0x1d"


def test_protector_interface_and_numeric_mark(tmp_path: Path) -> None:
    assert load_text(tmp_path, "[protect]\nfwmark = 29\n").protect == (29, None)
    settings = load_text(tmp_path, '[protect]\ninterface = "eth0"\n')
    assert settings.protect == (None, "eth0") and settings.protector().__doc__ == "bind to eth0"
    assert load_text(tmp_path, "").protector().__doc__ != "fwmark"  # none


def test_sweep_interval_follows_the_idle_timeout(tmp_path: Path) -> None:
    assert load_text(tmp_path, "[udp]\nidle_timeout = 8\n").gateway.udp.sweep_interval == 4.0
    settings = load_text(tmp_path, "[udp]\nidle_timeout = 8\nsweep_interval = 1\n")
    assert settings.gateway.udp.sweep_interval == 1.0


@pytest.mark.parametrize(
    ("value", "level"),
    [('"WARNING"', "warning"), ("0", "critical"), ("3", "info"), ("5", "debug"), ('"4"', "debug")],
)
def test_log_levels_by_name_and_number(tmp_path: Path, value: str, level: str) -> None:
    assert load_text(tmp_path, f"[logging]\nlevel = {value}\n").log_level == level


# -- which file -------------------------------------------------------------------------------


def test_default_file_is_read_when_present(no_etc: Path) -> None:
    write(no_etc / "tlwdef0.toml", "[device]\nmtu = 1400\n")
    settings = cfg.load(None, {"device.name": "tlwdef0"})
    assert settings.source == no_etc / "tlwdef0.toml" and settings.gateway.stack.mtu == 1400
    assert cfg.load(None, {"device.name": "tlwdef1"}).source is None  # absent: defaults


def test_explicit_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        cfg.load(tmp_path / "missing.toml", {"device.name": "tlw0"})


def test_name_comes_from_the_file_or_the_flag(tmp_path: Path) -> None:
    path = write(tmp_path / "n.toml", '[device]\nname = "tlwfile1"\n')
    assert cfg.load(path).iface == "tlwfile1"
    assert cfg.load(path, {"device.name": "tlwflag1"}).iface == "tlwflag1"
    with pytest.raises(ConfigError, match=r"^device\.name: not set"):
        cfg.load(write(tmp_path / "e.toml", ""))


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


# -- flags -------------------------------------------------------------------------------------


def flags(*argv: str) -> dict[str, object]:
    return overrides_from_args(build_parser().parse_args(["up", *argv]))


def test_only_the_flags_given_override() -> None:
    assert flags("--iface", "tlw0") == {"device.name": "tlw0"}
    assert flags(
        "--iface",
        "tlw0",
        "--no-dial-before-accept",
        "--quic-ports",
        "8443,9443",
        "--dns-upstream",
        "udp://a",
        "--dns-upstream",
        "udp://b",
        "--fwmark",
        "0x1d",
        "--log-level",
        "4",
    ) == {
        "device.name": "tlw0",
        "tcp.dial_before_accept": False,
        "quic.ports": [8443, 9443],
        "dns.upstreams": ["udp://a", "udp://b"],
        "protect.fwmark": 0x1D,
        "logging.level": "4",
    }


def test_flags_override_the_file(full_file: Path) -> None:
    settings = cfg.load(
        full_file,
        flags(
            "--mtu",
            "1280",
            "--dns-upstream",
            "udp://198.18.1.3",
            "--bind-interface",
            "eth9",
            "--quic",
            "reject",
            "--dial-before-accept",
            "--log-level",
            "warning",
        ),
    )
    g = settings.gateway
    assert g.stack.mtu == 1280 and g.stack.blocked_udp_action == "reject"
    assert g.stack.blocked_udp_ports == (8443,)  # not given: the file's
    assert g.dns.upstreams == ("udp://198.18.1.3",)  # a list flag replaces the whole list
    assert settings.protect == (None, "eth9")  # replaces the file's fwmark
    assert g.dial_before_accept is True and settings.log_level == "warning"
    assert settings.iface == "tlwfile0"


def test_flag_paths_are_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "here.list", "x.test\n")
    monkeypatch.chdir(tmp_path)
    settings = cfg.load(None, flags("--iface", "tlw0", "--dns-block", "here.list"))
    assert settings.gateway.dns.block_files == (str(tmp_path / "here.list"),)


def test_flag_errors_name_the_key_and_flag() -> None:
    with pytest.raises(ConfigError) as exc:
        cfg.load(None, flags("--iface", "tlw0", "--mtu", "100", "--quic-ports", "0"))
    assert str(exc.value) == (
        "device.mtu: must be between 576 and 65520, got 100 (flag --mtu); "
        "quic.ports[0]: must be between 1 and 65535, got 0 "
        "(flag --quic-ports)"
    )


# -- check-config ------------------------------------------------------------------------------


def test_check_config_ok_and_bad(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write(tmp_path / "good.toml", "[device]\nmtu = 1400\n")
    assert main(["check-config", "--config", str(good), "--iface", "tlw0"]) == EXIT_OK
    assert "configuration OK" in capsys.readouterr().out
    bad = write(tmp_path / "bad.toml", '[udp]\nidle_timeout = "abc"\n[tcp]\nidel_timeout = 1\n')
    assert main(["check-config", "--config", str(bad), "--iface", "tlw0"]) == EXIT_CONFIG
    err = capsys.readouterr().err.splitlines()
    assert err == [
        'tunlwip check-config: udp.idle_timeout: expected a number, got "abc"',
        "tunlwip check-config: unknown key tcp.idel_timeout (did you mean idle_timeout?)",
    ]


def test_check_config_needs_an_interface_or_a_file() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["check-config"])
    assert exc.value.code == 2


def _print(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(["check-config", "--print", *argv]) == EXIT_OK
    return capsys.readouterr().out


def test_print_round_trips(
    full_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The printed configuration, fed back with --config from elsewhere, is the same
    configuration (flags included), and prints the same again."""
    first = _print(capsys, "--config", str(full_file), "--grace", "2.5", "--icmp", "forward")
    printed = write(tmp_path / "printed.toml", first)
    monkeypatch.chdir("/")
    original = cfg.load(full_file, flags("--grace", "2.5", "--icmp", "forward"))
    again = cfg.load(printed)
    assert again.gateway == original.gateway
    assert {opt.path: again.value(opt) for opt in SCHEMA} == {
        opt.path: original.value(opt) for opt in SCHEMA
    }
    assert dataclasses.replace(again, source=None) == dataclasses.replace(original, source=None)
    second = _print(capsys, "--config", str(printed))
    assert first.splitlines()[1:] == second.splitlines()[1:]  # all but the "from ..." header
    keys = {f"{section}.{key}" for section, key in _printed_keys(first)}
    assert keys == {opt.path for opt in SCHEMA}, "every key is printed"


def test_print_of_the_defaults_round_trips(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = _print(capsys, "--iface", "tlw0")
    assert "# fwmark: not set (none)" in text and "sweep_interval = 30.0" in text
    again = cfg.load(write(tmp_path / "d.toml", text))
    assert again.gateway == cfg.load(None, {"device.name": "tlw0"}).gateway
    assert {f"{s}.{k}" for s, k in _printed_keys(text)} == {opt.path for opt in SCHEMA}


def _printed_keys(text: str) -> Iterator[tuple[str, str]]:
    section = ""
    for line in text.splitlines():
        if m := re.match(r"\[(\w+)\]", line):
            section = m.group(1)
        elif m := re.match(r"(?:# )?(\w+)(?: =|: not set)", line):
            yield section, m.group(1)


def test_example_file_is_accepted(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--config", str(EXAMPLE)]) == EXIT_OK, capsys.readouterr().err
    settings = cfg.load(EXAMPLE)
    assert settings.iface == "dmesh1" and settings.protect == (0x1D, None)


def test_docs_examples_are_accepted(tmp_path: Path) -> None:
    blocks = re.findall(r"```toml\n(.*?)```", DOCS.read_text(), re.S)
    assert blocks, "docs/configuration.md has a TOML example"
    for i, block in enumerate(blocks):
        cfg.load(write(tmp_path / f"doc{i}.toml", block), {"device.name": "tlw0"})


# -- the docs match the schema -----------------------------------------------------------------


def documented() -> dict[str, dict[str, str]]:
    """{key path: {"type", "default", "flag"}} from the tables of docs/configuration.md."""
    rows: dict[str, dict[str, str]] = {}
    section = None
    for line in DOCS.read_text().splitlines():
        if m := re.match(r"## `\[(\w+)\]`", line):
            section = m.group(1)
        elif section and line.startswith("| `"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            key, kind, default, flag = cells[0].strip("`"), cells[1], cells[2], cells[3]
            path = f"{section}.{key}"
            assert path not in rows, f"{path} documented twice"
            rows[path] = {"type": kind, "default": default, "flag": flag}
    return rows


def test_docs_document_every_key_with_its_default_type_and_flag() -> None:
    docs = documented()
    assert list(docs) == [opt.path for opt in SCHEMA], "every key, in the order of --print"
    sections = re.findall(r"^## `\[(\w+)\]`", DOCS.read_text(), re.M)
    assert sections == list(cfg.SECTIONS), "one docs section per schema section, same order"
    for opt in SCHEMA:
        doc = docs[opt.path]
        assert doc["default"] == opt.default_text, opt.path
        assert doc["type"] == opt.kind.doc, opt.path
        flags_cell = re.findall(r"`(--[\w-]+)`", doc["flag"])
        assert flags_cell[:1] == ([opt.cli] if opt.cli else []), opt.path


def test_every_flag_of_up_is_in_the_schema() -> None:
    """No flag bypasses the schema (--config itself and the process's own outputs excepted)."""
    up = build_parser()._subparsers._group_actions[0].choices["up"]  # type: ignore[union-attr,index]
    options = {s for a in up._actions for s in a.option_strings if s.startswith("--")}
    schema_flags = {opt.cli for opt in SCHEMA if opt.cli}
    expected = {
        "--help",
        "--config",
        "--no-dial-before-accept",
        "--no-offload",
        "--no-dns-reject-encrypted",
        "--control-socket",
        "--flow-log",
    }
    assert options - schema_flags == expected


# -- `tunlwip up` exits 78 before touching the TUN ---------------------------------------------


def test_up_with_a_bad_file_exits_78(tmp_path: Path) -> None:
    """No root needed: the configuration is checked before the TUN is opened."""
    bad = write(tmp_path / "bad.toml", '[udp]\nidle_timeout = "abc"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "tunlwip", "up", "--config", str(bad), "--iface", "tlwbad0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == EXIT_CONFIG, proc.stderr
    assert 'udp.idle_timeout: expected a number, got "abc"' in proc.stderr


def test_up_with_a_missing_file_exits_78(tmp_path: Path) -> None:
    assert main(["up", "--config", str(tmp_path / "nope.toml"), "--iface", "tlw0"]) == EXIT_CONFIG


def test_up_with_an_unopenable_log_file_exits_78(tmp_path: Path) -> None:
    log_file = tmp_path / "no-such-dir" / "x.log"
    assert main(["up", "--iface", "tlw0", "--log-file", str(log_file)]) == EXIT_CONFIG


# -- reload -------------------------------------------------------------------------------------


async def test_reload_applies_a_new_file_and_keeps_the_old_on_errors(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """What SIGHUP does, on a memory device: policy changes apply, restart-only ones are named
    in one warning, a broken file changes nothing."""
    block = write(tmp_path / "block.list", "ads.test\n")
    path = write(
        tmp_path / "r.toml",
        f'[quic]\nports = [443]\n[dns]\nupstreams = ["{UPSTREAM}"]\nblock_lists = ["block.list"]\n',
    )
    reloader = Reloader(str(path), {"device.name": "tlw0", "protect.fwmark": 7})
    running = reloader.load()
    gateway = Gateway(MemoryDevice(), running.gateway, protector=running.protector())
    assert gateway.dns is not None
    caplog.set_level(logging.INFO, logger="tunlwip")

    block.write_text("ads.test\nlater.test\n")
    path.write_text(path.read_text().replace("[443]", "[8443, 9443]") + "[device]\nmtu = 9000\n")
    current = reload(gateway, running, running, reloader)
    assert gateway.config.stack.blocked_udp_ports == (8443, 9443)
    assert gateway.stack.config.blocked_udp_ports == (8443, 9443)
    assert len(gateway.dns.policy) == 2 and current.gateway.stack.mtu == 9000
    assert gateway.config.stack.mtu == 1500  # needs a restart
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["reload: these settings need a restart: device.mtu"]
    info = [r.getMessage() for r in caplog.records if r.getMessage().startswith("reloaded ")]
    assert info == [
        f"reloaded {path}: 2 DNS rules, upstreams {UPSTREAM}, quic reject 8443,9443, icmp reply"
    ]

    caplog.clear()
    path.write_text(path.read_text().replace("[8443, 9443]", '"many"'))
    assert reload(gateway, running, current, reloader) is current
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [
        "reload: configuration not reloaded, keeping the old one: quic.ports: "
        'expected a list, got "many"'
    ]
    assert gateway.config.stack.blocked_udp_ports == (8443, 9443)

    caplog.clear()  # a protection change is named too; the flags still apply on reload
    path.write_text('[protect]\ninterface = "eth0"\n')
    current = reload(gateway, running, current, reloader)
    assert current.protect == (7, None), "the --fwmark flag still overrides the file"
    path.write_text("[device]\nmtu = 1500\n")
    reloader.overrides.pop("protect.fwmark")
    reload(gateway, running, current, reloader)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["reload: these settings need a restart: protect.fwmark"]
    assert gateway.protect_mode == "fwmark 0x7"
    await trio.lowlevel.checkpoint()


# -- logging ------------------------------------------------------------------------------------

#: `tunlwip up` with a bad file, its stderr made the journal stream when argv[1] is "journal".
JOURNALD_SCRIPT = r"""
import os, sys
from tunlwip.cli import main
if sys.argv[1] == "journal":
    st = os.fstat(2)
    os.environ["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
sys.exit(main(["up", "--iface", "tlw0", "--config", sys.argv[2]]))
"""


@pytest.mark.parametrize("where", ["journal", "terminal"])
def test_no_timestamps_under_journald(where: str, tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.toml", "[udp]\nidle_timeout = -1\n")
    proc = subprocess.run([sys.executable, "-c", JOURNALD_SCRIPT, where, str(bad)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == EXIT_CONFIG
    line = "ERROR tunlwip: bad configuration: udp.idle_timeout: must be > 0, got -1\n"
    if where == "journal":
        assert proc.stderr == "<3>" + line  # journald's priority prefix, no timestamp
    else:
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} " + re.escape(line), proc.stderr)


def test_log_file_is_appended_and_reopened(tmp_path: Path) -> None:
    """--log-file appends with timestamps; each configure_logging (SIGHUP) reopens the file,
    so a rotated log is recreated."""
    path = tmp_path / "gw.log"
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        configure_logging("debug", str(path))
        logging.getLogger("tunlwip.test").debug("first")
        path.rename(tmp_path / "gw.log.1")
        configure_logging("warning", str(path))
        logging.getLogger("tunlwip.test").info("dropped")
        logging.getLogger("tunlwip.test").warning("second")
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        root.setLevel(level)
    assert (tmp_path / "gw.log.1").read_text().endswith(" DEBUG tunlwip.test: first\n")
    assert path.read_text().endswith(" WARNING tunlwip.test: second\n")
    assert "dropped" not in path.read_text()


def test_reject_encrypted_flag_overrides_the_file(tmp_path: Path) -> None:
    on = "[dns]\nreject_encrypted = true\n"
    assert load_text(tmp_path, on).gateway.dns.reject_encrypted is True
    off = flags("--iface", "tlw0", "--no-dns-reject-encrypted")
    assert off == {"device.name": "tlw0", "dns.reject_encrypted": False}
    assert load_text(tmp_path, on, **off).gateway.dns.reject_encrypted is False
    assert flags("--dns-reject-encrypted")["dns.reject_encrypted"] is True


# -- TCP liveness: no idle limit by default, keepalive ------------------------------------------


def test_tcp_flows_have_keepalive_and_no_idle_limit_by_default(tmp_path: Path) -> None:
    """Quiet flows live (no idle limit); keepalive finds the dead ones."""
    g = load_text(tmp_path, "").gateway
    assert g.idle_timeout is None
    assert g.keepalive == Keepalive(idle=120, interval=15, count=4)
    assert g.keepalive is not None and g.keepalive.budget == 180


@pytest.mark.parametrize("off", ['"off"', "0", "0.0"])
def test_idle_timeout_and_keepalive_can_be_off(tmp_path: Path, off: str) -> None:
    settings = load_text(tmp_path, f"[tcp]\nidle_timeout = {off}\nkeepalive_idle = {off}\n")
    assert settings.gateway.idle_timeout is None and settings.gateway.keepalive is None
    text = settings.to_toml()
    assert 'idle_timeout = "off"' in text and 'keepalive_idle = "off"' in text
    assert load_text(tmp_path, text).gateway == settings.gateway


def test_idle_timeout_and_keepalive_settings(tmp_path: Path) -> None:
    text = "[tcp]\nidle_timeout = 3600\nkeepalive_idle = 60\nkeepalive_interval = 10\n" \
        "keepalive_count = 5\n"  # fmt: skip
    g = load_text(tmp_path, text).gateway
    assert g.idle_timeout == 3600.0 and g.keepalive == Keepalive(60, 10, 5)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('idle_timeout = "never"', 'tcp.idle_timeout: expected a number or "off", got "never"'),
        ("idle_timeout = -1", "tcp.idle_timeout: must be > 0, got -1"),
        ("keepalive_idle = 1.5", 'tcp.keepalive_idle: expected an integer or "off", got 1.5'),
        ("keepalive_idle = 40000", "tcp.keepalive_idle: must be between 1 and 32767, got 40000"),
        ("keepalive_count = 0", "tcp.keepalive_count: must be between 1 and 127, got 0"),
    ],
)
def test_bad_liveness_settings_name_their_key(tmp_path: Path, text: str, message: str) -> None:
    assert problems(tmp_path, f"[tcp]\n{text}\n") == [message]


def test_liveness_flags() -> None:
    given = flags("--idle-timeout", "off", "--keepalive-idle", "30", "--keepalive-interval",
                  "5", "--keepalive-count", "3")  # fmt: skip
    settings = cfg.load(None, {"device.name": "tlw0", **given})
    assert settings.gateway.idle_timeout is None
    assert settings.gateway.keepalive == Keepalive(30, 5, 3)
    on = cfg.load(None, {"device.name": "tlw0", **flags("--idle-timeout", "2.5")})
    assert on.gateway.idle_timeout == 2.5
    off = cfg.load(None, {"device.name": "tlw0", **flags("--keepalive-idle", "0")})
    assert off.gateway.keepalive is None


def test_gateway_config_checks_keepalive() -> None:
    with pytest.raises(ValueError, match=r"tcp\.keepalive_count: must be between 1 and 127"):
        GatewayConfig(keepalive_count=0)
    with pytest.raises(ValueError, match=r"tcp\.idle_timeout: must be > 0, got 0"):
        GatewayConfig(idle_timeout=0)
    assert GatewayConfig(keepalive_idle=None).keepalive is None
