"""The DNS proxy: answers the clients' port-53 queries by policy, cache and upstreams.

Theory of operation
-------------------
The gateway hands the proxy the UDP sessions and TCP connections it intercepts (port 53 to
the gateway's DNS address; with ``hijack = "all"`` port 53 to any address, so apps with
hard-coded resolvers cannot leak around the policy). A slow upstream never delays other
queries or other packets; each query goes through these steps:

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

Which queries take a task. While ``run`` runs (the gateway's case), a UDP session has no task:
its datagrams come to ``_on_udp_query`` from the stack's callback, where replayed, refused,
blocked, overridden and cached queries are answered at once, and a plain query for upstreams
that are all ``udp://`` is forwarded by callbacks (``fast_forward``: the same failover and
deadlines, no task); the answers wait for the end of the lwIP call and leave together
(``_send_soon``). A query that is not plain (FORMERR, NOTIMP and the full parse) and one for
TCP, TLS or HTTPS upstreams get a task each, and so does every TCP query (``tcp_clients``).
Without ``run`` (``serve_udp``), every UDP query has a task.
"""

from __future__ import annotations

import functools
import logging
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
from .cache import DnsCache
from .counters import DnsCounters as DnsCounters
from .exchange import Query, Reply
from .fast_forward import Answer, FastForwarder, Forwarding
from .in_flight import InFlightQueries, Refusal
from .names import ResolvedNames
from .policy import (
    ENCRYPTED_DNS_NAMES,
    DnsPolicy,
    blocked_response,
    override_response,
)
from .replay import RecentAnswers
from .split import SplitRoute, SplitUpstreams
from .summary import AnswerSummary, summarize, summarize_query
from .transports import UdpUpstream
from .upstreams import RESOLV_CONF, UpstreamError, UpstreamSet
from .upstreams import resolv_conf_upstreams as resolv_conf_upstreams
from .wire import HEADER_LEN, WireError, header_answer, header_flags

if TYPE_CHECKING:
    from ..stack import LwipStack
    from ..tcp import LwipTcpStream
    from ..udp import UdpSession

log = logging.getLogger("tunlwip.dns")


