"""Plain queries forwarded over UDP upstreams without a task: failover as callbacks.

Theory of operation
-------------------
A task per forwarded query, with a cancel scope for its deadline and another for each
attempt, cost more than everything else the proxy does for it. Here a query on its way is one
small object (``Forwarding``) moved along by callbacks, following the rules of
``UpstreamSet.resolve_summarized`` and the proxy's rounds exactly:

* an attempt sends the query on a pooled socket of the next upstream (``UdpSocketPool.send``);
  the pool's reader (a poll-set callback) hands over the datagram that repeats its ID and
  question, or the error that ended it (ECONNREFUSED);
* an answer that does not walk (``summary.summarize_answer``) is that upstream's failure; one
  with SERVFAIL or REFUSED is kept as the fallback and the next upstream is tried; any other
  answer ends the query; a truncated (TC) answer is asked again over TCP in a task of its own
  (rare), within the same attempt;
* an attempt with no answer after ``attempt_timeout`` moves on to the next upstream;
* a round (every upstream once) that ends with no answer gives its fallback if it has one;
  else, if the round failed fast (errors, not silence: shorter than ``attempt_timeout``), the
  query fails now; otherwise the upstreams are asked again, round after round;
* at ``query_timeout`` the query fails ("timeout": the proxy answers SERVFAIL).

Deadlines: each query in flight is in ``_pending`` with the time of its next deadline (its
attempt's or its own, whichever comes first); one task (``keep_deadlines``) sleeps until the
earliest and then walks the table. Deadlines are set in the order queries start with the same
timeouts, so the earliest moves only when the table was empty: arming the task is a float
comparison per query, and it wakes about once per ``attempt_timeout`` under steady load.

Every outcome is reported once to ``on_done(forwarding, answer, failure)``: the answer (the
client's ID restored), its summary and the upstream; or None and why it failed ("timeout"
when the deadline passed). The upstream set's counters (``queries`` per round, ``failures``,
``timeouts``, ``bad_rcodes``, ``all_failed``) count here as in ``UpstreamSet``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import trio

from ..errors import TunlwipError
from .summary import AnswerSummary, summarize_answer
from .transports import UdpUpstream
from .udp_pool import Ticket
from .upstreams import MOVE_ON_RCODES, UpstreamSet
from .wire import FLAG_TC, HEADER_LEN, Question, UpstreamError, describe, exact_question, with_id

log = logging.getLogger("tunlwip.dns.upstreams")

#: (answer with the client's ID, its summary or None when truncated, the upstream).
Answer = tuple[bytes, AnswerSummary | None, UdpUpstream]
OnDone = Callable[["Forwarding", Answer | None, str], None]


class Forwarding:
    """One query on its way to the upstreams; ``context`` is the caller's (who asked)."""

    __slots__ = ("attempt_deadline", "context", "deadline", "errors", "exact", "fallback",
                 "index", "original_id", "question", "request", "round_started", "tcp_scope",
                 "ticket", "upstreams")  # fmt: skip

    def __init__(self, request: bytes, question: Question, upstreams: UpstreamSet,
                 deadline: float, context: Any) -> None:  # fmt: skip
        self.request = request
        self.original_id = int.from_bytes(request[:2], "big")
        self.question = question
        #: The question section as sent (``wire.exact_question``), or b"".
        self.exact = exact_question(request, question)
        self.upstreams = upstreams
        self.deadline = deadline
        self.context = context
        self.attempt_deadline = math.inf
        self.round_started = 0.0
        self.index = -1  # the upstream being asked, in ``upstreams.udp_only``
        self.fallback: Answer | None = None
        self.errors: list[str] = []
        self.ticket: Ticket | None = None
        self.tcp_scope: trio.CancelScope | None = None


