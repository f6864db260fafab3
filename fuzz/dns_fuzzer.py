#!/usr/bin/env python3
"""atheris harness for the DNS proxy: arbitrary client queries and arbitrary upstream answers.

Each input runs ``DnsProxy.answer`` (and the replay fast path ``serve_udp`` tries first) in a
fresh proxy, or, with mode & 0x80, the proxy's task-less UDP path (``DnsProxy.run``: the
session callback, ``fast_forward``'s failover and deadlines, answers sent after the "lwIP
call"), under trio's autojump clock so upstream timeouts cost no real time. The upstream
is a real ``udp://`` upstream pointed at a responder on 127.0.0.1 (UDP, and TCP on the same
port for the truncated-answer retry), so the upstream code's own checks run too.

Input: a mode byte, then the body.
  mode & 1 == 0: the body is the client's query; the responder answers it properly (when it
                 parses) or with SERVFAIL. mode & 2: answer as for UDP (client buffer size).
  mode & 1 == 1: the client asks QUERIES[mode >> 4]; the body is the upstream's answer.
                 mode & 2: splice the query's question into the body after its 12-byte
                 header (so the answer matches and its records get parsed); mode & 4: keep
                 the body's ID (usually a mismatch: the upstream ignores it, then times out);
                 mode & 8: ask twice (cache, replay).
  mode & 0x80: through the task-less path, with a stand-in for the stack (``_TrioStack``: its
               watched sockets read by trio tasks) and for the client's UDP session.
A finding is any exception out of the proxy, or an answer that breaks what clients rely on:
the query's ID, and a UDP answer that fits the client's buffer.

    .venv/bin/python fuzz/dns_fuzzer.py [libFuzzer options] CORPUS_DIR
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import atheris
import trio.lowlevel

with atheris.instrument_imports(include=["dns", "tunlwip"]):
    import dns.flags
    import dns.message
    import dns.rcode
    import dns.rrset
    import trio
    import trio.testing

    from tunlwip.dialer import Dialer
    from tunlwip.dns.proxy import DnsConfig, DnsProxy
    from tunlwip.endpoint import Endpoint

CLIENT = Endpoint.parse("198.18.0.2", 5353)


def _with_id(wire: bytes) -> bytes:
    return b"\x12\x34" + wire[2:]  # fixed: an input must replay the same way


QUERIES = [
    _with_id(dns.message.make_query(name, rdtype, use_edns=edns).to_wire())
    for name, rdtype, edns in [
        ("example.com.", "A", True), ("example.net.", "AAAA", False),
        ("blocked.test.", "A", True), ("override.test.", "AAAA", False),
        ("example.org.", "TXT", True), ("example.com.", "MX", False),
    ]
]  # fmt: skip
_TMP = tempfile.TemporaryDirectory(prefix="tunlwip-dns-fuzz-")
BLOCK_FILE = Path(_TMP.name) / "block.txt"
BLOCK_FILE.write_text("blocked.test\n||ads.test^\n0.0.0.0 tracker.test\n")
OVERRIDES = {"override.test": ["192.0.2.7", "2001:db8::7"]}


class _Formatting(logging.Handler):
    """Format every record, so the proxy's debug lines are exercised, and drop it; keep the
    errors logged with a traceback (a callback's bug, caught so the poll set goes on)."""

    def __init__(self) -> None:
        super().__init__()
        self.errors: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = self.format(record)
        if record.exc_info is not None and record.levelno >= logging.ERROR:
            self.errors.append(text)


_HANDLER = _Formatting()


def _question_len(query: bytes) -> int:
    """Length of the (single, uncompressed) question section of a query we sent."""
    i = 12
    while i < len(query) and query[i] != 0:
        i += 1 + query[i]
    return min(i + 1 + 4, len(query)) - 12


def _good_answer(query: bytes) -> bytes:
    try:
        message = dns.message.from_wire(query)
        response = dns.message.make_response(message)
        if message.question and message.question[0].rdtype == 1:
            name = message.question[0].name
            response.answer.append(dns.rrset.from_text(name, 60, "IN", "A", "192.0.2.1"))
        return response.to_wire()
    except Exception:
        return query[:2] + b"\x81\x82" + bytes(8)  # SERVFAIL


def _upstream_answer(mode: int, body: bytes, query: bytes) -> bytes:
    if not mode & 1:
        return _good_answer(query)
    if mode & 2:
        header = bytearray(body[:12].ljust(12, b"\0"))
        header[4:6] = b"\x00\x01"  # one question
        body = bytes(header) + query[12 : 12 + _question_len(query)] + body[12:]
    if not mode & 4:
        body = query[:2] + body[2:]
    return body


async def _serve(mode: int, body: bytes, udp: trio.socket.SocketType,
                 listeners: list[trio.SocketListener]) -> None:  # fmt: skip
    async def over_tcp(stream: trio.SocketStream) -> None:
        try:
            async with stream:
                head = await stream.receive_some(65537)
                if len(head) >= 2:
                    (n,) = struct.unpack_from("!H", head)
                    answer = _upstream_answer(mode, body, head[2 : 2 + n])[:65535]
                    await stream.send_all(struct.pack("!H", len(answer)) + answer)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async with trio.open_nursery() as nursery:
        if listeners:
            nursery.start_soon(trio.serve_listeners, over_tcp, listeners)
        while True:
            query, addr = await udp.recvfrom(65535)
            await udp.sendto(_upstream_answer(mode, body, query)[:65507], addr)


async def _one_input(mode: int, body: bytes) -> None:
    udp = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await udp.bind(("127.0.0.1", 0))
    port = udp.getsockname()[1]
    try:
        listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    except OSError:
        listeners = []  # the TCP retry then fails fast (refused), also a path worth running
    config = DnsConfig(upstreams=(f"udp://127.0.0.1:{port}",), block_files=(str(BLOCK_FILE),),
                       overrides=OVERRIDES)  # fmt: skip
    proxy = DnsProxy(config, Dialer())
    if mode & 1:
        wires = [QUERIES[(mode >> 4) % len(QUERIES)]] * (2 if mode & 8 else 1)
        udp_size = True
    else:
        wires = [body]
        udp_size = bool(mode & 2)
    with udp:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_serve, mode, body, udp, listeners)
            if mode & 0x80:
                await _without_tasks(proxy, wires, config.query_timeout)
                wires = []
            for wire in wires:
                answer = proxy._replay(wire, CLIENT) if udp_size else None
                if answer is None:
                    if not proxy.admit(wire, CLIENT)[0]:
                        continue
                    try:
                        answer = await proxy.answer(wire, CLIENT, max_udp_size=udp_size)
                    finally:
                        proxy.release(wire, CLIENT)
                _check(wire, answer, udp_size)
            nursery.cancel_scope.cancel()
        for listener in listeners:
            await listener.aclose()
    await proxy.aclose()


