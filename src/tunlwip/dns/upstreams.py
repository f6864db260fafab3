"""DNS upstreams: send one query over Do53 (UDP/TCP), DoT or DoH, with failover across a list.

URL forms. Addresses are IP literals: an upstream is never found by name resolution, which
would itself need DNS and could leak around the proxy.

``udp://IP[:port]`` (port 53)
    Queries go out through a pool of protected sockets on random source ports, rotated every
    few dozen queries or seconds, each query with a fresh random ID (``udp_pool``), so an
    off-path spoofer must guess both; datagrams whose ID or question do not match are ignored
    and counted. A truncated (TC) answer is retried over TCP to the same address and port.
``tcp://IP[:port]`` (port 53)
    2-byte length-prefixed messages (RFC 1035 4.2.2).
``tls://IP[:port][#servername]`` (port 853)
    DNS over TLS (RFC 7858). The certificate is verified against ``servername`` if given, else
    against the IP address (the certificate's IP SANs); CAs: the system's, or ``ca_file``.
``https://HOST[:port][/path][#IP]`` (port 443, path ``/dns-query``)
    DNS over HTTPS (RFC 8484): HTTP/1.1 POST of ``application/dns-message``. HOST is the TLS
    server name and the Host header; when it is a name, ``#IP`` is required: the address to
    connect to.

IPv6 addresses go in brackets: ``udp://[fd00:1::2]:53``. Every socket comes from the protected
dialer, or, for an upstream reached through a ``via`` (a ``[[dns.route]]``'s or ``dns.via``),
from the way it names (``upstream_via``: another protector, or a SOCKS5/HTTP CONNECT proxy for
tcp://, tls:// and https://). TCP, TLS and HTTPS upstreams keep up to 4 idle connections for
reuse; one idle for more than 30 s is closed instead, and a reused connection the server had
closed is replaced by a new one once, transparently.

Every query goes out with a new random ID (0 for DoH, RFC 8484 4.1), the answer must repeat
the ID and the question, and the caller gets it back with its own ID. Timeouts are the
caller's: ``Upstream.query`` waits until cancelled, ``UpstreamSet`` bounds each attempt.

Where things are: this module turns URLs into upstreams and fails over across a list; the
transports are in ``transports.py`` (DoH's HTTP/1.1 in ``doh.py``), the checks every answer
must pass in ``wire.py``.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import ssl
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import dns.rcode
import trio

from ..dialer import Dialer
from ..egress.via import Via
from ..endpoint import Endpoint, IPAddress
from ..errors import ConfigError
from ..hostname import MAX_NAME, is_hostname
from .summary import AnswerSummary, summarize_answer
from .transports import HttpsUpstream, TcpUpstream, TlsUpstream, UdpUpstream
from .upstream_via import UpstreamDialer, upstream_dialer, via_problem
from .wire import UpstreamError, header_flags

__all__ = [
    "HttpsUpstream",
    "TcpUpstream",
    "TlsUpstream",
    "UdpUpstream",
    "Upstream",
    "UpstreamError",
    "UpstreamSet",
    "parse_upstream",
]

log = logging.getLogger(__name__)

RESOLV_CONF = "/etc/resolv.conf"
DEFAULT_PORTS = {"udp": 53, "tcp": 53, "tls": 853, "https": 443}
#: Answers that move on to the next upstream (kept as the fallback answer).
MOVE_ON_RCODES = frozenset({int(dns.rcode.SERVFAIL), int(dns.rcode.REFUSED)})


class Upstream(Protocol):
    """One configured DNS server; ``query`` is safe to call from many tasks at once."""

    url: str

    async def query(self, request: bytes) -> bytes:
        """The answer to ``request`` (wire format), with the request's ID restored."""
        ...

    async def aclose(self) -> None:
        """Close pooled connections."""
        ...


# -- configuration -------------------------------------------------------------------------


def parse_upstream(url: str, dialer: UpstreamDialer, *, ca_file: str | None = None,
                   via: Via | None = None) -> Upstream:  # fmt: skip
    """The upstream a URL describes (see the module docstring), its connections opened by
    ``dialer``, or, given ``via``, by the way ``via`` names from the gateway's ``Dialer``
    ``dialer`` (``upstream_via``); ConfigError if invalid.

    TLS settings (the CA file included) are loaded here, so that a bad file fails at start."""
    if via is not None:
        problem = via_problem(via, (url,))
        if problem is not None:
            raise _bad(url, problem[1])
        if not isinstance(dialer, Dialer):
            raise TypeError("a via needs the gateway's Dialer to start from")
        dialer = upstream_dialer(via, dialer)
    return _parse(url, dialer, ca_file)