class FastForwarder:
    """The queries forwarded without a task and their deadlines. ``spawn`` starts a task (a
    nursery's ``start_soon``), for the rare TCP retry of a truncated answer; ``flush`` is
    called when a task of ours (deadlines, TCP retries) has reported outcomes, which the
    caller may have left waiting for the end of an lwIP call that is not coming."""

    def __init__(self, on_done: OnDone, spawn: Callable[..., object],
                 flush: Callable[[], None],
                 on_dropped: Callable[[Forwarding], None] | None = None) -> None:  # fmt: skip
        self._on_done = on_done
        self._on_dropped = on_dropped
        self._spawn = spawn
        self._flush = flush
        self._pending: dict[Forwarding, None] = {}
        self._on_result_method = self._on_result  # (bound once, not per attempt)
        self._wake = math.inf  # when keep_deadlines must next look
        self._scope: trio.CancelScope | None = None  # its sleep, while it sleeps

    def __len__(self) -> int:
        return len(self._pending)

    def start(self, request: bytes, question: Question, upstreams: UpstreamSet,
              query_timeout: float, context: Any,
              now: float | None = None) -> Forwarding:  # fmt: skip
        """Forward ``request`` (a plain query; ``question`` what an answer must repeat) to
        ``upstreams`` (every one UDP: ``udp_only``); ``now`` is the trio clock, if the caller
        has it. ``on_done`` may be called before this returns (every upstream failed at
        once)."""
        if now is None:
            now = trio.current_time()
        forwarding = Forwarding(request, question, upstreams, now + query_timeout, context)
        self._pending[forwarding] = None
        self._arm(forwarding.deadline)
        self._new_round(forwarding, now)
        return forwarding

    # -- the deadlines ------------------------------------------------------------------------
    async def keep_deadlines(self) -> None:
        """Fire attempt and query deadlines, until cancelled; then every query in flight
        is dropped (its pooled socket's ID freed, no answer, ``on_dropped`` told, so the
        caller can release what it holds for it)."""
        try:
            while True:
                with trio.CancelScope(deadline=self._wake) as self._scope:
                    await trio.sleep_forever()
                self._scope = None
                self._expire(trio.current_time())
                self._flush()
        finally:
            self._scope = None
            dropped = list(self._pending)
            self._pending.clear()
            for forwarding in dropped:
                self._stop_attempt(forwarding)
                if self._on_dropped is not None:
                    self._on_dropped(forwarding)

    def _arm(self, when: float) -> None:
        if when < self._wake:
            self._wake = when
            if self._scope is not None:
                self._scope.deadline = when

    def _expire(self, now: float) -> None:
        wake = math.inf
        for forwarding in list(self._pending):
            if forwarding.deadline <= now:
                self._finish(forwarding, None, "timeout")
                continue
            if forwarding.attempt_deadline <= now:
                upstreams = forwarding.upstreams
                upstreams.count("timeouts")
                url = self._upstream(forwarding).url
                forwarding.errors.append(f"{url}: no answer within {upstreams.attempt_timeout} s")
                log.debug("DNS upstream %s: no answer within %s s", url, upstreams.attempt_timeout)
                self._stop_attempt(forwarding)
                self._next_attempt(forwarding, now)
            if forwarding in self._pending:
                wake = min(wake, forwarding.deadline, forwarding.attempt_deadline)
        self._wake = wake

    # -- a query's way through the upstreams -----------------------------------------------------
    @staticmethod
    def _upstream(forwarding: Forwarding) -> UdpUpstream:
        udp = forwarding.upstreams.udp_only
        assert udp is not None
        return udp[forwarding.index]

    def _new_round(self, forwarding: Forwarding, now: float) -> None:
        forwarding.upstreams.count("queries")
        forwarding.round_started = now
        forwarding.index = -1
        forwarding.fallback = None
        forwarding.errors = []
        self._next_attempt(forwarding, now)

    def _next_attempt(self, forwarding: Forwarding, now: float) -> None:
        """Ask the next upstream; past the last, the round ends."""
        upstreams = forwarding.upstreams
        udp = upstreams.udp_only
        assert udp is not None
        while forwarding.index + 1 < len(udp):
            forwarding.index += 1
            upstream = udp[forwarding.index]
            forwarding.attempt_deadline = now + upstreams.attempt_timeout
            try:
                forwarding.ticket = upstream.pool.send(
                    forwarding.request, forwarding.question, self._on_result_method,
                    forwarding, forwarding.exact, now)  # fmt: skip
            except (OSError, TunlwipError) as exc:  # no socket (fds, protection), no send
                self._failed_attempt(forwarding, describe(exc))
                continue
            self._arm(forwarding.attempt_deadline)
            return
        self._end_round(forwarding, now)

    def _end_round(self, forwarding: Forwarding, now: float) -> None:
        forwarding.attempt_deadline = math.inf
        if forwarding.fallback is not None:
            self._finish(forwarding, forwarding.fallback, "")
            return
        upstreams = forwarding.upstreams
        upstreams.count("all_failed")
        if now - forwarding.round_started < upstreams.attempt_timeout:
            # Upstreams that failed at once (refused, bad answer) end the query now; silent
            # ones are asked again until its deadline.
            reason = "; ".join(forwarding.errors) or "none configured"
            self._finish(forwarding, None, f"failed: all upstreams failed: {reason}")
        else:
            self._new_round(forwarding, now)

    def _failed_attempt(self, forwarding: Forwarding, why: str) -> None:
        forwarding.upstreams.count("failures")
        url = self._upstream(forwarding).url
        forwarding.errors.append(f"{url}: {why}")
        log.debug("DNS upstream %s failed: %s", url, why)

    def _on_result(self, forwarding: Forwarding, answer: bytes | None,
                   error: OSError | None) -> None:  # fmt: skip
        """The pooled socket's reader: the datagram that answers the attempt, or its error."""
        forwarding.ticket = None
        if forwarding not in self._pending:
            return  # (cannot happen: a finished query's ticket is cancelled)
        if answer is None:
            self._failed_attempt(forwarding, describe(error) if error else "no answer")
            self._next_attempt(forwarding, trio.current_time())
            return
        if int.from_bytes(answer[2:4], "big") & FLAG_TC:
            scope = forwarding.tcp_scope = trio.CancelScope()
            self._spawn(self._ask_over_tcp, forwarding, scope)
            return
        self._judge(forwarding, with_id(answer, forwarding.original_id))

    async def _ask_over_tcp(self, forwarding: Forwarding, scope: trio.CancelScope) -> None:
        """A truncated answer, asked again over TCP within the same attempt."""
        upstream = self._upstream(forwarding)
        with scope:
            try:
                answer = await upstream.ask_over_tcp(forwarding.request)
            except UpstreamError as exc:
                forwarding.tcp_scope = None
                self._failed_attempt(forwarding, str(exc))
                self._next_attempt(forwarding, trio.current_time())
            else:
                forwarding.tcp_scope = None
                self._judge(forwarding, answer)
            self._flush()

    def _judge(self, forwarding: Forwarding, answer: bytes) -> None:
        """An answer with the client's ID: the end of the query, or on to the next upstream."""
        exact = forwarding.exact
        try:
            if exact and answer[4:6] == b"\x00\x01" and answer.startswith(exact, HEADER_LEN):
                # The question as sent (the pool's match): its records are what is left to walk.
                summary = summarize_answer(answer, forwarding.question, HEADER_LEN + len(exact))
            else:
                summary = summarize_answer(answer)
        except UpstreamError as exc:
            self._failed_attempt(forwarding, str(exc))
            self._next_attempt(forwarding, trio.current_time())
            return
        result = (answer, summary, self._upstream(forwarding))
        rcode = int.from_bytes(answer[2:4], "big") & 0xF
        if rcode not in MOVE_ON_RCODES:
            self._finish(forwarding, result, "")
            return
        forwarding.upstreams.count("bad_rcodes")
        forwarding.errors.append(f"{result[2].url}: rcode {rcode}")
        forwarding.fallback = result
        self._next_attempt(forwarding, trio.current_time())

    def _stop_attempt(self, forwarding: Forwarding) -> None:
        """Give up the attempt in flight: its ID is freed, its TCP retry cancelled."""
        ticket, forwarding.ticket = forwarding.ticket, None
        if ticket is not None:
            self._upstream(forwarding).pool.cancel(ticket)
        scope, forwarding.tcp_scope = forwarding.tcp_scope, None
        if scope is not None:
            scope.cancel()

    def _finish(self, forwarding: Forwarding, answer: Answer | None, failure: str) -> None:
        self._stop_attempt(forwarding)
        if forwarding in self._pending:  # (reported once)
            del self._pending[forwarding]
            try:
                self._on_done(forwarding, answer, failure)
            except Exception:  # a bug: it must not stop the deadlines or the poll set
                log.exception("DNS: finishing a forwarded query failed")
