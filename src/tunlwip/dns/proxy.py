"""The DNS proxy: answers the clients' port-53 queries by policy, cache and upstreams.

Theory of operation
-------------------
The gateway hands the proxy the UDP sessions and TCP connections it intercepts (port 53 to
the gateway's DNS address; with ``hijack = "all"`` port 53 to any address, so apps with
hard-coded resolvers cannot leak around the policy). Every query is answered in its own task,
so a slow upstream never delays other queries or other packets:

1. read it: a plain query (one question for an ordinary name, at most an EDNS 0 record) from
   its bytes (``summary.summarize_query``), its dnspython message built only when a step
   below needs one (``exchange.Query``); any other query is parsed whole (malformed: FORMERR
   when the header is readable, else a counted drop);
2. policy: overrides, then allow rules, then block rules (``dns.policy``);
3. cache (``dns.cache``), honouring TTLs, negative answers included;
4. upstreams in order with failover (``dns.upstreams``): those of the first ``[[dns.route]]``
   whose domains match the name, else the default ones (``dns.split``); no answer within
   ``query_timeout`` gives the client SERVFAIL. A forwarded answer is walked once from its bytes
   (``summary.summarize``) and goes to the client as the upstream sent it, with the client's
   ID; the cache keeps it in wire form until first served;
5. the answer's CNAME chain is checked against the policy too (cached answers included): one
   leading to a blocked name gets the blocked answer.

Queries in flight are tracked per (client address, client port, message ID): a client's
retransmission of a query still being resolved is dropped, while two clients that happen to
use the same ID are independent. Over UDP an answer larger than the client's EDNS buffer (512
bytes without EDNS) is replaced by an empty answer with TC set, so the client retries over
TCP, where several queries may be pipelined on one connection and are answered as they complete.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import dns.exception
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import trio

from ..config.sections import DnsConfig as DnsConfig
from ..dialer import Dialer
from ..endpoint import Endpoint
from ..shares import ClientCounts
from .cache import DnsCache
from .exchange import Query, Reply
from .names import ResolvedNames
from .policy import (
    ENCRYPTED_DNS_NAMES,
    DnsPolicy,
    blocked_response,
    override_response,
)
from .replay import RecentAnswers
from .split import SplitUpstreams
from .summary import AnswerSummary, name_text, summarize, summarize_query
from .upstreams import UpstreamError, UpstreamSet
from .wire import HEADER_LEN, WireError, header_flags

if TYPE_CHECKING:
    from ..tcp import LwipTcpStream
    from ..udp import UdpSession

log = logging.getLogger("tunlwip.dns")

TCP_MAX_PIPELINED = 64  # queries per connection answered concurrently before reading pauses
RESOLV_CONF = "/etc/resolv.conf"


def _policy(config: DnsConfig) -> DnsPolicy:
    """The configured lists and overrides, plus the DoH resolver names when encrypted DNS is
    rejected."""
    builtin = ENCRYPTED_DNS_NAMES if config.reject_encrypted else ()
    return DnsPolicy.from_files(config.block_files, config.allow_files, config.overrides,
                                builtin_blocked=builtin,
                                builtin_source="dns.reject_encrypted")  # fmt: skip


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


@dataclasses.dataclass
class DnsCounters:
    queries: int = 0
    blocked: int = 0
    #: Of ``blocked``: answers whose CNAME chain led to a blocked name.
    blocked_cname: int = 0
    overridden: int = 0
    cache_hits: int = 0
    forwarded: int = 0
    #: Queries answered SERVFAIL because every upstream failed or the query timed out.
    upstream_failures: int = 0
    timeouts: int = 0
    truncated: int = 0
    #: Dropped: unparseable, a response instead of a query, or a retransmission in flight.
    malformed: int = 0
    formerr: int = 0
    duplicates: int = 0
    #: Answered REFUSED: ``max_in_flight`` queries in flight (overload), or the client had
    #: its share of them in flight (client_share).
    overload: int = 0
    client_share: int = 0
    #: Answered by replaying a recent answer to a byte-identical query (``dns.replay``).
    replayed: int = 0
    #: TCP connections reset for a query not received, or an answer not taken, within
    #: ``tcp_query_timeout``.
    tcp_timeouts: int = 0


class DnsProxy:
    """Answers DNS queries from clients; one instance per gateway."""

    def __init__(self, config: DnsConfig, dialer: Dialer) -> None:
        self.config = config
        urls = config.upstreams or resolv_conf_upstreams()
        if not urls:
            log.warning("DNS: no upstream given and none in %s; queries get SERVFAIL",
                        RESOLV_CONF)  # fmt: skip
        #: The upstreams by name: ``[[dns.route]]``s, then the default ones (``dns.split``).
        self.split = SplitUpstreams.from_config(config, dialer, urls)
        self.policy = self._load_policy()
        self.cache = DnsCache(
            max_entries=config.cache_size,
            min_ttl=config.min_ttl,
            max_ttl=config.max_ttl,
            max_negative_ttl=config.max_negative_ttl,
        )
        self.counters = DnsCounters()
        #: Which name each client resolved to which address (for flow records and status).
        self.names = ResolvedNames()
        self.recent = RecentAnswers()
        self._in_flight: set[tuple[Endpoint, int]] = set()
        #: Queries in flight by client (``shares``), next to ``_in_flight``.
        self.in_flight_per_client = ClientCounts()
        self._retired: list[SplitUpstreams] = []

    def name_for(self, client: Endpoint, address: Endpoint) -> str | None:
        """The name ``client`` resolved through us to ``address``'s IP, if still valid."""
        return self.names.lookup(client.address, address.address, trio.current_time())

    @property
    def upstreams(self) -> UpstreamSet:
        """The default upstreams (those of names no ``[[dns.route]]`` takes)."""
        return self.split.default.upstreams

    @property
    def upstream_urls(self) -> list[str]:
        return [u.url for u in self.upstreams.upstreams]

    def _load_policy(self) -> DnsPolicy:
        return _policy(self.config)

    def reconfigure(self, config: DnsConfig, dialer: Dialer) -> None:
        """Switch to ``config``: policy files, overrides, upstreams and DNS routes, timeouts
        and cache limits. Everything is built first, so a bad file or URL (ConfigError)
        changes nothing. The old upstreams' pooled connections are closed by
        ``close_retired``. New DNS routes start a new cache: a name may now go to other
        servers. ``hijack`` is the gateway's business (it needs a restart)."""
        urls = config.upstreams or resolv_conf_upstreams()
        split = SplitUpstreams.from_config(config, dialer, urls, previous=self.split)
        policy = _policy(config)
        cache_limits = (config.cache_size, config.min_ttl, config.max_ttl, config.max_negative_ttl)
        if config.routes != self.config.routes or cache_limits != (
                self.config.cache_size, self.config.min_ttl, self.config.max_ttl,
                self.config.max_negative_ttl):  # fmt: skip
            self.cache = DnsCache(max_entries=config.cache_size, min_ttl=config.min_ttl,
                                  max_ttl=config.max_ttl,
                                  max_negative_ttl=config.max_negative_ttl)  # fmt: skip
        self._retired.append(self.split)
        self.split, self.policy, self.config = split, policy, config
        self.recent.clear()

    async def close_retired(self) -> None:
        """Close the upstream sets replaced by ``reconfigure``."""
        while self._retired:
            await self._retired.pop().aclose()

    def reload(self, policy: DnsPolicy | None = None) -> DnsPolicy:
        """Swap in ``policy`` (default: re-read the configured files). Queries already being
        answered finish under the old one. On a bad file the old policy stays (ConfigError)."""
        self.policy = policy if policy is not None else self._load_policy()
        self.recent.clear()
        log.info("DNS policy reloaded: %d rules", len(self.policy))
        return self.policy

    async def aclose(self) -> None:
        await self.close_retired()
        await self.split.aclose()

    # -- transports -------------------------------------------------------------------------
    async def serve_udp(self, session: UdpSession) -> None:
        """Answer every query of one client UDP flow, each in its own task."""
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    query = await session.receive()
                except trio.EndOfChannel:
                    return
                answer = self._replay(query, session.client)
                if answer is not None:
                    session.send_nowait(answer)
                    continue
                admitted, refusal = self._admit(query, session.client)
                if not admitted:
                    if refusal is not None:
                        session.send_nowait(refusal)
                    continue
                nursery.start_soon(self._answer_udp, session, query)

    async def _answer_udp(self, session: UdpSession, query: bytes) -> None:
        try:
            answer = await self.answer(query, session.client, max_udp_size=True)
        finally:
            self._release(query, session.client)
        if answer is not None:
            session.send_nowait(answer)  # (the task ends here: no need to yield first)

    async def serve_tcp(self, stream: LwipTcpStream) -> None:
        """RFC 7766: length-prefixed queries, several in flight per connection, each answer
        written as soon as it is ready (so possibly out of order).

        Deadlines, so a client cannot hold a connection and its task by trickling: a query
        must arrive whole within ``tcp_query_timeout`` of its first byte (the idle timeout
        alone restarts with every byte), and each answer must be taken by the client within
        ``tcp_query_timeout`` of being ready (a client that never reads). Past either, the
        connection is reset and counted (``tcp_timeouts``)."""
        client = stream.remote
        send_lock = trio.Lock()
        slots = trio.Semaphore(TCP_MAX_PIPELINED)
        buffer = bytearray()
        config = self.config

        def cut_off(why: str) -> None:
            if nursery.cancel_scope.cancel_called:
                return  # already cut off
            self.counters.tcp_timeouts += 1
            log.debug("dns %s: TCP connection reset: %s", client, why)
            stream.abort()
            nursery.cancel_scope.cancel()

        async def send(message: bytes) -> None:
            with trio.move_on_after(config.tcp_query_timeout) as sending:
                async with send_lock:
                    await stream.send_all(struct.pack("!H", len(message)) + message)
            if sending.cancelled_caught:
                cut_off(f"answer not taken within {config.tcp_query_timeout:g} s")

        async def answer_one(query: bytes) -> None:
            try:
                answer = await self.answer(query, client, max_udp_size=False)
            finally:
                self._release(query, client)
                slots.release()
            if answer is not None:
                try:
                    await send(answer)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    nursery.cancel_scope.cancel()

        async with stream, trio.open_nursery() as nursery:
            query_started = 0.0  # when the first byte of the partial query in buffer came
            while True:
                if buffer:
                    deadline = query_started + config.tcp_query_timeout
                else:
                    deadline = trio.current_time() + config.tcp_idle_timeout
                with trio.move_on_at(deadline) as waited:
                    data = await _receive_or_eof(stream)
                if waited.cancelled_caught and buffer:
                    cut_off(f"query not complete within {config.tcp_query_timeout:g} s")
                    break
                if waited.cancelled_caught or data is None:
                    break
                if not buffer:
                    query_started = trio.current_time()
                buffer += data
                while len(buffer) >= 2:
                    (length,) = struct.unpack_from("!H", buffer)
                    if len(buffer) < 2 + length:
                        break
                    query = bytes(buffer[2 : 2 + length])
                    del buffer[: 2 + length]
                    query_started = trio.current_time()  # the next query's bytes came now
                    admitted, refusal = self._admit(query, client)
                    if not admitted:
                        if refusal is not None:
                            await send(refusal)
                        continue
                    try:
                        await slots.acquire()
                    except BaseException:  # cancelled while waiting: never started
                        self._release(query, client)
                        raise
                    nursery.start_soon(answer_one, query)
            # EOF or idle: the answers still being resolved are written before the close.

    # -- the answer -------------------------------------------------------------------------
    def _replay(self, query: bytes, client: Endpoint) -> bytes | None:
        """The fast path: a recent answer to the same query bytes, with this query's ID."""
        now = trio.current_time()
        entry = self.recent.get(query, now)
        if entry is None:
            return None
        self.counters.queries += 1
        self.counters.replayed += 1
        if entry.addresses:
            self.names.remember_addresses(client.address, entry.name, entry.addresses, now)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("dns %s %s -> replayed", client, entry.name)
        return query[:2] + entry.answer_tail

    def _admit(self, query: bytes, client: Endpoint) -> tuple[bool, bytes | None]:
        """Count the query and say whether to resolve it; if not, what to answer at once.
        Duplicates of a query in flight are dropped (the first one will be answered); beyond
        the client's share of ``max_in_flight``, or ``max_in_flight`` itself, queries get
        REFUSED, so the client tries again or elsewhere at once rather than after a timeout.
        An admitted query must be released (``_release``) whatever happens to it."""
        self.counters.queries += 1
        if len(query) < HEADER_LEN:
            self.counters.malformed += 1
            return False, None
        key = (client, int.from_bytes(query[:2], "big"))
        if key in self._in_flight:
            self.counters.duplicates += 1
            return False, None
        if len(self._in_flight) >= self.config.max_in_flight:
            self.counters.overload += 1
            return False, _refused(query)
        if self.in_flight_per_client.count(client.address) >= self.config.in_flight_share:
            self.counters.client_share += 1
            return False, _refused(query)
        self._in_flight.add(key)
        self.in_flight_per_client.add(client.address)
        return True, None

    def _release(self, query: bytes, client: Endpoint) -> None:
        key = (client, int.from_bytes(query[:2], "big"))
        if key in self._in_flight:
            self._in_flight.remove(key)
            self.in_flight_per_client.release(client.address)

    @property
    def in_flight(self) -> int:
        """Queries being resolved now."""
        return len(self._in_flight)

    async def answer(self, wire: bytes, client: Endpoint, *, max_udp_size: bool) -> bytes | None:
        """The wire answer to one query (None: drop it). ``max_udp_size``: fit the answer in
        the client's UDP buffer, truncating with TC when it does not."""
        started = trio.current_time()
        summary = summarize_query(wire)
        if summary is not None:
            query = Query(wire, summary)
        else:  # not a plain query: the full parse decides, FORMERR and NOTIMP included
            try:
                message = dns.message.from_wire(wire)
            except dns.exception.DNSException:
                return self._formerr(wire)
            if message.flags & dns.flags.QR:
                self.counters.malformed += 1
                return None
            query = Query(wire, None, message)
            if message.opcode() != dns.opcode.QUERY or len(message.question) != 1:
                response = dns.message.make_response(message)
                response.set_rcode(dns.rcode.NOTIMP if message.opcode() != dns.opcode.QUERY
                                   else dns.rcode.FORMERR)  # fmt: skip
                reply = Reply(response, None, None, "refused")
                return self._finish(query, reply, client, started, max_udp_size)[0]
        try:
            reply = await self._resolve(query)
            answer, answer_summary = self._finish(query, reply, client, started, max_udp_size)
        except dns.exception.DNSException:  # a plain-looking query dnspython cannot read
            return self._formerr(wire)
        if max_udp_size:
            self._keep_for_replay(wire, answer_summary, answer)
        return answer

    def _keep_for_replay(self, wire: bytes, summary: AnswerSummary | None, answer: bytes) -> None:
        """Remember a complete NOERROR/NXDOMAIN UDP answer for ``_replay``."""
        if summary is None or len(summary.question) != 1 or answer[2] & 0x02:
            return  # a truncated (TC) answer is not complete
        if summary.rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            return  # failures are not repeated
        self.recent.put(wire, answer, min_ttl=summary.min_ttl_all,
                        name=name_text(summary.question[0][0]),
                        addresses=tuple(summary.addresses), now=trio.current_time())  # fmt: skip

    async def _resolve(self, query: Query) -> Reply:
        verdict = self.policy.check(query.name)
        if verdict.action == "block":
            self.counters.blocked += 1
            return Reply(blocked_response(query.message, self.config.blocked_answer), None,
                         None, verdict.rule)  # fmt: skip
        if verdict.action == "override":
            self.counters.overridden += 1
            return Reply(override_response(query.message, verdict.addresses), None, None,
                         verdict.rule)  # fmt: skip
        route = self.split.pick(query.name)
        route.counters.queries += 1
        cache = self.cache  # (a reload may start a new one: this answer is the old routes')
        now = trio.current_time()
        if query.summary is None or cache.peek(query.cache_key, now):
            cached = cache.get(query.message, now)  # (a parse only for a likely hit)
        else:
            cached = None
        if cached is not None:
            self.counters.cache_hits += 1
            return self._screen(query.message, Reply(cached, None, None, "cache"))
        with trio.move_on_after(self.config.query_timeout) as timeout:
            while True:
                round_started = trio.current_time()
                try:
                    raw, summary, upstream = await route.upstreams.resolve_summarized(query.wire)
                    # (None: truncated, kept as it was; parsing it here may fail)
                    response = dns.message.from_wire(raw) if summary is None else None
                    break
                except (UpstreamError, dns.exception.DNSException) as exc:
                    # Silent upstreams: go round the list again until the query's deadline.
                    # Upstreams that failed at once (refused, bad answer) end it now.
                    if trio.current_time() - round_started < self.config.attempt_timeout:
                        self.counters.upstream_failures += 1
                        route.counters.failures += 1
                        return Reply(self._servfail(query.message), None, None, f"failed: {exc}")
            self.counters.forwarded += 1
            route.counters.forwarded += 1
            if response is not None:
                cache.put(query.message, response, trio.current_time())
                return self._screen(query.message, Reply(response, raw, None, upstream.url))
            assert summary is not None
            cache.put_wire(query.cache_key, raw, summary, trio.current_time())
            reply = Reply(None, raw, summary, upstream.url)
            if summary.has_alias and self.policy.screens_answers:
                try:  # the one case the policy needs the whole message: a CNAME/DNAME chain
                    reply = reply._replace(response=dns.message.from_wire(raw))
                except dns.exception.DNSException as exc:
                    self.counters.upstream_failures += 1
                    route.counters.failures += 1
                    return Reply(self._servfail(query.message), None, None, f"failed: {exc}")
                return self._screen(query.message, reply)
            return reply
        assert timeout.cancelled_caught
        self.counters.timeouts += 1
        self.counters.upstream_failures += 1
        route.counters.failures += 1
        return Reply(self._servfail(query.message), None, None, "timeout")

    def _screen(self, query: dns.message.Message, reply: Reply) -> Reply:
        """Block an answer whose CNAME chain leads to a blocked name, with the answer the
        blocked name gets as a question. Done on every answer, cached ones too, so a reloaded
        block list applies to answers cached before it."""
        assert reply.response is not None
        verdict = self.policy.check_answer(reply.response)
        if verdict.action != "block":
            return reply
        self.counters.blocked += 1
        self.counters.blocked_cname += 1
        return Reply(blocked_response(query, self.config.blocked_answer), None, None,
                      verdict.rule)  # fmt: skip

    def _finish(self, query: Query, reply: Reply, client: Endpoint,
                started: float, max_udp_size: bool
                ) -> tuple[bytes, AnswerSummary | None]:  # fmt: skip
        """The answer's bytes (rendered, or truncated, when needed) and their summary; the
        names the client was given are noted (``names``)."""
        limit = query.udp_size if max_udp_size else 65535
        raw, summary = reply.raw, reply.summary
        if raw is None or len(raw) > limit:
            summary = None
            try:
                response = reply.response
                if response is None:
                    assert raw is not None  # a reply has a message, bytes or both
                    response = dns.message.from_wire(raw)
                raw = response.to_wire(max_size=limit)
            except dns.exception.TooBig:
                raw = self._truncated(query.message, max_udp_size)
            except dns.exception.DNSException:  # an answer that walked but does not parse
                raw = self._truncated(query.message, max_udp_size)
        if summary is None:
            try:
                summary = summarize(raw)
            except WireError:  # not expected of what we render; nothing to note then
                summary = None
        if summary is not None and summary.addresses and len(summary.question) == 1:
            self.names.remember_addresses(client.address, name_text(summary.question[0][0]),
                                          summary.addresses, trio.current_time())  # fmt: skip
        if log.isEnabledFor(logging.DEBUG):
            known = query.summary is not None or len(query.message.question) == 1
            log.debug("dns %s %s %s -> %s via %s in %.1f ms", client,
                      query.name if known else "-",
                      dns.rdatatype.to_text(query.rdtype) if known else "-",
                      dns.rcode.to_text(dns.rcode.Rcode(header_flags(raw) & 0xF)),
                      reply.source, (trio.current_time() - started) * 1000)  # fmt: skip
        return raw, summary

    def _truncated(self, query: dns.message.Message, udp: bool) -> bytes:
        """An empty answer with TC set (UDP: the client retries over TCP); over TCP, where
        nothing larger can be sent, SERVFAIL."""
        self.counters.truncated += 1
        response = dns.message.make_response(query)
        if udp:
            response.flags |= dns.flags.TC
        else:
            response.set_rcode(dns.rcode.SERVFAIL)
        return response.to_wire()

    @staticmethod
    def _servfail(query: dns.message.Message) -> dns.message.Message:
        response = dns.message.make_response(query)
        response.set_rcode(dns.rcode.SERVFAIL)
        return response

    def _formerr(self, wire: bytes) -> bytes | None:
        """FORMERR for an unparseable query whose header is readable; responses and
        fragments of nothing are dropped (answering those could make a loop)."""
        flags = wire[2] if len(wire) >= HEADER_LEN else 0x80
        if flags & 0x80:  # QR set: a response, not a query
            self.counters.malformed += 1
            return None
        self.counters.formerr += 1
        opcode_rd = wire[2] & 0x79  # keep opcode and RD
        return wire[:2] + bytes([0x80 | opcode_rd, dns.rcode.FORMERR]) + bytes(8)


def _refused(query: bytes) -> bytes | None:
    """REFUSED built from the query's header alone (no parse under load); None for a
    response (answering one could make a loop)."""
    if query[2] & 0x80:
        return None
    return query[:2] + bytes([0x80 | (query[2] & 0x79), dns.rcode.REFUSED]) + bytes(8)


async def _receive_or_eof(stream: LwipTcpStream) -> bytes | None:
    try:
        data = await stream.receive_some()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return None
    return data or None