class _TrioStack:
    """What ``DnsProxy.run`` uses of a stack, on trio alone: each watched socket read by a
    task that calls its callback when readable, then the calls deferred "after lwIP"."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self._watches: dict[int, trio.CancelScope] = {}
        self._after: list[Callable[[], None]] = []

    def watch_readable(self, fd: int, on_ready: Callable[[], None]) -> int:
        token = len(self._watches) + 1
        self._watches[token] = scope = trio.CancelScope()
        self._nursery.start_soon(self._watch, fd, on_ready, scope)
        return token

    async def _watch(self, fd: int, on_ready: Callable[[], None], scope: trio.CancelScope) -> None:
        with scope:
            try:
                while True:
                    await trio.lowlevel.wait_readable(fd)
                    on_ready()
                    self.after_lwip()
            except trio.ClosedResourceError:
                pass

    def unwatch(self, fd: int, token: int) -> None:
        self._watches.pop(token).cancel()
        trio.lowlevel.notify_closing(fd)

    def call_after_lwip(self, fn: Callable[[], None]) -> None:
        self._after.append(fn)

    def after_lwip(self) -> None:
        while self._after:
            after, self._after = self._after, []
            for fn in after:
                fn()

    @contextlib.contextmanager
    def output_burst(self) -> Iterator[None]:
        yield


class _Session:
    """A client's UDP session as the proxy sees it: its address, its datagrams, its answers."""

    def __init__(self) -> None:
        self.client = CLIENT
        self.deliver: Callable[[bytes], None] | None = None
        self.answers: list[bytes] = []
        self.answered = trio.Event()

    def divert(self, deliver: Callable[[bytes], None]) -> None:
        self.deliver = deliver

    def send_nowait(self, data: bytes) -> None:
        self.answers.append(data)
        self.answered.set()


async def _without_tasks(proxy: DnsProxy, wires: list[bytes], query_timeout: float) -> None:
    """Each query through ``DnsProxy.run``'s path; at most one answer each, checked, and
    nothing left in flight."""
    async with trio.open_nursery() as nursery:
        stack = _TrioStack(nursery)
        await nursery.start(proxy.run, stack)
        session = _Session()
        if not proxy.attach_udp(session):  # type: ignore[arg-type]
            raise AssertionError("the running proxy did not take the session")
        assert session.deliver is not None
        for wire in wires:
            session.answers.clear()
            session.answered = trio.Event()
            session.deliver(wire)
            stack.after_lwip()
            if proxy.in_flight:  # (else dropped, or answered at once)
                with trio.move_on_after(query_timeout + 1):
                    await session.answered.wait()
                await trio.lowlevel.checkpoint()  # the query's last steps after its answer
            if proxy.in_flight:
                raise AssertionError("a query outlived its deadline")
            stack.after_lwip()
            if len(session.answers) > 1:
                raise AssertionError(f"{len(session.answers)} answers to one query")
            for answer in session.answers:
                _check(wire, answer, True)
        nursery.cancel_scope.cancel()


def _check(wire: bytes, answer: bytes | None, udp_size: bool) -> None:
    """What a client relies on: its ID back, and a UDP answer within its buffer."""
    if answer is None:
        return
    if not isinstance(answer, bytes) or len(answer) < 12 or len(answer) > 65535:
        raise AssertionError(f"bad answer: {answer!r:.80}")
    if answer[:2] != wire[:2]:
        raise AssertionError(f"answer ID {answer[:2]!r} for query ID {wire[:2]!r}")
    if not answer[2] & 0x80:
        raise AssertionError("the answer has QR clear")
    if udp_size:
        try:
            limit = _client_udp_limit(dns.message.from_wire(wire))
        except Exception:
            limit = 512
        if len(answer) > limit:
            raise AssertionError(f"UDP answer of {len(answer)} bytes for a {limit}-byte buffer")


def _client_udp_limit(query: dns.message.Message) -> int:
    """The largest UDP answer the client takes (RFC 6891), computed here rather than asked of
    the proxy, so a mistake there is a finding: 512 without EDNS, else its payload size (not
    below 512)."""
    return 512 if query.edns < 0 else max(512, min(query.payload, 65535))


def test_one_input(data: bytes) -> None:
    if not data:
        return
    trio.run(_one_input, data[0], data[1:], clock=trio.testing.MockClock(autojump_threshold=0))
    if _HANDLER.errors:
        errors, _HANDLER.errors = _HANDLER.errors, []
        raise AssertionError("logged an error:\n" + errors[0])


def main() -> None:
    for name in ("tunlwip", "dns"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.DEBUG)
        logger.addHandler(_HANDLER)
        logger.propagate = False
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