def _parse(url: str, dialer: UpstreamDialer, ca_file: str | None) -> Upstream:
    try:
        parts = urllib.parse.urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise _bad(url, str(exc)) from None
    scheme = parts.scheme
    if scheme not in DEFAULT_PORTS:
        raise _bad(url, "the scheme must be udp://, tcp://, tls:// or https://")
    if parts.username is not None or parts.password is not None:
        raise _bad(url, "credentials are not supported")
    host = parts.hostname
    if not host:
        raise _bad(url, "no address")
    if port == 0:
        raise _bad(url, "port 0")
    port = port or DEFAULT_PORTS[scheme]
    if scheme == "https":
        return _parse_https(url, dialer, ca_file, parts, host, port)
    if parts.path not in ("", "/") or parts.query:
        raise _bad(url, "unexpected path or query")
    endpoint = Endpoint(_ip(url, host, "the host"), port)
    if scheme == "tls":
        server_name = parts.fragment or str(endpoint.address)
        if not _valid_server_name(server_name):
            raise _bad(url, f"bad server name {server_name!r}")
        return TlsUpstream(url, dialer, endpoint, server_name=server_name,
                           context=_tls_context(url, ca_file, alpn=None))  # fmt: skip
    if parts.fragment:
        raise _bad(url, f"'#{parts.fragment}' is only meaningful for tls:// and https://")
    if scheme == "udp":
        return UdpUpstream(url, dialer, endpoint)
    return TcpUpstream(url, dialer, endpoint)


def _parse_https(
    url: str,
    dialer: UpstreamDialer,
    ca_file: str | None,
    parts: urllib.parse.SplitResult,
    host: str,
    port: int,
) -> HttpsUpstream:
    import h11  # DoH only: a gateway without DoH upstreams never loads HTTP (idle memory)

    from . import doh

    path = parts.path or doh.DOH_PATH
    if not path.startswith("/") or re.search(r"[\s{}]", path):
        raise _bad(url, f"bad path {path!r} (URI templates are not supported: give the path)")
    target = f"{path}?{parts.query}" if parts.query else path
    try:
        address: IPAddress = ipaddress.ip_address(host)
    except ValueError:
        if not _valid_host_name(host):
            raise _bad(url, f"bad host {host!r}") from None
        if not parts.fragment:
            raise _bad(url, "a host name needs '#IP', the address to connect to (upstreams are "
                       "never looked up by name)") from None  # fmt: skip
        address = _ip(url, parts.fragment, "the address after '#'")
    else:
        if parts.fragment and _ip(url, parts.fragment, "the address after '#'") != address:
            raise _bad(url, "the host is an IP address: '#IP' must be the same address or absent")
    host_header = f"[{host}]" if ":" in host else host
    if port != DEFAULT_PORTS["https"]:
        host_header += f":{port}"
    try:
        doh.post_request(target, host_header, 0)
    except (h11.LocalProtocolError, UnicodeError) as exc:
        raise _bad(url, f"cannot be sent as an HTTP/1.1 request: {exc}") from None
    return HttpsUpstream(url, dialer, Endpoint(address, port), server_name=host,
                         host_header=host_header, target=target,
                         context=_tls_context(url, ca_file, alpn=["http/1.1"]))  # fmt: skip


def _bad(url: str, reason: str) -> ConfigError:
    return ConfigError(f"DNS upstream {url!r}: {reason}")


