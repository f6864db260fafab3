"""The configuration of ``tunlwip up``: one declarative schema and everything derived from it.

Why one table: the TOML loader, the command-line flags, ``check-config --print`` and the check
of docs/configuration.md all read ``SCHEMA``, so a key cannot exist in one of them and be
missing (or have another default) in the others.

Precedence: built-in defaults < the config file < the command-line flags actually given. The
file is ``--config PATH`` (which must exist) or else ``/etc/tunlwip/<iface>.toml`` when present.
Every problem is a ``ConfigError`` whose message starts with the key path
(``udp.idle_timeout: expected a number, got "abc"``); all problems of a file are reported at
once.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import ipaddress
import json
import math
import os
import ssl
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .dialer import Dialer, Protector, bind_interface, fwmark, no_protection
from .dns.policy import DnsPolicy
from .dns.proxy import DnsConfig
from .dns.upstreams import parse_upstream
from .errors import ConfigError
from .gateway import GatewayConfig
from .ifname import is_interface_name
from .service import LOG_LEVELS, NUMERIC_LOG_LEVELS
from .stack import StackConfig
from .udp import UdpConfig

__all__ = [
    "CONFIG_DIR",
    "OPTIONS",
    "SCHEMA",
    "SECTIONS",
    "ConfigProblems",
    "Option",
    "Settings",
    "config_key",
    "default_path",
    "load",
    "parse_listen",
]

CONFIG_DIR = Path("/etc/tunlwip")


class ConfigProblems(ConfigError):
    """Several problems at once (each names its key path); ``str`` joins them with "; "."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


def _show(value: object) -> str:
    """A value as TOML would spell it, for messages (``"abc"``, ``true``, ``[1, 2]``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_show(k)} = {_show(v)}" for k, v in value.items()) + "}"
    return str(value)


def _reason(exc: ConfigError) -> str:
    """Strip the "DNS upstream 'x': " style prefix: the key path replaces it."""
    text = str(exc)
    return text.split(": ", 1)[1] if text.startswith("DNS ") and ": " in text else text


# -- kinds: how one option's values are read, checked and written ----------------------------


class Kind:
    """A value type: parse (TOML value -> Python value), dump (-> TOML), argparse settings."""

    doc = ""  #: the type column of docs/configuration.md
    expected = ""  #: "a number": in "expected a number, got ..."

    def parse(self, value: object, where: str, base: Path | None) -> Any:
        raise NotImplementedError

    def dump(self, value: Any) -> str:
        return _show(value)

    def argparse(self) -> dict[str, Any]:
        """Keyword arguments for ``add_argument``: the flag's text becomes a TOML-like value."""
        return {}

    def wrong(self, where: str, value: object) -> ConfigError:
        return ConfigError(f"{where}: expected {self.expected}, got {_show(value)}")


class Number(Kind):
    """A finite float (TOML integers accepted); ``minimum`` inclusive, ``positive`` strict."""

    expected = "a number"

    def __init__(self, *, positive: bool = False, minimum: float | None = None) -> None:
        self.positive, self.minimum = positive, minimum
        self.doc = "number > 0" if positive else f"number >= {minimum:g}" if minimum is not None \
            else "number"  # fmt: skip

    def parse(self, value: object, where: str, base: Path | None) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.wrong(where, value)
        number = float(value)
        if not math.isfinite(number):
            raise ConfigError(f"{where}: must be a finite number, got {_show(value)}")
        if self.positive and number <= 0:
            raise ConfigError(f"{where}: must be > 0, got {_show(value)}")
        if self.minimum is not None and number < self.minimum:
            raise ConfigError(f"{where}: must be >= {self.minimum:g}, got {_show(value)}")
        return number

    def dump(self, value: Any) -> str:
        return repr(float(value))

    def argparse(self) -> dict[str, Any]:
        return {"type": float, "metavar": "SECONDS"}


