"""The pool of UDP upstream sockets against a hostile server and spoofers on loopback.

Why: sharing sockets across queries must not make an off-path spoofer's job easier than it
was with a socket per query beyond what the module docstring accepts: a datagram is taken only
with the ID of a query in flight on that socket and that query's question, from the connected
upstream's address and port; IDs and ports keep changing; a query that gave up frees its ID;
a slow query holds up nothing else. Timeouts are real but short: trio's autojump clock would
jump while the kernel is still moving loopback packets.
"""

from __future__ import annotations

import itertools
import socket
import struct

import pytest
import trio
import trio.testing

from tunlwip.dialer import Dialer
from tunlwip.dns.transports import UdpUpstream
from tunlwip.dns.udp_pool import UdpSocketPool
from tunlwip.dns.upstreams import parse_upstream
from tunlwip.dns.wire import parse_request
from tunlwip.endpoint import Endpoint

from dnsservers import CLIENT_ID, HOST, addresses, answer_for, make_query, message_id


class HostileServer:
    """Answers every query, but first sends what a spoofer or a confused server might: the
    right ID with another question, a wrong ID with the right question, the right ID and
    question without QR, and garbage. Queries for names starting "slow" are answered after
    ``delay`` seconds; with ``late`` the real answer comes only after ``delay`` too."""

    SPOOFS = 4

    def __init__(self, delay: float = 0.5) -> None:
        self.delay = delay
        self.port = 0
        self.queries: list[tuple[int, int]] = []  # (ID, source port)
        self.received = trio.Event()  # the first query

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as sock:
            await sock.bind((HOST, 0))
            self.port = sock.getsockname()[1]
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    data, peer = await sock.recvfrom(65535)
                    self.queries.append((message_id(data), peer[1]))
                    self.received.set()
                    nursery.start_soon(self._answer, sock, data, peer)

    async def _answer(
        self, sock: trio.socket.SocketType, data: bytes, peer: tuple[str, int]
    ) -> None:
        real = answer_for(data, "192.0.2.1")
        other = answer_for(make_query("other.test.", message_id(data)), "203.0.113.1")
        wrong_id = (
            struct.pack("!H", message_id(data) ^ 0x5555) + answer_for(data, "203.0.113.2")[2:]
        )
        not_response = real[:2] + bytes([real[2] & 0x7F]) + real[3:]
        for spoof in (other, wrong_id, not_response, b"\x12garbage"):
            await sock.sendto(spoof, peer)
        if b"slow" in data:
            await trio.sleep(self.delay)
        await sock.sendto(real, peer)


async def answered_past_spoofs(upstream: UdpUpstream, names: tuple[str, ...], spoofs: int) -> None:
    """Ask ``upstream`` each name: the real answer comes back, after ``spoofs`` datagrams per
    query that the pool ignored and counted; then close it."""
    with trio.fail_after(5):
        for name in names:
            answer = await upstream.query(make_query(name))
            assert message_id(answer) == CLIENT_ID
            assert addresses(answer) == ["192.0.2.1"]
    assert upstream.pool.ignored == len(names) * spoofs
    await upstream.aclose()


async def test_spoofed_datagrams_are_ignored_and_counted(nursery: trio.Nursery) -> None:
    server = HostileServer()
    await nursery.start(server.run)
    upstream = parse_upstream(f"udp://{HOST}:{server.port}", Dialer())
    assert isinstance(upstream, UdpUpstream)
    # 0x20 case: the question matches whatever the case
    await answered_past_spoofs(upstream, ("a.test.", "B.TeSt."), HostileServer.SPOOFS)


async def test_an_answer_from_another_port_is_not_taken(nursery: trio.Nursery) -> None:
    """A spoofer who knows the ID, the question and our port, but sends from elsewhere: the
    socket is connected, so the kernel drops it."""
    server = HostileServer(delay=0.3)
    await nursery.start(server.run)
    upstream = UdpUpstream("udp://test", Dialer(), Endpoint.parse(HOST, server.port))
    query = make_query("slow.test.")
    result: list[bytes] = []
    answered = trio.Event()

    async def ask() -> None:
        result.append(await upstream.query(query))
        answered.set()

    with trio.fail_after(5):
        nursery.start_soon(ask)
        await server.received.wait()
        sent_id, port = server.queries[0]
        forged = struct.pack("!H", sent_id) + answer_for(query, "203.0.113.66")[2:]
        with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as spoofer:
            await spoofer.sendto(forged, (HOST, port))
        await answered.wait()
    assert addresses(result[0]) == ["192.0.2.1"]
    await upstream.aclose()


