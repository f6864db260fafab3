"""The configuration file and flags reach the settings (tunlwip.config, tunlwip.cli).

Why: operators meet the configuration first; every key must reach its setting with the
documented default, the default file must be found by the interface's name, and flags must
override the file (paths relative to the working directory). The errors are in
test_config_errors.py, the commands, docs, reload and logging in test_config_cli.py.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path

import pytest

from tunlwip import DnsConfig, GatewayConfig, StackConfig
from tunlwip import config as cfg
from tunlwip.config import SCHEMA
from tunlwip.dialer import Keepalive
from tunlwip.errors import ConfigError
from tunlwip.udp import UdpConfig

from configfiles import UPSTREAM, flags, load_text, problems, write
from configfiles import full_file as full_file
from configfiles import no_etc as no_etc

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
    struct, or the [[route]] and [[dns.route]] tables: test_config_routes.py,
    test_config_dns_routes.py), and the file's defaults are the
    structs' but for the documented exceptions."""
    nested = {"stack", "udp", "dns", "routes"}
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
            if f.name == "routes" and owner is DnsConfig:  # [[dns.route]]: test_config_dns_routes
                continue
            opt = keys[prefix + f.name]
            struct_default = f.default_factory() if callable(f.default_factory) else f.default
            if opt.path not in ("device.client_networks", "udp.sweep_interval"):
                assert opt.default == struct_default, opt.path
    assert cfg.OPTIONS["device.client_networks"].default == tuple(
        map(ipaddress.ip_network, ("198.18.0.0/15", "fd00:18::/64"))
    )
    assert cfg.OPTIONS["udp.sweep_interval"].default is None  # min(30, idle / 2)


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


# -- flags -------------------------------------------------------------------------------------


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