class Integer(Kind):
    """An int within [minimum, maximum] (bounds optional)."""

    expected = "an integer"

    def __init__(self, minimum: int | None = None, maximum: int | None = None) -> None:
        self.minimum, self.maximum = minimum, maximum
        if minimum is not None and maximum is not None:
            self.doc = f"integer {minimum}-{maximum}"
        else:
            self.doc = f"integer >= {minimum}" if minimum is not None else "integer"

    def parse(self, value: object, where: str, base: Path | None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.wrong(where, value)
        low, high = self.minimum, self.maximum
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"between {low} and {high}" if low is not None and high is not None \
                else f">= {low}" if low is not None else f"<= {high}"  # fmt: skip
            raise ConfigError(f"{where}: must be {bounds}, got {value}")
        return value

    def argparse(self) -> dict[str, Any]:
        return {"type": int, "metavar": "N"}


class OffOr(Kind):
    """``inner``'s values, or "off" (and 0) for "none": a limit an operator may leave out.
    Off is None, which ``--print`` writes as "off" (a commented-out key would mean the
    default, which may be on)."""

    OFF = "off"

    def __init__(self, inner: Kind) -> None:
        self.inner = inner
        self.doc = f'{inner.doc}, or "off" (or 0)'
        self.expected = f'{inner.expected} or "off"'

    def parse(self, value: object, where: str, base: Path | None) -> Any:
        if value == self.OFF or (not isinstance(value, bool) and value == 0):
            return None
        if isinstance(value, str):  # from the command line: a number, spelt as text
            try:
                value = float(value) if isinstance(self.inner, Number) else int(value)
            except ValueError:
                raise self.wrong(where, value) from None
            if value == 0:
                return None
        if isinstance(value, str):
            raise self.wrong(where, value)
        try:
            return self.inner.parse(value, where, base)
        except ConfigError as exc:
            if str(exc).startswith(f"{where}: expected "):  # a wrong type: name "off" too
                raise self.wrong(where, value) from None
            raise

    def dump(self, value: Any) -> str:
        return self.inner.dump(value)

    def argparse(self) -> dict[str, Any]:
        metavar = self.inner.argparse().get("metavar", "VALUE")
        return {"metavar": f"{metavar}|off"}


class Boolean(Kind):
    doc, expected = "boolean", "true or false"

    def parse(self, value: object, where: str, base: Path | None) -> bool:
        if not isinstance(value, bool):
            raise self.wrong(where, value)
        return value

    def argparse(self) -> dict[str, Any]:
        return {"action": argparse.BooleanOptionalAction}


class Choice(Kind):
    def __init__(self, *values: str) -> None:
        self.values = values
        self.doc = "one of " + ", ".join(f'"{v}"' for v in values)
        self.expected = self.doc

    def parse(self, value: object, where: str, base: Path | None) -> str:
        if value not in self.values:
            raise self.wrong(where, value)
        assert isinstance(value, str)
        return value

    def argparse(self) -> dict[str, Any]:
        return {"choices": list(self.values)}


class Address(Kind):
    def __init__(self, version: int) -> None:
        self.version = version
        self.doc = f"IPv{version} address"
        self.expected = f"an {self.doc}"

    def parse(self, value: object, where: str, base: Path | None) -> Any:
        try:
            address = ipaddress.ip_address(value)  # type: ignore[arg-type]
        except ValueError:
            raise self.wrong(where, value) from None
        if isinstance(value, int) or address.version != self.version:
            raise self.wrong(where, value)
        return address

    def dump(self, value: Any) -> str:
        return _show(str(value))

    def argparse(self) -> dict[str, Any]:
        return {"metavar": "ADDR"}


class Network(Kind):
    doc, expected = "CIDR network", 'a network such as "198.18.0.0/15"'

    def parse(self, value: object, where: str, base: Path | None) -> Any:
        if not isinstance(value, str):
            raise self.wrong(where, value)
        try:
            return ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise self.wrong(where, value) from None

    def dump(self, value: Any) -> str:
        return _show(str(value))

    def argparse(self) -> dict[str, Any]:
        return {"metavar": "CIDR"}


def _int_auto(text: str) -> int:
    """``29`` or ``0x1d`` (argparse names the function in its message: "invalid int value")."""
    return int(text, 0)


_int_auto.__name__ = "int"


class Mark(Kind):
    """SO_MARK: an integer, or a string in any base Python reads (``"0x1d"``)."""

    doc, expected = "integer 1-4294967295 or hex string", 'an integer or a string like "0x1d"'

    def parse(self, value: object, where: str, base: Path | None) -> int:
        mark = value
        if isinstance(value, str):
            try:
                mark = int(value, 0)
            except ValueError:
                raise self.wrong(where, value) from None
        if isinstance(mark, bool) or not isinstance(mark, int):
            raise self.wrong(where, value)
        if not 0 < mark < 2**32:
            raise ConfigError(f"{where}: must be between 1 and 4294967295, got {_show(value)}")
        return mark

    def dump(self, value: Any) -> str:
        return _show(hex(value))

    def argparse(self) -> dict[str, Any]:
        return {"type": _int_auto, "metavar": "MARK"}


class IfName(Kind):
    """A Linux interface name: 1-15 bytes, no "/", ":" or whitespace."""

    doc, expected = "interface name", "an interface name (1-15 characters)"

    def parse(self, value: object, where: str, base: Path | None) -> str:
        if not isinstance(value, str) or not is_interface_name(value):
            raise self.wrong(where, value)
        return value

    def argparse(self) -> dict[str, Any]:
        return {"metavar": "IF"}


class FilePath(Kind):
    """A path; relative ones are resolved against the config file's directory (or, given as a
    flag, the working directory), so the printed configuration works from anywhere."""

    doc, expected = "path", "a path"

    def __init__(self, *, readable: bool) -> None:
        self.readable = readable

    def parse(self, value: object, where: str, base: Path | None) -> str:
        if not isinstance(value, str) or not value:
            raise self.wrong(where, value)
        path = os.path.abspath(base / value if base is not None else value)
        if self.readable:
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                raise ConfigError(f"{where}: cannot read {path}: {exc.strerror}") from None
        return path

    def argparse(self) -> dict[str, Any]:
        return {"metavar": "FILE"}


class CaBundle(FilePath):
    """A PEM file of CA certificates (loaded once here, so a bad one is a config error)."""

    def __init__(self) -> None:
        super().__init__(readable=True)

    def parse(self, value: object, where: str, base: Path | None) -> str:
        path = super().parse(value, where, base)
        try:
            ssl.create_default_context(cafile=path)
        except ssl.SSLError as exc:
            raise ConfigError(f"{where}: not a PEM CA bundle: {path} ({exc.reason})") from None
        return path


_VALIDATING_DIALER = Dialer()


class UpstreamUrl(Kind):
    doc, expected = "upstream URL", "an upstream URL"

    def parse(self, value: object, where: str, base: Path | None) -> str:
        if not isinstance(value, str):
            raise self.wrong(where, value)
        try:
            parse_upstream(value, _VALIDATING_DIALER)  # builds nothing that needs closing
        except ConfigError as exc:
            raise ConfigError(f"{where}: not a valid upstream URL: {_reason(exc)}") from None
        return value.strip()

    def argparse(self) -> dict[str, Any]:
        return {"metavar": "URL"}


class LogLevel(Kind):
    doc = "one of " + ", ".join(f'"{v}"' for v in LOG_LEVELS) + " or 0-5"
    expected = doc

    def parse(self, value: object, where: str, base: Path | None) -> str:
        if isinstance(value, str) and value.lower() in LOG_LEVELS:
            return value.lower()
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 5:
            return NUMERIC_LOG_LEVELS[value]
        raise self.wrong(where, value)

    def argparse(self) -> dict[str, Any]:
        return {"type": str.lower, "choices": [*LOG_LEVELS, *map(str, range(6))]}


def parse_listen(text: str) -> tuple[str, int]:
    """``ADDR:PORT`` (``[V6ADDR]:PORT`` for IPv6) as (address, port); ValueError if not."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise ValueError(f"expected ADDR:PORT (port 1-65535), got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ipaddress.ip_address(host).version != 6:
            raise ValueError(f"brackets are for IPv6 addresses, got {text!r}")
    elif ipaddress.ip_address(host).version != 4:
        raise ValueError(f"an IPv6 address goes in brackets ([::1]:9100), got {text!r}")
    return host, int(port_text)


class Listen(Kind):
    """``ADDR:PORT`` to listen on (IPv6 in brackets), checked with ``parse_listen``."""

    doc, expected = '"ADDR:PORT"', 'an address and port such as "127.0.0.1:9100"'

    def parse(self, value: object, where: str, base: Path | None) -> str:
        if not isinstance(value, str):
            raise self.wrong(where, value)
        try:
            _, port = parse_listen(value)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if port == 0:  # a port picked at random is no use to a scraper
            raise ConfigError(f"{where}: expected ADDR:PORT (port 1-65535), got {_show(value)}")
        return value

    def argparse(self) -> dict[str, Any]:
        return {"metavar": "ADDR:PORT"}


class ListOf(Kind):
    """A TOML array; as a flag either repeated (``append``) or comma-separated (``comma``)."""

    expected = "a list"

    def __init__(self, item: Kind, *, max_items: int | None = None, cli: str = "append") -> None:
        self.item, self.max_items, self.cli = item, max_items, cli
        self.doc = f"list of {item.doc}" + (f" (at most {max_items})" if max_items else "")

    def parse(self, value: object, where: str, base: Path | None) -> tuple[Any, ...]:
        if not isinstance(value, list | tuple):
            raise self.wrong(where, value)
        if self.max_items is not None and len(value) > self.max_items:
            raise ConfigError(f"{where}: at most {self.max_items} entries, got {len(value)}")
        return tuple(self.item.parse(v, f"{where}[{i}]", base) for i, v in enumerate(value))

    def dump(self, value: Any) -> str:
        return "[" + ", ".join(self.item.dump(v) for v in value) + "]"

    def argparse(self) -> dict[str, Any]:
        item = self.item.argparse()
        if self.cli == "append":
            return {**item, "action": "append"}
        convert: Callable[[str], object] = item.get("type", str)

        def comma_list(text: str) -> list[object]:
            return [convert(part.strip()) for part in text.split(",") if part.strip()]

        comma_list.__name__ = "comma-separated list"
        return {"type": comma_list, "metavar": item.get("metavar", "LIST") + ",..."}


class Overrides(Kind):
    """A table: DNS name -> address or list of addresses."""

    doc, expected = "table: name = list of addresses", "a table of name = [addresses]"

    def parse(self, value: object, where: str, base: Path | None) -> dict[str, tuple[str, ...]]:
        if not isinstance(value, dict):
            raise self.wrong(where, value)
        result: dict[str, tuple[str, ...]] = {}
        for name, addresses in value.items():
            here = f"{where}.{_show(name)}"
            items = [addresses] if isinstance(addresses, str) else addresses
            if not isinstance(items, list) or not all(isinstance(a, str) for a in items):
                raise ConfigError(f"{here}: expected an address or a list of addresses, got "
                                  f"{_show(addresses)}")  # fmt: skip
            try:
                DnsPolicy(overrides={name: items})
            except ConfigError as exc:
                raise ConfigError(f"{here}: {_reason(exc)}") from None
            result[name] = tuple(str(ipaddress.ip_address(a)) for a in items)
        return result

    def dump(self, value: Any) -> str:
        return _show({name: list(addresses) for name, addresses in value.items()})


# -- the schema ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Option:
    """One configuration key. ``field`` is where it goes in GatewayConfig ("stack.mtu"); None
    for the command's own settings (interface name, protection, logging, grace)."""

    path: str
    kind: Kind
    default: Any
    help: str
    cli: str | None = None
    field: str | None = None
    #: What an unset value (default None) means, for the docs and ``--print``.
    unset: str = ""

    @property
    def section(self) -> str:
        return self.path.split(".", 1)[0]

    @property
    def key(self) -> str:
        return self.path.split(".", 1)[1]

    @property
    def dest(self) -> str:
        """The argparse destination of the flag."""
        return "cfg_" + self.path.replace(".", "__")

    @property
    def default_text(self) -> str:
        """The default as docs/configuration.md shows it."""
        return f"`{self.kind.dump(self.default)}`" if self.default is not None else self.unset


SECTIONS: dict[str, str] = {
    "device": "the TUN interface and lwIP's side of it",
    "protect": "how the gateway's own sockets are kept out of the TUN",
    "tcp": "TCP flows",
    "udp": "UDP sessions",
    "quic": "UDP to the QUIC ports",
    "icmp": "ICMP echo (ping)",
    "dns": "the built-in DNS proxy",
    "metrics": "the Prometheus endpoint",
    "logging": "log output",
    "limits": "shutdown",
}

_v4, _v6 = ipaddress.IPv4Address, ipaddress.IPv6Address
_net = ipaddress.ip_network
_positive = Number(positive=True)
#: What an unset per-client share means (``shares.share_of``).
_AUTO_SHARE = "max(16, 1/4 of `{0}`), at most `{0}`"

SCHEMA: tuple[Option, ...] = (
    Option("device.name", IfName(), None, "TUN interface to create or attach to", "--iface",
           unset="the `--iface` value"),
    Option("device.mtu", Integer(576, 65520), 1500, "interface MTU", "--mtu", "stack.mtu"),
    Option("device.txqueuelen", Integer(1, 1_000_000), None, "packets the kernel queues "
           "for the gateway to read before it drops", "--txqueuelen",
           unset="auto: 16 MiB of MTU-sized packets, 500 to 10000"),
    Option("device.ipv4", Address(4), _v4("198.18.0.1"), "lwIP's IPv4 address (also the DNS "
           "proxy's)", "--gateway4", "stack.ipv4_address"),
    Option("device.ipv6", Address(6), _v6("fd00:18::1"), "lwIP's IPv6 address (also the DNS "
           "proxy's)", "--gateway6", "stack.ipv6_address"),
    Option("device.client_networks", ListOf(Network(), max_items=16),
           (_net("198.18.0.0/15"), _net("fd00:18::/64")),
           "only packets from these sources are processed (empty: any source)", "--client-net",
           "stack.client_networks"),
    Option("device.offload", Boolean(), True, "open the TUN with a virtio-net header: a "
           "connection's TCP segments reach the kernel in one write (GSO), checksums left to "
           "it; off, one write per packet as lwIP sent it (for captures on the TUN)", "--offload"),
    Option("device.verify_checksums", Boolean(), True,
           "verify IP/TCP/UDP checksums of client packets", None, "stack.verify_checksums"),
    Option("device.forward_local_destinations", Boolean(), False, "forward to the gateway "
           "host's loopback and link-local networks (127/8, 0/8, 169.254/16, ::1, fe80::/10) "
           "and its own addresses; off, such packets are refused", None,
           "stack.forward_local_destinations"),
    Option("protect.fwmark", Mark(), None, "SO_MARK for the gateway's sockets (pair with `ip "
           "rule add not fwmark N table T`)", "--fwmark", unset="none"),
    Option("protect.interface", IfName(), None, "SO_BINDTODEVICE: bind the gateway's sockets "
           "to this uplink", "--bind-interface", unset="none"),
    Option("tcp.dial_timeout", _positive, 30.0, "upstream connect timeout, seconds",
           "--dial-timeout", "dial_timeout"),
    Option("tcp.idle_timeout", OffOr(_positive), None, "TCP flows with no byte moved for "
           "this many seconds are reset", "--idle-timeout", "idle_timeout",
           unset="off"),
    Option("tcp.keepalive_idle", OffOr(Integer(1, 32767)), 120, "a TCP flow quiet this many "
           "seconds is probed with keepalives, on its upstream socket and toward its client "
           "(off: never)", "--keepalive-idle", "keepalive_idle", unset="off"),
    Option("tcp.keepalive_interval", Integer(1, 32767), 15, "seconds between keepalive probes",
           "--keepalive-interval", "keepalive_interval"),
    Option("tcp.keepalive_count", Integer(1, 127), 4, "unanswered probes after which the "
           "flow is reset: a vanished end is found within idle + interval x count seconds of "
           "its last packet", "--keepalive-count", "keepalive_count"),
    Option("tcp.dial_before_accept", Boolean(), True, "hold a client's SYN until the real "
           "destination accepted", "--dial-before-accept", "dial_before_accept"),
    Option("tcp.unreachable", Choice("icmp", "rst"), "icmp", "answer for unreachable "
           "destinations", "--unreachable", "unreachable_reply"),
    Option("tcp.max_pending_dials", Integer(1), 1024, "SYNs held while dialing at most; "
           "beyond it new ones are refused", None, "max_pending_dials"),
    Option("tcp.max_pending_dials_per_client", Integer(1), None, "SYNs one client (IPv4 "
           "address, IPv6 /64) may have held while dialing; beyond it its new ones are refused "
           "with RST", None, "max_pending_dials_per_client",
           unset=_AUTO_SHARE.format("tcp.max_pending_dials")),
    Option("tcp.claim_timeout", _positive, 10.0, "how long a connection dialed for a held SYN "
           "waits for the client's handshake, seconds", None, "predial_claim_timeout"),
    Option("tcp.max_connections", Integer(1), 65536, "new connections beyond this many open "
           "ones are refused with RST", None, "stack.max_tcp_connections"),
    Option("tcp.max_half_open", Integer(1), 1024, "connections whose handshake is not yet "
           "complete at most (SYN floods); a new one beyond it resets the oldest", None,
           "stack.max_half_open"),
    Option("tcp.max_connections_per_client", Integer(1), None, "connections one client (IPv4 "
           "address, IPv6 /64) may have open or being dialed; beyond it its new ones are "
           "refused with RST", None, "stack.max_tcp_connections_per_client",
           unset=_AUTO_SHARE.format("tcp.max_connections")),
    Option("tcp.max_buffered_bytes", Integer(1), 64 * 1024 * 1024, "client bytes held unread "
           "in Python streams (custom handlers, DNS over TCP) over all connections; while more "
           "are held, new connections are refused with RST", None, "stack.max_buffered_bytes"),
    Option("tcp.max_buffered_bytes_per_connection", Integer(1), 256 * 1024, "client bytes "
           "one Python stream holds unread; beyond them lwIP keeps the data (at most its "
           "256 KiB window) until the stream is read", None,
           "stack.max_buffered_bytes_per_connection"),
    Option("udp.idle_timeout", _positive, 60.0, "close UDP sessions idle this long in both "
           "directions, seconds", "--udp-idle-timeout", "udp.idle_timeout"),
    Option("udp.dns_idle_timeout", _positive, 10.0, "idle timeout of port-53 sessions "
           "forwarded as plain UDP, seconds", None, "udp.dns_idle_timeout"),
    Option("udp.sweep_interval", _positive, None, "how often idle sessions are looked for, "
           "seconds", None, "udp.sweep_interval", unset="min(30, `udp.idle_timeout` / 2)"),
    Option("udp.max_sessions", Integer(1), 4096, "sessions open at most; see "
           "`udp.when_full`", "--max-udp-sessions", "udp.max_sessions"),
    Option("udp.when_full", Choice("refuse", "evict"), "refuse", "a new flow at "
           "`udp.max_sessions`: refused with ICMP port unreachable, or it replaces the least "
           "recently active session", None, "udp.when_full"),
    Option("udp.max_sessions_per_client", Integer(1), None, "sessions one client (IPv4 "
           "address, IPv6 /64) may hold; beyond it its new flows are refused with ICMP port "
           "unreachable, or with `udp.when_full = \"evict\"` replace its own least recently "
           "active session", None,
           "udp.max_sessions_per_client", unset=_AUTO_SHARE.format("udp.max_sessions")),
    Option("udp.queue_datagrams", Integer(1), 512, "client datagrams queued per session; "
           "beyond it they are dropped", None, "udp.queue_datagrams"),
    Option("quic.mode", Choice("reject", "drop", "off"), "reject", "UDP to the QUIC ports: "
           "ICMP port unreachable, silent drop, or forwarded", "--quic",
           "stack.blocked_udp_action"),
    Option("quic.ports", ListOf(Integer(1, 65535), cli="comma"), (443, 80),
           "UDP destination ports `quic.mode` applies to", "--quic-ports",
           "stack.blocked_udp_ports"),
    Option("icmp.echo", Choice("reply", "forward", "off"), "reply", "echo requests to any "
           "address: answer here, forward with ping sockets, or ignore", "--icmp",
           "stack.icmp_echo"),
    Option("icmp.idle_timeout", _positive, 30.0, "a forwarded ping's socket is closed after "
           "this many idle seconds", None, "icmp_echo_idle_timeout"),
    Option("dns.hijack", Choice("all", "gateway", "off"), "all", "port-53 traffic the proxy "
           "answers: to any address, to the gateway's only, or none", "--dns-hijack",
           "dns.hijack"),
    Option("dns.upstreams", ListOf(UpstreamUrl()), (), "upstreams, tried in order (empty: "
           "the nameservers of /etc/resolv.conf)", "--dns-upstream", "dns.upstreams"),
    Option("dns.block_lists", ListOf(FilePath(readable=True)), (), "block list files "
           "(domains or hosts format)", "--dns-block", "dns.block_files"),
    Option("dns.allow_lists", ListOf(FilePath(readable=True)), (), "allow list files; they "
           "win over block lists", "--dns-allow", "dns.allow_files"),
    Option("dns.blocked_answer", Choice("nxdomain", "null", "refused"), "nxdomain",
           "answer for blocked names", "--dns-blocked-answer", "dns.blocked_answer"),
    Option("dns.overrides", Overrides(), {}, "static answers: name = [addresses]", None,
           "dns.overrides"),
    Option("dns.ca_file", CaBundle(), None, "CA bundle for tls:// and https:// "
           "upstreams", "--dns-ca-file", "dns.ca_file", unset="the system's CA store"),
    Option("dns.query_timeout", _positive, 5.0, "a query without an answer after this many "
           "seconds gets SERVFAIL", None, "dns.query_timeout"),
    Option("dns.attempt_timeout", _positive, 2.0, "seconds one upstream gets before the next "
           "is tried", None, "dns.attempt_timeout"),
    Option("dns.tcp_idle_timeout", _positive, 30.0, "a client's DNS-over-TCP connection idle "
           "this many seconds is closed", None, "dns.tcp_idle_timeout"),
    Option("dns.tcp_query_timeout", _positive, 10.0, "a DNS-over-TCP query must arrive whole "
           "within this many seconds of its first byte, and its answer be read by the client "
           "within as many; else the connection is reset (counted: tcp_timeouts)", None,
           "dns.tcp_query_timeout"),
    Option("dns.reject_encrypted", Boolean(), False, "refuse encrypted DNS that would bypass "
           "the proxy: TCP to port 853 gets RST and UDP to it ICMP port unreachable (DoT, DoQ; "
           "counted: refused.encrypted_dns), and well-known DoH resolver names are blocked",
           "--dns-reject-encrypted", "dns.reject_encrypted"),
    Option("dns.cache_size", Integer(0), 10_000, "cached answers at most (0: no cache)",
           None, "dns.cache_size"),
    Option("dns.min_ttl", Integer(0), 0, "cached answers live at least this many seconds",
           None, "dns.min_ttl"),
    Option("dns.max_ttl", Integer(0), 86_400, "cached answers live at most this many seconds",
           None, "dns.max_ttl"),
    Option("dns.max_negative_ttl", Integer(0), 3_600, "negative answers are cached at most "
           "this many seconds", None, "dns.max_negative_ttl"),
    Option("dns.max_in_flight", Integer(1), 1024, "queries resolved at once; beyond it they "
           "are answered REFUSED (counted: overload)", None, "dns.max_in_flight"),
    Option("dns.max_in_flight_per_client", Integer(1), None, "queries one client (IPv4 "
           "address, IPv6 /64) may have in flight; beyond it its queries are answered REFUSED "
           "(counted: client_share)", None, "dns.max_in_flight_per_client",
           unset=_AUTO_SHARE.format("dns.max_in_flight")),
    Option("metrics.listen", Listen(), None, "serve the Prometheus text format at "
           "`http://ADDR:PORT/metrics` (IPv6: `[ADDR]:PORT`)", "--metrics-listen", unset="off"),
    Option("logging.level", LogLevel(), "info", "log level, by name or number "
           "(0: critical only .. 4 and 5: debug)", "--log-level"),
    Option("logging.file", FilePath(readable=False), None, "append the log to this file",
           "--log-file", unset="stderr"),
    Option("logging.format", Choice("text", "json"), "text", "one line of text per record, "
           "or one JSON object per line (time, level, logger, message, exception)",
           "--log-format"),
    Option("limits.grace", Number(minimum=0), 5.0, "seconds open flows get on SIGINT/SIGTERM",
           "--grace"),
)  # fmt: skip

OPTIONS: dict[str, Option] = {opt.path: opt for opt in SCHEMA}


def default_path(iface: str) -> Path:
    return CONFIG_DIR / f"{iface}.toml"


# -- loading ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
    """A validated configuration: what ``tunlwip up`` runs with."""

    #: Every option's effective value, by key path (None: not set).
    values: Mapping[str, Any]
    #: The file read, or None (built-in defaults and flags only).
    source: Path | None
    gateway: GatewayConfig

    @property
    def iface(self) -> str:
        name: str = self.values["device.name"]
        return name

    @property
    def txqueuelen(self) -> int:
        """The TUN's queue length: as set, or 16 MiB worth of MTU-sized packets (500-10000).
        Every packet dropped there costs a client a retransmission timeout, and many parallel
        flows overflow the kernel's default of 500; the byte budget bounds kernel memory."""
        qlen: int | None = self.values["device.txqueuelen"]
        if qlen is None:
            qlen = min(10_000, max(500, (16 << 20) // self.gateway.stack.mtu))
        return qlen

    @property
    def offload(self) -> bool:
        on: bool = self.values["device.offload"]
        return on

    @property
    def log_level(self) -> str:
        level: str = self.values["logging.level"]
        return level

    @property
    def log_file(self) -> str | None:
        path: str | None = self.values["logging.file"]
        return path

    @property
    def log_format(self) -> str:
        form: str = self.values["logging.format"]
        return form

    @property
    def metrics_listen(self) -> str | None:
        listen: str | None = self.values["metrics.listen"]
        return listen

    @property
    def grace(self) -> float:
        grace: float = self.values["limits.grace"]
        return grace

    @property
    def protect(self) -> tuple[int | None, str | None]:
        """(fwmark, interface): at most one is set."""
        return self.values["protect.fwmark"], self.values["protect.interface"]

    def protector(self) -> Protector:
        mark, interface = self.protect
        if mark is not None:
            return fwmark(mark)
        if interface is not None:
            return bind_interface(interface)
        return no_protection

    def to_toml(self) -> str:
        """Every key, defaults included; ``load`` of this text gives the same Settings."""
        lines = [f"# tunlwip: effective configuration (from {self.source or 'built-in defaults'}"
                 " and the command line)"]  # fmt: skip
        for section, about in SECTIONS.items():
            lines += ["", f"[{section}]  # {about}"]
            for opt in SCHEMA:
                if opt.section != section:
                    continue
                value = self.values[opt.path]
                if value is None and isinstance(opt.kind, OffOr):  # off, even if on by default
                    lines.append(f"{opt.key} = {_show(OffOr.OFF)}")
                elif value is None:
                    lines.append(f"# {opt.key}: not set ({opt.unset})")
                else:
                    lines.append(f"{opt.key} = {opt.kind.dump(value)}")
        return "\n".join(lines) + "\n"


def _suggest(word: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _read_file(path: Path, base: Path, problems: list[str]) -> dict[str, Any]:
    """The file's values by key path (parsed and checked); problems are appended."""
    try:
        with path.open("rb") as f:
            document = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    values: dict[str, Any] = {}
    for section, table in document.items():
        if section not in SECTIONS:
            if isinstance(table, dict):
                close = difflib.get_close_matches(section, list(SECTIONS), n=1, cutoff=0.6)
                hint = f" (did you mean [{close[0]}]?)" if close else ""
                problems.append(f"unknown section [{section}]{hint}")
            else:
                elsewhere = [o.path for o in SCHEMA if o.key == section]
                hint = f" (did you mean {elsewhere[0]}?)" if elsewhere else ""
                problems.append(f"unknown key {section}{hint}")
            continue
        if not isinstance(table, dict):
            problems.append(f"{section}: expected a table [{section}], got {_show(table)}")
            continue
        keys = [o.key for o in SCHEMA if o.section == section]
        for key, value in table.items():
            opt = OPTIONS.get(f"{section}.{key}")
            if opt is None:
                elsewhere = [o.path for o in SCHEMA if o.key == key]
                hint = f" (did you mean {elsewhere[0]}?)" if elsewhere else _suggest(key, keys)
                problems.append(f"unknown key {section}.{key}{hint}")
                continue
            try:
                values[opt.path] = opt.kind.parse(value, opt.path, base)
            except ConfigError as exc:
                problems.append(str(exc))
    if "protect.fwmark" in values and "protect.interface" in values:
        problems.append("protect: fwmark and interface are mutually exclusive (set one)")
    return values


def load(path: str | Path | None = None, overrides: Mapping[str, object] | None = None) -> Settings:
    """Load and validate: ``path`` (must exist), else the default file of the interface named
    by ``overrides["device.name"]`` if present; then ``overrides`` (TOML-like values by key
    path: the command-line flags given) on top. Raises ConfigError naming every bad key."""
    overrides = overrides or {}
    problems: list[str] = []
    values: dict[str, Any] = {}
    source: Path | None = None
    if path is not None:
        source = Path(path)
    elif isinstance(name := overrides.get("device.name"), str) and name:
        candidate = default_path(name)
        try:
            candidate.stat()
            source = candidate
        except (FileNotFoundError, NotADirectoryError):
            source = None  # no file: built-in defaults (any other error: reading it fails)
        except OSError:
            source = candidate
    if source is not None:
        values = _read_file(source, Path(os.path.abspath(source)).parent, problems)
    for key, value in overrides.items():
        opt = OPTIONS[key]
        try:
            values[key] = opt.kind.parse(value, key, None)
        except ConfigError as exc:
            problems.append(f"{exc} (flag {opt.cli})" if opt.cli else str(exc))
            continue
        if opt.section == "protect":  # a protection flag replaces the file's protection
            other = "protect.interface" if key == "protect.fwmark" else "protect.fwmark"
            values.pop(other, None)
    if problems:
        raise ConfigProblems(problems)
    for opt in SCHEMA:
        values.setdefault(opt.path, opt.default)
    if values["dns.min_ttl"] > values["dns.max_ttl"]:
        raise ConfigError(f"dns.min_ttl: must be <= dns.max_ttl ({values['dns.max_ttl']}), got "
                          f"{values['dns.min_ttl']}")  # fmt: skip
    if values["device.name"] is None:
        raise ConfigError("device.name: not set (give --iface or set it in [device])")
    if values["udp.sweep_interval"] is None:
        values["udp.sweep_interval"] = min(30.0, values["udp.idle_timeout"] / 2)
    return Settings(values, source, _gateway_config(values))


def _gateway_config(values: Mapping[str, Any]) -> GatewayConfig:
    """Build the dataclasses; a ValueError they raise is reported with the key path of the
    value that caused it (found by putting the others back to their defaults)."""
    try:
        return _construct(values)
    except ValueError as exc:
        error = exc
    for opt in SCHEMA:
        if opt.field is None or values[opt.path] == opt.default or opt.default is None:
            continue
        try:
            _construct({**values, opt.path: opt.default})
        except ValueError:
            continue
        raise ConfigError(f"{opt.path}: {error}") from None
    raise ConfigError(f"invalid configuration: {error}") from None


def _construct(values: Mapping[str, Any]) -> GatewayConfig:
    parts: dict[str, dict[str, Any]] = {"": {}, "stack": {}, "udp": {}, "dns": {}}
    for opt in SCHEMA:
        if opt.field is not None:
            group, _, name = opt.field.rpartition(".")
            parts[group][name] = values[opt.path]
    return GatewayConfig(stack=StackConfig(**parts["stack"]), udp=UdpConfig(**parts["udp"]),
                         dns=DnsConfig(**parts["dns"]), **parts[""])  # fmt: skip


def config_key(field: str) -> str:
    """The key path of a GatewayConfig field ("stack.mtu" -> "device.mtu"), for messages;
    anything after the field name (" (to forward)") is kept."""
    name, sep, rest = field.partition(" ")
    for opt in SCHEMA:
        if opt.field == name:
            return opt.path + sep + rest
    return field