async def test_ids_and_ports_are_unpredictable(nursery: trio.Nursery) -> None:
    server = HostileServer()
    await nursery.start(server.run)
    upstream = UdpUpstream("udp://test", Dialer(), Endpoint.parse(HOST, server.port))
    with trio.fail_after(10):
        for i in range(200):
            await upstream.query(make_query(f"n{i}.test."))
    ids = [query_id for query_id, _ in server.queries]
    ports = {port for _, port in server.queries}
    assert len(set(ids)) > 190, "IDs repeat"
    steps = sum(1 for a, b in itertools.pairwise(ids) if (b - a) % 0x10000 < 16)
    assert steps < 5, "IDs look sequential"
    assert len(ports) >= upstream.pool.size, "fewer ports than the pool holds"
    await upstream.aclose()


async def test_sockets_are_rotated_and_retired_ones_closed(nursery: trio.Nursery) -> None:
    server = HostileServer()
    await nursery.start(server.run)
    opened = []
    dialer = Dialer()

    def open_socket():  # type: ignore[no-untyped-def]
        sock = dialer.open_udp(Endpoint.parse(HOST, server.port))
        opened.append(sock)
        return sock

    pool = UdpSocketPool(open_socket, size=2, max_uses=3)
    request = make_query()
    _, question = parse_request(request)
    with trio.fail_after(5):
        for _ in range(12):
            await pool.exchange(request, question)
    assert pool.opened >= 4
    assert pool.sockets == 2
    assert len({port for _, port in server.queries}) >= 4
    assert sum(1 for sock in opened if sock.fileno() >= 0) == 2, "retired sockets left open"
    pool.close()  # nothing in flight: every socket closes at once
    assert all(sock.fileno() < 0 for sock in opened)


async def test_a_query_that_gives_up_frees_its_id_and_its_late_answer_is_ignored(
    nursery: trio.Nursery,
) -> None:
    server = HostileServer(delay=0.3)
    await nursery.start(server.run)
    pool = UdpSocketPool(lambda: Dialer().open_udp(Endpoint.parse(HOST, server.port)), size=1)
    request = make_query("slow.test.")
    _, question = parse_request(request)
    with trio.move_on_after(0.1):
        await pool.exchange(request, question)
    (slot,) = pool._live
    assert not slot.pending
    await trio.sleep(0.5)  # the late answer and the spoofs arrive
    assert pool.ignored == HostileServer.SPOOFS + 1
    pool.close()


async def test_a_slow_query_does_not_hold_up_others_on_the_same_socket(
    nursery: trio.Nursery,
) -> None:
    server = HostileServer(delay=1.0)
    await nursery.start(server.run)
    pool = UdpSocketPool(lambda: Dialer().open_udp(Endpoint.parse(HOST, server.port)), size=1)
    slow = make_query("slow.test.")
    fast = make_query("fast.test.")
    done: list[str] = []

    async def ask(name: str, request: bytes) -> None:
        await pool.exchange(request, parse_request(request)[1])
        done.append(name)

    with trio.fail_after(5):
        async with trio.open_nursery() as inner:
            inner.start_soon(ask, "slow", slow)
            await trio.sleep(0.05)
            started = trio.current_time()
            await ask("fast", fast)
            assert trio.current_time() - started < 0.5
            assert done == ["fast"]
    assert done == ["fast", "slow"]
    pool.close()


async def test_a_closed_pool_answers_the_queries_in_flight_and_refuses_new_ones(
    nursery: trio.Nursery,
) -> None:
    """What a configuration reload does to the old upstreams: queries already sent still get
    their answers, then the sockets close."""
    server = HostileServer(delay=0.3)
    await nursery.start(server.run)
    pool = UdpSocketPool(lambda: Dialer().open_udp(Endpoint.parse(HOST, server.port)))
    request = make_query("slow.test.")
    _, question = parse_request(request)
    answers: list[bytes] = []

    async def ask() -> None:
        answers.append(await pool.exchange(request, question))

    with trio.fail_after(2):
        async with trio.open_nursery() as inner:
            inner.start_soon(ask)
            inner.start_soon(ask)
            await trio.sleep(0.1)
            pool.close()
            assert pool._live, "closed under the queries in flight"
    assert [addresses(a) for a in answers] == [["192.0.2.1"]] * 2
    assert not pool._live
    with pytest.raises(OSError, match="closed"):
        await pool.exchange(request, question)


