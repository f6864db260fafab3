"""How a flow leaves the gateway: ``via`` values of a route, parsed once into frozen records.

A route's ``via`` (and ``--proxy URL``) is one of::

    direct                      the default: a protected socket straight to the destination
    direct?fwmark=N             the same, with SO_MARK N instead of the gateway's protector
    direct?interface=IF         the same, bound to interface IF (SO_BINDTODEVICE)
    socks5://[user:pass@]host:port[?remote_dns=true]
    http://[user:pass@]host:port   an HTTP CONNECT proxy (TCP only)
    reject                      answered like a closed port (RST, ICMP port unreachable)
    drop                        no answer at all

Why one parser: the configuration file, the command line and embedders name the same things,
and each error says which part of the URL is wrong. User names and passwords may be
percent-encoded (``%40`` for ``@``); they are kept out of ``str()`` so logs and ``status``
never show a password.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import urllib.parse

from ..errors import ConfigError
from ..hostname import is_hostname
from ..ifname import is_interface_name

__all__ = ["HANDSHAKE_TIMEOUT", "Direct", "Drop", "HttpProxy", "Reject", "Socks5Proxy", "Via",
           "parse_via"]  # fmt: skip

#: Seconds for the connect to a proxy and its handshake together (the proxy's own connect to
#: the destination happens inside the handshake, so this also bounds that); the default of
#: ``egress.handshake_timeout``.
HANDSHAKE_TIMEOUT = 10.0

# RFC 1929: user name and password are each 1-255 bytes.
_MAX_CREDENTIAL = 255
_MARK_MAX = 0xFFFFFFFF


@dataclasses.dataclass(frozen=True)
class Direct:
    """Straight to the destination; ``fwmark`` / ``interface`` replace the gateway's own
    protector for this route (another protected path out)."""

    fwmark: int | None = None
    interface: str | None = None

    def __str__(self) -> str:
        if self.fwmark is not None:
            return f"direct?fwmark={self.fwmark}"
        if self.interface is not None:
            return f"direct?interface={self.interface}"
        return "direct"


@dataclasses.dataclass(frozen=True)
class _Proxy:
    host: str
    port: int
    username: str | None = dataclasses.field(default=None, repr=False)
    password: str | None = dataclasses.field(default=None, repr=False)

    _scheme = ""

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = f"{self.username}@" if self.username is not None else ""
        return f"{self._scheme}://{user}{host}:{self.port}"


@dataclasses.dataclass(frozen=True)
class Socks5Proxy(_Proxy):
    """A SOCKS5 proxy (RFC 1928; user/password per RFC 1929 when given). ``remote_dns``: send
    the flow's name, when known, instead of its address, so the proxy resolves it."""

    remote_dns: bool = False
    _scheme = "socks5"


@dataclasses.dataclass(frozen=True)
class HttpProxy(_Proxy):
    """An HTTP proxy reached with CONNECT (TCP only), with Basic auth when given."""

    _scheme = "http"


@dataclasses.dataclass(frozen=True)
class Reject:
    """Answer like a closed port: RST for TCP, ICMP port unreachable for UDP."""

    def __str__(self) -> str:
        return "reject"


@dataclasses.dataclass(frozen=True)
class Drop:
    """Say nothing: the client's packets are dropped (and counted)."""

    def __str__(self) -> str:
        return "drop"


Via = Direct | Socks5Proxy | HttpProxy | Reject | Drop


def parse_via(text: str) -> Via:
    """The ``Via`` that ``text`` names; ``ConfigError`` saying what is wrong otherwise."""
    if not isinstance(text, str):
        raise ConfigError(f"expected a string such as 'direct' or 'socks5://host:1080', got "
                          f"{type(text).__name__}")  # fmt: skip
    text = text.strip()
    if text in ("reject", "drop"):
        return Reject() if text == "reject" else Drop()
    if text == "direct":
        return Direct()
    if text.startswith("direct?"):
        return _direct(text)
    scheme, sep, _ = text.partition("://")
    if not sep:
        raise ConfigError(f"{text!r}: expected direct, reject, drop, socks5://host:port or "
                          "http://host:port")  # fmt: skip
    if scheme.lower() not in ("socks5", "http"):
        raise ConfigError(f"{text!r}: unknown proxy scheme {scheme!r} (socks5 or http)")
    return _proxy(scheme.lower(), text)


def _direct(text: str) -> Direct:
    query = text.partition("?")[2]
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise ConfigError(f"{text!r}: expected direct?fwmark=N or direct?interface=IF") from None
    if len(pairs) != 1:
        raise ConfigError(f"{text!r}: give exactly one of fwmark=N or interface=IF")
    key, value = pairs[0]
    if key == "fwmark":
        mark = _integer(value)
        if mark is None or not 0 < mark <= _MARK_MAX:
            raise ConfigError(f"{text!r}: fwmark must be a number from 1 to {_MARK_MAX:#x}")
        return Direct(fwmark=mark)
    if key == "interface":
        if not is_interface_name(value):
            raise ConfigError(f"{text!r}: {value!r} is not a valid interface name")
        return Direct(interface=value)
    raise ConfigError(f"{text!r}: unknown option {key!r} (fwmark or interface)")


def _integer(value: str) -> int | None:
    try:
        return int(value, 0)
    except ValueError:
        return None


def _proxy(scheme: str, text: str) -> Socks5Proxy | HttpProxy:
    try:
        url = urllib.parse.urlsplit(text)
        port = url.port
    except ValueError as exc:
        raise ConfigError(f"{_redacted(text)}: {exc}") from None
    shown = _redacted(text)
    if url.path not in ("", "/") or url.fragment:
        raise ConfigError(f"{shown}: a proxy URL has no path")
    host = url.hostname
    if not host:
        raise ConfigError(f"{shown}: no proxy host")
    if not _is_address(host) and not is_hostname(host):
        raise ConfigError(f"{shown}: {host!r} is not a host name or IP address")
    if port is None or port == 0:
        raise ConfigError(f"{shown}: give the proxy's port (host:port)")
    username = _credential(url.username, "user name", shown)
    password = _credential(url.password, "password", shown)
    if username is not None and password is None:
        raise ConfigError(f"{shown}: a user name needs a password (user:pass@)")
    options = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
    if scheme == "http":
        if options:
            raise ConfigError(f"{shown}: http:// proxies take no options")
        return HttpProxy(host, port, username, password)
    remote_dns = options.pop("remote_dns", "false").lower()
    if options:
        raise ConfigError(f"{shown}: unknown option {next(iter(options))!r} (remote_dns)")
    if remote_dns not in ("true", "false"):
        raise ConfigError(f"{shown}: remote_dns must be true or false")
    return Socks5Proxy(host, port, username, password, remote_dns=remote_dns == "true")


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _credential(raw: str | None, what: str, shown: str) -> str | None:
    if raw is None:
        return None
    value = urllib.parse.unquote(raw)
    if not 1 <= len(value.encode()) <= _MAX_CREDENTIAL:
        raise ConfigError(f"{shown}: the {what} must be 1-{_MAX_CREDENTIAL} bytes")
    return value


def _redacted(text: str) -> str:
    """``text`` with any password replaced by ``***`` (error messages end up in logs)."""
    scheme, sep, rest = text.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return text
    return f"{scheme}://{userinfo.partition(':')[0]}:***@{host}"
