"""The gateway's configuration structs: what embedders construct and the TOML loader fills.

Theory of operation
-------------------
Each field is declared once, with ``setting(...)`` (see ``fields``): its default, its key in
the configuration file, its rule and its help. ``__post_init__`` runs every field's rule, so a
struct that exists is valid, whoever built it; bad values raise ``InvalidFields`` (a
``ConfigError`` and a ``ValueError``) naming every bad field with its key path. The modules
that run the gateway use these structs directly (``stack``, ``udp``, ``dns.proxy`` and
``gateway`` re-export them under their old names).

The file's sections do not follow the structs one to one: ``[tcp]`` fills ``GatewayConfig``
and the connection limits of ``StackConfig``, ``[quic]`` and ``icmp.echo`` fill
``StackConfig``. The key path says where each field lives in the file.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Literal

from ..dialer import KEEPALIVE_PROBES, KEEPALIVE_SECONDS, Keepalive
from ..dns.policy import BlockedAnswer
from ..dns.upstream_via import via_problem
from ..egress.via import Direct, Via
from ..shares import share_of
from .fields import check_fields, setting
from .kinds import (
    Address,
    Boolean,
    CaBundle,
    Choice,
    FilePath,
    Integer,
    ListOf,
    Network,
    Number,
    OffOr,
    Overrides,
    UpstreamUrl,
)
from .routes import Route, ViaUrl, name_problems

if TYPE_CHECKING:
    from .dns_routes import DnsRoute

__all__ = ["DnsConfig", "GatewayConfig", "StackConfig", "UdpConfig"]

BlockedUdpAction = Literal["reject", "drop", "off"]
EchoMode = Literal["reply", "forward", "off"]
UnreachableReply = Literal["icmp", "rst"]
WhenFull = Literal["refuse", "evict"]
Hijack = Literal["all", "gateway", "off"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_IPV4 = ipaddress.IPv4Address("198.18.0.1")
DEFAULT_IPV6 = ipaddress.IPv6Address("fd00:18::1")
#: The client networks ``tunlwip up`` serves unless told otherwise (an embedder's default is
#: any source).
COMMAND_CLIENT_NETWORKS = (ipaddress.ip_network("198.18.0.0/15"),
                           ipaddress.ip_network("fd00:18::/64"))  # fmt: skip
MAX_CLIENT_NETWORKS = 16  # the C filter's table

_positive = Number(positive=True)
#: What an unset per-client share means (``shares.share_of``).
_AUTO_SHARE = "max(16, 1/4 of `{0}`), at most `{0}`"


@dataclasses.dataclass(frozen=True)
class StackConfig:
    """What lwIP needs to know about its side of the TUN."""

    mtu: int = setting("device.mtu", Integer(576, 65520), 1500, help="interface MTU",
                       cli="--mtu")  # fmt: skip
    ipv4_address: ipaddress.IPv4Address = setting(
        "device.ipv4", Address(4), DEFAULT_IPV4, cli="--gateway4",
        help="lwIP's IPv4 address (also the DNS proxy's)")  # fmt: skip
    ipv6_address: ipaddress.IPv6Address = setting(
        "device.ipv6", Address(6), DEFAULT_IPV6, cli="--gateway6",
        help="lwIP's IPv6 address (also the DNS proxy's)")  # fmt: skip
    #: Only packets from these sources are processed (empty: any source).
    client_networks: tuple[IPNetwork, ...] = setting(
        "device.client_networks", ListOf(Network(), max_items=MAX_CLIENT_NETWORKS), (),
        file_default=COMMAND_CLIENT_NETWORKS, cli="--client-net",
        help="only packets from these sources are processed (empty: any source)")  # fmt: skip
    #: Verify IP/TCP/UDP checksums of client packets (the kernel always sets them).
    verify_checksums: bool = setting(
        "device.verify_checksums", Boolean(), True,
        help="verify IP/TCP/UDP checksums of client packets")  # fmt: skip
    #: New connections beyond this many open ones are refused with RST.
    max_tcp_connections: int = setting(
        "tcp.max_connections", Integer(1), 65536,
        help="new connections beyond this many open ones are refused with RST")  # fmt: skip
    #: Connections in SYN_RCVD (handshake not yet complete) at most; a new one beyond it resets
    #: the oldest (``tcp_half_open_evicted``), as a SYN flood must not grow lwIP's PCB list.
    #: (At most 2**32 - 1: C keeps it in an unsigned 32-bit counter.)
    max_half_open: int = setting(
        "tcp.max_half_open", Integer(1, 0xFFFFFFFF), 1024,
        help="connections whose handshake is not yet complete at most (SYN floods); a new one "
             "beyond it resets the oldest")  # fmt: skip
    #: Open connections one client (IPv4 address, IPv6 /64) may hold; beyond it its new
    #: connections are refused with RST too, so one client cannot take them all. None:
    #: ``shares.share_of(max_tcp_connections)``.
    max_tcp_connections_per_client: int | None = setting(
        "tcp.max_connections_per_client", Integer(1), None,
        unset=_AUTO_SHARE.format("tcp.max_connections"),
        help="connections one client (IPv4 address, IPv6 /64) may have open or being dialed; "
             "beyond it its new ones are refused with RST")  # fmt: skip
    #: Client bytes held in Python streams (custom handlers, DNS over TCP) over all
    #: connections; while more are held, new connections are refused with RST.
    max_buffered_bytes: int = setting(
        "tcp.max_buffered_bytes", Integer(1), 64 * 1024 * 1024,
        help="client bytes held unread in Python streams (custom handlers, DNS over TCP) over "
             "all connections; while more are held, new connections are refused with "
             "RST")  # fmt: skip
    #: Client bytes one Python stream holds unread; beyond them lwIP keeps the data (within
    #: its window, 256 KiB, which bounds this too: unread bytes are not acknowledged) and
    #: offers it again when the stream is read. An empty stream always takes one delivery
    #: (at most 64 KiB), so smaller values are approximate.
    max_buffered_bytes_per_connection: int = setting(
        "tcp.max_buffered_bytes_per_connection", Integer(1), 256 * 1024,
        help="client bytes one Python stream holds unread; beyond them lwIP keeps the data (at "
             "most its 256 KiB window) until the stream is read")  # fmt: skip
    #: UDP to these destination ports (QUIC) is answered with ICMP port unreachable
    #: ("reject": clients fall back to TCP at once), silently dropped, or let through ("off").
    blocked_udp_ports: tuple[int, ...] = setting(
        "quic.ports", ListOf(Integer(1, 65535), cli="comma"), (443, 80), cli="--quic-ports",
        help="UDP destination ports `quic.mode` applies to")  # fmt: skip
    blocked_udp_action: BlockedUdpAction = setting(
        "quic.mode", Choice.of(BlockedUdpAction), "reject", cli="--quic",
        help="UDP to the QUIC ports: ICMP port unreachable, silent drop, or forwarded")  # fmt: skip
    #: Echo requests to any address: answered by the stack, handed to ``icmp_echo_receiver``
    #: ("forward"), or ignored. Echo to the stack's own addresses is always answered.
    icmp_echo: EchoMode = setting(
        "icmp.echo", Choice.of(EchoMode), "reply", cli="--icmp",
        help="echo requests to any address: answer here, forward with ping sockets, or "
             "ignore")  # fmt: skip
    #: Forward packets to loopback and link-local destinations (127/8, 0/8, 169.254/16, ::1,
    #: fe80::/10) and to ``set_host_addresses``. Off, they are refused (TCP reset, ICMP
    #: unreachable; ``drop_local_destination``): they would reach the gateway host's own
    #: services. Only for tests whose upstreams live on loopback.
    forward_local_destinations: bool = setting(
        "device.forward_local_destinations", Boolean(), False,
        help="forward to the gateway host's loopback and link-local networks (127/8, 0/8, "
             "169.254/16, ::1, fe80::/10) and its own addresses; off, such packets are "
             "refused")  # fmt: skip

    def __post_init__(self) -> None:
        check_fields(self)

    @property
    def connection_share(self) -> int:
        """The open connections one client may hold."""
        return share_of(self.max_tcp_connections, self.max_tcp_connections_per_client)


@dataclasses.dataclass(frozen=True)
class UdpConfig:
    """Session lifecycle settings."""

    #: A session with no datagram in either direction for this long is closed.
    idle_timeout: float = setting(
        "udp.idle_timeout", _positive, 60.0, cli="--udp-idle-timeout",
        help="close UDP sessions idle this long in both directions, seconds")  # fmt: skip
    #: Idle timeout of port-53 sessions (DNS forwarded as plain UDP: one query, one answer).
    dns_idle_timeout: float = setting(
        "udp.dns_idle_timeout", _positive, 10.0,
        help="idle timeout of port-53 sessions forwarded as plain UDP, seconds")  # fmt: skip
    #: How often idle sessions are looked for (a session lives at most timeout + interval).
    sweep_interval: float = setting(
        "udp.sweep_interval", _positive, 30.0, file_default=None,
        unset="min(30, `udp.idle_timeout` / 2)",
        help="how often idle sessions are looked for, seconds")  # fmt: skip
    #: Sessions open at most. A new flow beyond it is refused with ICMP unreachable
    #: (``when_full="refuse"``: existing flows keep working) or takes the place of the least
    #: recently active session (``"evict"``).
    max_sessions: int = setting("udp.max_sessions", Integer(1), 4096, cli="--max-udp-sessions",
                                help="sessions open at most; see `udp.when_full`")  # fmt: skip
    when_full: WhenFull = setting(
        "udp.when_full", Choice.of(WhenFull), "refuse",
        help="a new flow at `udp.max_sessions`: refused with ICMP port unreachable, or it "
             "replaces the least recently active session")  # fmt: skip
    #: Sessions one client (IPv4 address, IPv6 /64) may hold, so one client cannot take the
    #: whole table; a new flow beyond it is refused with ICMP unreachable (``"refuse"``) or
    #: replaces the client's own least recently active session (``"evict"``). None:
    #: ``shares.share_of(max_sessions)``.
    max_sessions_per_client: int | None = setting(
        "udp.max_sessions_per_client", Integer(1), None,
        unset=_AUTO_SHARE.format("udp.max_sessions"),
        help="sessions one client (IPv4 address, IPv6 /64) may hold; beyond it its new flows "
             "are refused with ICMP port unreachable, or with `udp.when_full = \"evict\"` "
             "replace its own least recently active session")  # fmt: skip
    #: Client datagrams waiting for the handler, per session; beyond it they are dropped.
    queue_datagrams: int = setting(
        "udp.queue_datagrams", Integer(1), 512,
        help="client datagrams queued per session; beyond it they are dropped")  # fmt: skip

    def __post_init__(self) -> None:
        check_fields(self)

    @property
    def session_share(self) -> int:
        """The sessions one client may hold."""
        return share_of(self.max_sessions, self.max_sessions_per_client)


@dataclasses.dataclass(frozen=True)
class DnsConfig:
    """DNS proxy settings. No upstream given: the nameservers of ``/etc/resolv.conf``."""

    upstreams: tuple[str, ...] = setting(
        "dns.upstreams", ListOf(UpstreamUrl()), (), cli="--dns-upstream",
        help="upstreams, tried in order (empty: the nameservers of /etc/resolv.conf)")  # fmt: skip
    block_files: tuple[str, ...] = setting(
        "dns.block_lists", ListOf(FilePath(readable=True)), (), cli="--dns-block",
        help="block list files (domains or hosts format)")  # fmt: skip
    allow_files: tuple[str, ...] = setting(
        "dns.allow_lists", ListOf(FilePath(readable=True)), (), cli="--dns-allow",
        help="allow list files; they win over block lists")  # fmt: skip
    #: Static answers: name -> addresses (A and AAAA).
    overrides: Mapping[str, Sequence[str]] = setting(
        "dns.overrides", Overrides(), factory=dict,
        help="static answers: name = [addresses]")  # fmt: skip
    blocked_answer: BlockedAnswer = setting(
        "dns.blocked_answer", Choice.of(BlockedAnswer), "nxdomain", cli="--dns-blocked-answer",
        help="answer for blocked names")  # fmt: skip
    #: Which port-53 traffic the proxy answers: to any address, only to the gateway's
    #: address, or none (then port 53 is forwarded like any other flow).
    hijack: Hijack = setting(
        "dns.hijack", Choice.of(Hijack), "all", cli="--dns-hijack",
        help="port-53 traffic the proxy answers: to any address, to the gateway's only, or "
             "none")  # fmt: skip
    #: A query without an answer after this long gets SERVFAIL.
    query_timeout: float = setting(
        "dns.query_timeout", _positive, 5.0,
        help="a query without an answer after this many seconds gets SERVFAIL")  # fmt: skip
    #: How long one upstream gets before the next one is tried.
    attempt_timeout: float = setting(
        "dns.attempt_timeout", _positive, 2.0,
        help="seconds one upstream gets before the next is tried")  # fmt: skip
    #: CA bundle for DoT/DoH upstreams (default: the system's).
    ca_file: str | None = setting(
        "dns.ca_file", CaBundle(), None, cli="--dns-ca-file", unset="the system's CA store",
        help="CA bundle for tls:// and https:// upstreams")  # fmt: skip
    cache_size: int = setting("dns.cache_size", Integer(0), 10_000,
                              help="cached answers at most (0: no cache)")  # fmt: skip
    min_ttl: int = setting("dns.min_ttl", Integer(0), 0,
                           help="cached answers live at least this many seconds")  # fmt: skip
    max_ttl: int = setting("dns.max_ttl", Integer(0), 86_400,
                           help="cached answers live at most this many seconds")  # fmt: skip
    max_negative_ttl: int = setting(
        "dns.max_negative_ttl", Integer(0), 3_600,
        help="negative answers are cached at most this many seconds")  # fmt: skip
    #: Queries resolved at once, over all clients; beyond it queries are dropped (counted).
    max_in_flight: int = setting(
        "dns.max_in_flight", Integer(1), 1024,
        help="queries resolved at once; beyond it they are answered REFUSED (counted: "
             "overload)")  # fmt: skip
    #: Queries one client (IPv4 address, IPv6 /64) may have in flight; beyond it they get
    #: REFUSED too, so one client's slow queries cannot take every slot. None:
    #: ``shares.share_of(max_in_flight)``.
    max_in_flight_per_client: int | None = setting(
        "dns.max_in_flight_per_client", Integer(1), None,
        unset=_AUTO_SHARE.format("dns.max_in_flight"),
        help="queries one client (IPv4 address, IPv6 /64) may have in flight; beyond it its "
             "queries are answered REFUSED (counted: client_share)")  # fmt: skip
    #: A client TCP connection with no query for this long is closed.
    tcp_idle_timeout: float = setting(
        "dns.tcp_idle_timeout", _positive, 30.0,
        help="a client's DNS-over-TCP connection idle this many seconds is closed")  # fmt: skip
    #: A query over TCP must arrive whole this long after its first byte, and its answer be
    #: taken by the client this long after it is ready; else the connection is reset.
    tcp_query_timeout: float = setting(
        "dns.tcp_query_timeout", _positive, 10.0,
        help="a DNS-over-TCP query must arrive whole within this many seconds of its first "
             "byte, and its answer be read by the client within as many; else the connection "
             "is reset (counted: tcp_timeouts)")  # fmt: skip
    #: Refuse encrypted DNS that would go around the proxy: the gateway resets TCP and
    #: rejects UDP to port 853 (DoT, DoQ) as a closed port would, and the proxy blocks the
    #: names of well-known DoH resolvers (``policy.ENCRYPTED_DNS_NAMES``).
    reject_encrypted: bool = setting(
        "dns.reject_encrypted", Boolean(), False, cli="--dns-reject-encrypted",
        help="refuse encrypted DNS that would bypass the proxy: TCP to port 853 gets RST and "
             "UDP to it ICMP port unreachable (DoT, DoQ; counted: refused.encrypted_dns), and "
             "well-known DoH resolver names are blocked")  # fmt: skip

    #: How the default upstreams (``upstreams``) are reached (None: directly).
    via: Via | None = setting(
        "dns.via", ViaUrl(), None, unset="direct",
        help="how the default upstreams are reached: direct?fwmark=N, direct?interface=IF, or "
             "a socks5:// or http:// proxy (by IP address; tcp://, tls:// and https:// "
             "upstreams only)")  # fmt: skip
    #: The ``[[dns.route]]`` tables, in order: the first whose domains match a query's name
    #: sends it to its own upstreams (``dns.split``); other queries go to ``upstreams``.
    routes: tuple[DnsRoute, ...] = ()

    def __post_init__(self) -> None:
        check_fields(self, self._across)

    def _across(self) -> Iterator[tuple[str, str]]:
        if self.min_ttl > self.max_ttl:
            yield (f"dns.min_ttl: must be <= dns.max_ttl ({self.max_ttl}), got {self.min_ttl}",
                   "DnsConfig.min_ttl")  # fmt: skip
        if self.via is not None:
            problem = via_problem(self.via, self.upstreams)
            if problem is not None:
                key, reason = problem
                yield f"dns.{key}: {reason}", f"DnsConfig.{key.partition('[')[0]}"
            elif not self.upstreams and not isinstance(self.via, Direct):
                yield ("dns.via: a proxy needs dns.upstreams given as tcp://, tls:// or "
                       "https:// (the nameservers of /etc/resolv.conf are udp://)",
                       "DnsConfig.via")  # fmt: skip
        if self.routes != ():  # split DNS: its module only when configured
            yield from _dns_routes_problems(self.routes)

    @property
    def in_flight_share(self) -> int:
        """The queries one client may have in flight."""
        return share_of(self.max_in_flight, self.max_in_flight_per_client)


def _dns_routes_problems(routes: object) -> Iterator[tuple[str, str]]:
    """What is wrong with ``DnsConfig.routes``, the ``[[dns.route]]`` tables (their module is
    imported here: a gateway without split DNS does not keep it in memory)."""
    from .dns_routes import DnsRoute, dns_route_problems

    if not isinstance(routes, tuple) or not all(isinstance(r, DnsRoute) for r in routes):
        yield "dns.route: expected a tuple of DnsRoute", "DnsConfig.routes"
        return
    for problem_text in dns_route_problems(routes):
        yield problem_text, "DnsConfig.routes"


@dataclasses.dataclass(frozen=True)
class GatewayConfig:
    """Settings of the TCP gateway (device-side settings live in ``stack``)."""

    stack: StackConfig = dataclasses.field(default_factory=StackConfig)
    dial_timeout: float = setting("tcp.dial_timeout", _positive, 30.0, cli="--dial-timeout",
                                  help="upstream connect timeout, seconds")  # fmt: skip
    #: Flows with no byte moved for this many seconds are reset (None: no idle limit; dead
    #: ends are found by keepalive instead).
    idle_timeout: float | None = setting(
        "tcp.idle_timeout", OffOr(_positive), None, cli="--idle-timeout", unset="off",
        help="TCP flows with no byte moved for this many seconds are reset")  # fmt: skip
    #: TCP keepalive, seconds (``keepalive_idle`` None: off): on upstream sockets (the
    #: kernel's) and toward clients (lwIP's), so a flow ends when an end is gone, not quiet.
    keepalive_idle: int | None = setting(
        "tcp.keepalive_idle", OffOr(Integer(*KEEPALIVE_SECONDS)), 120, cli="--keepalive-idle",
        unset="off",
        help="a TCP flow quiet this many seconds is probed with keepalives, on its upstream "
             "socket and toward its client (off: never)")  # fmt: skip
    keepalive_interval: int = setting(
        "tcp.keepalive_interval", Integer(*KEEPALIVE_SECONDS), 15, cli="--keepalive-interval",
        help="seconds between keepalive probes")  # fmt: skip
    keepalive_count: int = setting(
        "tcp.keepalive_count", Integer(*KEEPALIVE_PROBES), 4, cli="--keepalive-count",
        help="unanswered probes after which the flow is reset: a vanished end is found within "
             "idle + interval x count seconds of its last packet")  # fmt: skip
    dial_before_accept: bool = setting(
        "tcp.dial_before_accept", Boolean(), True, cli="--dial-before-accept",
        help="hold a client's SYN until the real destination accepted")  # fmt: skip
    unreachable_reply: UnreachableReply = setting(
        "tcp.unreachable", Choice.of(UnreachableReply), "icmp", cli="--unreachable",
        help="answer for unreachable destinations")  # fmt: skip
    max_pending_dials: int = setting(
        "tcp.max_pending_dials", Integer(1), 1024,
        help="SYNs held while dialing at most; beyond it new ones are refused")  # fmt: skip
    #: SYNs one client (IPv4 address, IPv6 /64) may have held while dialing; beyond it its
    #: new ones are refused with RST, so one client dialing black holes cannot take every
    #: pending dial. None: ``shares.share_of(max_pending_dials)``.
    max_pending_dials_per_client: int | None = setting(
        "tcp.max_pending_dials_per_client", Integer(1), None,
        unset=_AUTO_SHARE.format("tcp.max_pending_dials"),
        help="SYNs one client (IPv4 address, IPv6 /64) may have held while dialing; beyond it "
             "its new ones are refused with RST")  # fmt: skip
    #: How long an upstream dialed for a held SYN waits for the client's handshake.
    predial_claim_timeout: float = setting(
        "tcp.claim_timeout", _positive, 10.0,
        help="how long a connection dialed for a held SYN waits for the client's handshake, "
             "seconds")  # fmt: skip
    udp: UdpConfig = dataclasses.field(default_factory=UdpConfig)
    dns: DnsConfig = dataclasses.field(default_factory=DnsConfig)
    #: Idle time after which a forwarded ping's socket is closed.
    icmp_echo_idle_timeout: float = setting(
        "icmp.idle_timeout", _positive, 30.0,
        help="a forwarded ping's socket is closed after this many idle seconds")  # fmt: skip
    #: The ``[[route]]`` tables, in order: the first that matches a flow decides where it goes
    #: (``egress.routes.RouteTable``); then ``proxy``; then ``direct``.
    routes: tuple[Route, ...] = ()
    #: A catch-all after the routes (tun2socks' ``-proxy``): every flow no route took.
    proxy: Via | None = setting(
        "egress.proxy", ViaUrl(), None, cli="--proxy", unset="none (direct)",
        help="where flows no [[route]] matched go, e.g. socks5://host:1080 (an http:// proxy "
             "takes TCP; UDP is then rejected)")  # fmt: skip
    #: The connect to a proxy and its handshake (which includes the proxy's own connect to
    #: the destination) end within this many seconds, a stalled or dripping proxy included.
    proxy_handshake_timeout: float = setting(
        "egress.handshake_timeout", _positive, 10.0,
        help="seconds for the connect to a route's proxy and its SOCKS5/CONNECT handshake "
             "together; then the flow fails as unreachable")  # fmt: skip
    #: How long a ``sniff = true`` route waits for a client's first bytes (its TLS SNI or
    #: HTTP Host) before deciding without them (``egress.accepted``).
    sniff_timeout: float = setting(
        "egress.sniff_timeout", _positive, 1.0,
        help="seconds a sniff = true route waits for a client's first bytes (TLS SNI, HTTP "
             "Host) before it decides with the DNS name")  # fmt: skip

    def __post_init__(self) -> None:
        check_fields(self, self._route_rules)

    def _route_rules(self) -> Iterator[tuple[str, str]]:
        if not isinstance(self.routes, tuple) or \
                not all(isinstance(route, Route) for route in self.routes):  # fmt: skip
            yield "route: expected a tuple of Route", "GatewayConfig.routes"
            return
        for problem in name_problems(self.routes):
            yield problem, "GatewayConfig.routes"

    @property
    def keepalive(self) -> Keepalive | None:
        """The keepalive settings together (None: off)."""
        if self.keepalive_idle is None:
            return None
        return Keepalive(self.keepalive_idle, self.keepalive_interval, self.keepalive_count)

    @property
    def pending_dial_share(self) -> int:
        """The SYNs one client may have held while dialing."""
        return share_of(self.max_pending_dials, self.max_pending_dials_per_client)