def test_random_numbers_are_uniform_below_any_limit() -> None:
    from collections import Counter

    from tunlwip.dns.udp_pool import _RandomBytes

    draws = _RandomBytes()
    assert {draws.below(1) for _ in range(100)} == {0}
    counts = Counter(draws.below(3) for _ in range(30_000))  # 3 does not divide 2**16
    assert set(counts) == {0, 1, 2}
    assert all(9_000 < n < 11_000 for n in counts.values())
    assert len({draws.below(0x10000) for _ in range(1000)}) > 970  # ~8 repeats expected


async def test_a_socket_that_cannot_be_replaced_stays_in_use(nursery: trio.Nursery) -> None:
    server = HostileServer()
    await nursery.start(server.run)
    dialer = Dialer()
    failing = False

    def open_socket():  # type: ignore[no-untyped-def]
        if failing:
            raise OSError(24, "Too many open files")
        return dialer.open_udp(Endpoint.parse(HOST, server.port))

    pool = UdpSocketPool(open_socket, size=1, max_uses=2)
    request = make_query()
    _, question = parse_request(request)
    with trio.fail_after(5):
        await pool.exchange(request, question)
        failing = True
        for _ in range(3):
            assert addresses(await pool.exchange(request, question)) == ["192.0.2.1"]
    assert pool.opened == 1 and pool.sockets == 1
    pool.close()


async def test_a_socket_closed_before_its_reader_ran_ends_the_reader_quietly(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    server = HostileServer()
    await nursery.start(server.run)
    pool = UdpSocketPool(lambda: Dialer().open_udp(Endpoint.parse(HOST, server.port)))
    for _ in range(3):
        pool._take(trio.current_time())  # a socket and its reader task, which has not run yet
    pool.close()
    await trio.testing.wait_all_tasks_blocked()
    assert "reader failed" not in caplog.text
    assert not pool._live


class CaseChangingServer:
    """Answers with the question's name in upper case (a resolver may echo 0x20 case its own
    way), after datagrams that repeat the question byte for byte and still answer nothing:
    without QR, and with the question's bytes but a question count of two."""

    SPOOFS = 2

    def __init__(self) -> None:
        self.port = 0

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as sock:
            await sock.bind((HOST, 0))
            self.port = sock.getsockname()[1]
            task_status.started()
            while True:
                data, peer = await sock.recvfrom(65535)
                real = answer_for(data, "192.0.2.1")
                not_response = real[:2] + bytes([real[2] & 0x7F]) + real[3:]
                two_questions = real[:5] + b"\x02" + real[6:]
                for spoof in (not_response, two_questions):
                    await sock.sendto(spoof, peer)
                name_end = real.index(b"\x00", 12)
                await sock.sendto(real[:12] + real[12:name_end].upper() + real[name_end:], peer)


async def test_an_answer_is_matched_by_its_question_whatever_its_case(
    nursery: trio.Nursery,
) -> None:
    """The bytes of the question as sent are only a shortcut: an answer that spells it in
    another case is read and matched, and one that repeats the bytes is still checked for
    QR and the question count."""
    server = CaseChangingServer()
    await nursery.start(server.run)
    upstream = UdpUpstream("udp://test", Dialer(), Endpoint.parse(HOST, server.port))
    await answered_past_spoofs(upstream, ("a.test.", "MiXeD.test."), CaseChangingServer.SPOOFS)


async def test_a_socket_with_no_query_waiting_is_still_drained(nursery: trio.Nursery) -> None:
    """After the answer to its last query, the reader stops reading: what comes later (a
    duplicate, garbage) wakes it again and is ignored, never left to fill the socket."""

    async def echo_thrice(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as sock:
            await sock.bind((HOST, 0))
            task_status.started(sock.getsockname()[1])
            while True:
                data, peer = await sock.recvfrom(65535)
                real = answer_for(data, "192.0.2.1")
                for datagram in (real, real, b"\x00garbage"):  # a duplicate, then garbage
                    await sock.sendto(datagram, peer)

    port = await nursery.start(echo_thrice)
    pool = UdpSocketPool(lambda: _connected(port), size=1)
    with trio.fail_after(5):
        request = make_query("x.test.")
        answer = await pool.exchange(request, parse_request(request)[1])
        assert addresses(answer) == ["192.0.2.1"]
        while pool.ignored < 2:  # noqa: ASYNC110 - a counter of the pool's reader: no event
            await trio.sleep(0.01)
    assert pool.ignored == 2
    pool.close()


def _connected(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.connect((HOST, port))
    return sock