def _ip(url: str, text: str, what: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise _bad(url, f"{what} {text!r} is not an IP address (upstreams are never looked up "
                   "by name)") from None  # fmt: skip


def _valid_server_name(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return _valid_host_name(name)
    return True


def _valid_host_name(name: str) -> bool:
    """A host name as written in a URL: a final dot allowed, at most 253 characters with it."""
    return len(name) <= MAX_NAME and is_hostname(name.removesuffix("."))


def _tls_context(url: str, ca_file: str | None, *, alpn: list[str] | None) -> ssl.SSLContext:
    """Verification on, host names checked: the defaults of ``ssl.create_default_context``."""
    try:
        context = ssl.create_default_context(cafile=ca_file)
    except (OSError, ValueError) as exc:
        raise _bad(url, f"cannot load the CA file {ca_file!r}: {exc}") from None
    if alpn:
        context.set_alpn_protocols(alpn)
    return context


def resolv_conf_upstreams(path: str = RESOLV_CONF) -> tuple[str, ...]:
    """``udp://`` URLs for the nameservers of a resolv.conf (missing file: none)."""
    urls = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return ()
    for line in lines:
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                addr = ipaddress.ip_address(fields[1].split("%", 1)[0])
            except ValueError:
                continue
            urls.append(f"udp://[{addr}]:53" if addr.version == 6 else f"udp://{addr}:53")
    return tuple(urls)


# -- failover ------------------------------------------------------------------------------


class UpstreamSet:
    """The configured upstreams, tried in order until one answers.

    An upstream that fails or stays silent for ``attempt_timeout`` seconds is skipped. An
    answer with SERVFAIL or REFUSED also moves on (another server may well know); if no later
    upstream answers, the last such answer is returned rather than an error."""

    def __init__(self, upstreams: Sequence[Upstream], *, attempt_timeout: float = 2.0) -> None:
        if not attempt_timeout > 0:
            raise ConfigError(f"DNS attempt timeout must be positive, not {attempt_timeout}")
        self.upstreams: tuple[Upstream, ...] = tuple(upstreams)
        self.attempt_timeout = attempt_timeout
        #: Every upstream is plain UDP: a plain query can take the proxy's task-less path
        #: (``fast_forward``), which follows the same rules and counts here too (``count``).
        self.udp_only: tuple[UdpUpstream, ...] | None = None
        if self.upstreams and all(isinstance(u, UdpUpstream) for u in self.upstreams):
            self.udp_only = tuple(u for u in self.upstreams if isinstance(u, UdpUpstream))
        self._counts = dict.fromkeys(("queries", "failures", "timeouts", "bad_rcodes",
                                      "all_failed"), 0)  # fmt: skip

    def count(self, what: str) -> None:
        """One more of ``what`` (a key of ``counters``), for queries resolved elsewhere."""
        self._counts[what] += 1

    @property
    def counters(self) -> dict[str, int]:
        """A snapshot: ``queries`` (resolve calls); per attempt: ``failures`` (errors),
        ``timeouts``, ``bad_rcodes`` (SERVFAIL/REFUSED, moved on); ``all_failed`` (resolve
        calls that raised); ``tcp_retries`` (truncated UDP answers asked again over TCP);
        ``udp_ignored`` (datagrams on UDP upstream sockets that answered no query in flight:
        spoofs, strays, late answers); ``udp_sockets_opened`` (the UDP pools' rotation)."""
        udp = [u for u in self.upstreams if isinstance(u, UdpUpstream)]
        return {**self._counts, "tcp_retries": sum(u.tcp_retries for u in udp),
                "udp_ignored": sum(u.pool.ignored for u in udp),
                "udp_sockets_opened": sum(u.pool.opened for u in udp)}  # fmt: skip

    async def resolve(self, request: bytes) -> tuple[bytes, Upstream]:
        """(answer, the upstream that gave it); UpstreamError if none answered."""
        answer, _, upstream = await self.resolve_summarized(request)
        return answer, upstream

    async def resolve_summarized(
        self, request: bytes
    ) -> tuple[bytes, AnswerSummary | None, Upstream]:
        """(answer, its ``summary.summarize``, the upstream that gave it). The walk of the
        answer's records also decides that a malformed one is its upstream's failure. The
        summary is None for a truncated answer that does not walk (it may be cut anywhere)."""
        self._counts["queries"] += 1
        errors: list[str] = []
        fallback: tuple[bytes, AnswerSummary | None, Upstream] | None = None
        for upstream in self.upstreams:
            with trio.move_on_after(self.attempt_timeout) as attempt:
                try:
                    answer = await upstream.query(request)
                    summary = summarize_answer(answer)
                except UpstreamError as exc:
                    self._counts["failures"] += 1
                    errors.append(f"{upstream.url}: {exc}")
                    log.debug("DNS upstream %s failed: %s", upstream.url, exc)
                    continue
            if attempt.cancelled_caught:
                self._counts["timeouts"] += 1
                errors.append(f"{upstream.url}: no answer within {self.attempt_timeout} s")
                log.debug("DNS upstream %s: no answer within %s s", upstream.url,
                          self.attempt_timeout)  # fmt: skip
                continue
            rcode = header_flags(answer) & 0xF
            if rcode not in MOVE_ON_RCODES:
                return answer, summary, upstream
            self._counts["bad_rcodes"] += 1
            errors.append(f"{upstream.url}: {dns.rcode.to_text(dns.rcode.Rcode(rcode))}")
            fallback = answer, summary, upstream
        if fallback is not None:
            return fallback
        self._counts["all_failed"] += 1
        raise UpstreamError("all upstreams failed: " + ("; ".join(errors) or "none configured"))

    async def aclose(self) -> None:
        for upstream in self.upstreams:
            await upstream.aclose()