def _policy(config: DnsConfig) -> DnsPolicy:
    """The configured lists and overrides, plus the DoH resolver names when encrypted DNS is
    rejected."""
    builtin = ENCRYPTED_DNS_NAMES if config.reject_encrypted else ()
    return DnsPolicy.from_files(config.block_files, config.allow_files, config.overrides,
                                builtin_blocked=builtin,
                                builtin_source="dns.reject_encrypted")  # fmt: skip


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
        self._in_flight = InFlightQueries()
        #: Queries in flight by client (``shares``).
        self.in_flight_per_client = self._in_flight.per_client
        self._retired: list[SplitUpstreams] = []
        self._share = config.in_flight_share  # (a property: computed once per config)
        # While ``run`` runs: the stack (its poll set reads the upstream sockets, answers are
        # sent after each pass), the nursery of the queries that need a task, the task-less
        # forwarding, and the answers waiting for the end of the lwIP call (``_send_soon``).
        self._stack: LwipStack | None = None
        self._nursery: trio.Nursery | None = None
        self._fast: FastForwarder | None = None
        self._outbox: list[tuple[UdpSession, bytes]] = []

    def name_for(self, client: Endpoint, address: Endpoint, at: float | None = None) -> str | None:
        """The name ``client`` resolved through us to ``address``'s IP, if still valid (at
        trio time ``at``: a flow opened then and named later; default now)."""
        when = trio.current_time() if at is None else at
        return self.names.lookup(client.address, address.address, when)

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
        self._share = config.in_flight_share
        self._watch_sockets(split)
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
    async def run(
        self, stack: LwipStack, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve UDP sessions without a task (``attach_udp``) until cancelled: the upstream
        sockets are read by ``stack``'s poll set, deadlines kept by one task, and the
        queries that need a task get one here."""
        async with trio.open_nursery() as nursery:
            fast = FastForwarder(self._fast_done, nursery.start_soon, self._flush,
                                 on_dropped=self._fast_dropped)  # fmt: skip
            self._stack, self._nursery, self._fast = stack, nursery, fast
            self._watch_sockets(self.split)
            try:
                nursery.start_soon(fast.keep_deadlines)
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._stack = self._nursery = self._fast = None
                self._watch_sockets(self.split)  # new sockets: a reader task each again

    def _watch_sockets(self, split: SplitUpstreams) -> None:
        """Have the poll set read the UDP upstreams' new sockets (no task per socket)."""
        for route in split.routes:
            for upstream in route.upstreams.upstreams:
                if isinstance(upstream, UdpUpstream):
                    upstream.pool.watcher = self._stack

    def attach_udp(self, session: UdpSession) -> bool:
        """Take a client's UDP flow without a task: its datagrams come to ``_on_udp_query``
        from the stack's callback. False while ``run`` is not running (``serve_udp`` then)."""
        if self._nursery is None:
            return False
        session.divert(functools.partial(self._on_udp_query, session))
        return True

    def _on_udp_query(self, session: UdpSession, query: bytes) -> None:
        """A client datagram, from inside lwIP's UDP callback: answers wait for the end of
        the lwIP call (``_send_soon``). A plain query is answered here or forwarded without
        a task (``fast_forward``); any other gets a task (``_answer_udp``)."""
        client = session.client
        answer = self._replay(query, client)
        if answer is not None:
            self._send_soon(session, answer)
            return
        admitted, refusal = self.admit(query, client)
        if not admitted:
            if refusal is not None:
                self._send_soon(session, refusal)
            return
        try:
            self._take_udp_query(session, query)
        except Exception:  # a bug: the query is given up, the session goes on
            self.release(query, client)
            log.exception("dns %s: a query failed", client)

    def _take_udp_query(self, session: UdpSession, query: bytes) -> None:
        assert self._nursery is not None and self._fast is not None
        summary = summarize_query(query)
        if summary is None:  # not plain: the full parse decides, in a task
            self._nursery.start_soon(self._answer_udp, session, query)
            return
        plain = Query(query, summary)
        started = trio.current_time()
        try:
            decided = self._decide(plain, started)
        except dns.exception.DNSException:  # a plain-looking query dnspython cannot read
            self._complete(session, plain, None, started, started)
            return
        if isinstance(decided, Reply):
            self._complete(session, plain, decided, started, started)
        elif decided[0].upstreams.udp_only is None:  # TCP, TLS or HTTPS upstreams: a task
            self._nursery.start_soon(self._forward_udp, session, plain, decided, started)
        else:
            context = (session, plain, decided, started)  # for _fast_done
            upstreams, timeout = decided[0].upstreams, self.config.query_timeout
            self._fast.start(query, (summary.question,), upstreams, timeout, context, started)

    def _fast_done(self, forwarding: Forwarding, answer: Answer | None, failure: str) -> None:
        """A query forwarded without a task is over (``FastForwarder``'s ``on_done``)."""
        session, query, (route, cache), started = forwarding.context
        now = trio.current_time()
        try:
            if answer is None:
                reply = self._failed(query, route, failure)
            else:
                raw, summary, upstream = answer
                if summary is not None and query.summary is not None:
                    # The pool matched its question to the query's: the same name, read once.
                    summary.name = query.summary.name
                reply = self._forwarded(query, route, cache, raw, summary, upstream.url, now)
        except BaseException:
            self.release(query.wire, session.client)
            raise
        self._complete(session, query, reply, started, now)

    def _fast_dropped(self, forwarding: Forwarding) -> None:
        """A query forwarded without a task was dropped unanswered (the proxy stops): its
        in-flight counts go back, as a cancelled task's would."""
        session, query, _, _ = forwarding.context
        self.release(query.wire, session.client)

    async def _forward_udp(
        self, session: UdpSession, query: Query, route: tuple[SplitRoute, DnsCache], started: float
    ) -> None:
        """A plain query to TCP, TLS or HTTPS upstreams, in a task."""
        try:
            reply = await self._forward(query, *route)
        except BaseException:
            self.release(query.wire, session.client)
            raise
        self._complete(session, query, reply, started, trio.current_time())
        self._flush()  # (a task: not inside an lwIP call)

    def _complete(self, session: UdpSession, query: Query, reply: Reply | None,
                  started: float, now: float) -> None:  # fmt: skip
        """Send ``reply`` to the client (None: the query did not parse, FORMERR), and
        release the query. (``now``, here and below: the trio clock, read once per step.)"""
        answer = None
        try:
            if reply is not None:
                answer, answer_summary = self._finish(query, reply, session.client, started,
                                                      True, now)  # fmt: skip
                self.recent.keep(query.wire, answer_summary, answer, now)
        except dns.exception.DNSException:  # a plain-looking query dnspython cannot read
            answer = None
            reply = None
        finally:
            self.release(query.wire, session.client)
        if reply is None:
            answer = self._formerr(query.wire)
        if answer is not None:
            self._send_soon(session, answer)

    def _send_soon(self, session: UdpSession, answer: bytes) -> None:
        """Send once the current lwIP call returns (this may run inside its callback), with
        the other answers of the same pass: a device with a virtio-net header may take one
        client's equal-sized answers in one write."""
        if not self._outbox and self._stack is not None:
            self._stack.call_after_lwip(self._flush)
        self._outbox.append((session, answer))

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, []
        if not outbox:
            return
        if self._stack is None:  # stopped: the sessions end with the gateway
            return
        with self._stack.output_burst():
            for session, answer in outbox:
                session.send_nowait(answer)

    async def serve_udp(self, session: UdpSession) -> None:
        """Answer every query of one client UDP flow, each in its own task (the way without
        ``run``: an embedder's proxy, say)."""
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
                admitted, refusal = self.admit(query, session.client)
                if not admitted:
                    if refusal is not None:
                        session.send_nowait(refusal)
                    continue
                nursery.start_soon(self._answer_udp, session, query)

    async def _answer_udp(self, session: UdpSession, query: bytes) -> None:
        try:
            answer = await self.answer(query, session.client, max_udp_size=True)
        finally:
            self.release(query, session.client)
        if answer is not None:
            session.send_nowait(answer)  # (the task ends here: no need to yield first)

    async def serve_tcp(self, stream: LwipTcpStream) -> None:
        """Answer the queries of one client TCP connection (``tcp_clients``: imported by the
        first one, as most clients never ask over TCP)."""
        from .tcp_clients import serve_tcp_client

        await serve_tcp_client(self, stream)

    # -- the answer -------------------------------------------------------------------------
    def _replay(self, query: bytes, client: Endpoint) -> bytes | None:
        """The fast path: a recent answer to the same query bytes, with this query's ID."""
        now = trio.current_time()
        entry = self.recent.get(query, now)
        if entry is None:
            return None
        self.counters.queries += 1
        self.counters.replayed += 1
        if entry.addresses and entry.noted_for != client.address:
            self.names.remember_addresses(client.address, entry.name, entry.addresses, now)
            entry.noted_for = client.address
        if log.isEnabledFor(logging.DEBUG):
            log.debug("dns %s %s -> replayed", client, entry.name)
        return query[:2] + entry.answer_tail

    def admit(self, query: bytes, client: Endpoint) -> tuple[bool, bytes | None]:
        """Count the query and say whether to resolve it; if not, what to answer at once.
        Duplicates of a query in flight are dropped (the first one will be answered); beyond
        the client's share of ``max_in_flight``, or ``max_in_flight`` itself, queries get
        REFUSED, so the client tries again or elsewhere at once rather than after a timeout.
        An admitted query must be released (``release``) whatever happens to it."""
        self.counters.queries += 1
        if len(query) < HEADER_LEN:
            self.counters.malformed += 1
            return False, None
        refusal = self._in_flight.admit(query, client, self.config.max_in_flight, self._share)
        if refusal is None:
            return True, None
        if refusal is Refusal.DUPLICATE:
            self.counters.duplicates += 1
            return False, None
        if refusal is Refusal.OVERLOAD:
            self.counters.overload += 1
        else:
            self.counters.client_share += 1
        return False, header_answer(query, dns.rcode.REFUSED)

    def release(self, query: bytes, client: Endpoint) -> None:
        self._in_flight.release(query, client)

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
                return self._finish(query, reply, client, started, max_udp_size, started)[0]
        try:
            reply = await self._resolve(query)
            answer, answer_summary = self._finish(query, reply, client, started, max_udp_size,
                                                  trio.current_time())  # fmt: skip
        except dns.exception.DNSException:  # a plain-looking query dnspython cannot read
            return self._formerr(wire)
        if max_udp_size:
            self.recent.keep(wire, answer_summary, answer, trio.current_time())
        return answer

    async def _resolve(self, query: Query) -> Reply:
        decided = self._decide(query, trio.current_time())
        if isinstance(decided, Reply):
            return decided
        return await self._forward(query, *decided)

    def _decide(self, query: Query, now: float) -> Reply | tuple[SplitRoute, DnsCache]:
        """What needs no upstream: the policy's answer, or a cached one; else the route to
        forward on and the cache its answer goes to (a reload may start a new cache: this
        answer is the old routes')."""
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
        cache = self.cache
        if query.summary is None or cache.peek(query.cache_key, now):
            cached = cache.get(query.message, now)  # (a parse only for a likely hit)
        else:
            cached = None
        if cached is not None:
            self.counters.cache_hits += 1
            return self._screen(query.message, Reply(cached, None, None, "cache"))
        return route, cache

    async def _forward(self, query: Query, route: SplitRoute, cache: DnsCache) -> Reply:
        """Ask the route's upstreams, in a task (see ``fast_forward`` for the way without)."""
        with trio.move_on_after(self.config.query_timeout) as timeout:
            while True:
                round_started = trio.current_time()
                try:
                    raw, summary, upstream = await route.upstreams.resolve_summarized(query.wire)
                    break
                except UpstreamError as exc:
                    # Silent upstreams: go round the list again until the query's deadline.
                    # Upstreams that failed at once (refused, bad answer) end it now.
                    if trio.current_time() - round_started < self.config.attempt_timeout:
                        return self._failed(query, route, f"failed: {exc}")
            return self._forwarded(query, route, cache, raw, summary, upstream.url,
                                   trio.current_time())  # fmt: skip
        assert timeout.cancelled_caught
        return self._failed(query, route, "timeout")

    def _forwarded(self, query: Query, route: SplitRoute, cache: DnsCache, raw: bytes,
                   summary: AnswerSummary | None, source: str, now: float) -> Reply:  # fmt: skip
        """An upstream's answer: counted, cached, and screened when it has a CNAME chain.
        ``summary`` is None for a truncated answer that did not walk: parsed whole here."""
        if summary is None:
            try:
                response = dns.message.from_wire(raw)
            except dns.exception.DNSException as exc:
                return self._failed(query, route, f"failed: {exc}")
            self.counters.forwarded += 1
            route.counters.forwarded += 1
            cache.put(query.message, response, now)
            return self._screen(query.message, Reply(response, raw, None, source))
        self.counters.forwarded += 1
        route.counters.forwarded += 1
        cache.put_wire(query.cache_key, raw, summary, now)
        reply = Reply(None, raw, summary, source)
        if summary.has_alias and self.policy.screens_answers:
            try:  # the one case the policy needs the whole message: a CNAME/DNAME chain
                reply = reply._replace(response=dns.message.from_wire(raw))
            except dns.exception.DNSException as exc:
                return self._failed(query, route, f"failed: {exc}")
            return self._screen(query.message, reply)
        return reply

    def _failed(self, query: Query, route: SplitRoute, why: str) -> Reply:
        """SERVFAIL: every upstream failed (``why`` says how), or "timeout"."""
        if why == "timeout":
            self.counters.timeouts += 1
        self.counters.upstream_failures += 1
        route.counters.failures += 1
        return Reply(self._servfail(query.message), None, None, why)

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
                started: float, max_udp_size: bool, now: float
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
            self.names.remember_addresses(client.address, summary.question_name(),
                                          summary.addresses, now)  # fmt: skip
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
        answer = header_answer(wire, dns.rcode.FORMERR)
        if answer is None:
            self.counters.malformed += 1
        else:
            self.counters.formerr += 1
        return answer
