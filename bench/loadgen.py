"""Small servers and load generators that bench/run.py starts inside the test namespaces.

Why a script of its own: every program must run in a namespace (``ip netns exec``), so each
service or client is a separate process whose result comes back as one JSON line on stdout.
Stdlib only, and every loop is bounded by a count and a deadline, so a broken path ends a
measurement with partial numbers instead of hanging the run.

Over 600 lines on purpose: every server and client is a subcommand of this one stdlib script,
so the harness and the soak start each by a single path, with nothing to import inside the
namespaces.

Servers (in ``srv``, dual-stack on ``::``)::

    serve connect PORT   read 1 byte, answer 1 byte, close     (connection rate)
    serve echo PORT      echo until EOF, TCP_NODELAY           (request/response)
    serve udp-echo PORT  echo every datagram                   (UDP sessions)
    serve hold PORT      send 1 byte on accept, then hold      (idle TCP connections)

Clients (in ``cli``)::

    probe HOST PORT            wait until a TCP connect succeeds
    connrate HOST PORT         N connect / 1 byte / close, serial or P threads; p50/p99
    rr HOST PORT               1-byte ping-pong on one connection for S seconds
    rr-plain HOST PORT         N 1-byte rounds from a plain blocking socket
    connrate-plain HOST PORT   N x (connect, 1 byte each way, close), blocking, timed whole
    hold-tcp HOST PORT         open N connections, report, hold until stdin closes
    hold-udp HOST PORT         N sockets each with one answered datagram, then hold
    dns SERVER                 DNS queries at a fixed concurrency (when dnsperf is missing)
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import random
import resource
import selectors
import socket
import statistics
import struct
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

LISTEN_BACKLOG = 4096


def raise_nofile() -> int:
    """Lift the soft fd limit to the hard one: 10,000 held connections need 10,000 fds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def emit(obj: dict[str, Any]) -> None:
    """One JSON line on stdout: the harness reads exactly this."""
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def family_of(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no samples."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


# -- servers ----------------------------------------------------------------------------------


def listener(port: int, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A dual-stack socket on [::]:port, non-blocking."""
    sock = socket.socket(socket.AF_INET6, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", port))
    if kind == socket.SOCK_STREAM:
        sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


def serve_udp_echo(port: int) -> None:
    sock = listener(port, socket.SOCK_DGRAM)
    sock.setblocking(True)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    emit({"serving": "udp-echo", "port": port})
    while True:
        data, peer = sock.recvfrom(65535)
        with contextlib.suppress(OSError):
            sock.sendto(data, peer)


def serve_tcp(kind: str, port: int) -> None:
    """One selector loop: cheap enough that the server is rarely what a method is waiting on."""
    raise_nofile()
    lsock = listener(port)
    sel = selectors.DefaultSelector()
    sel.register(lsock, selectors.EVENT_READ, None)
    emit({"serving": kind, "port": port})

    def drop(conn: socket.socket) -> None:
        sel.unregister(conn)
        conn.close()

    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if key.data is None:  # the listener: accept everything queued
                for _ in range(LISTEN_BACKLOG):
                    try:
                        conn, _addr = lsock.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        break  # EMFILE & co: try again on the next readiness
                    conn.setblocking(False)
                    if kind == "echo":
                        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    if kind == "hold":
                        with contextlib.suppress(OSError):
                            conn.send(b"h")
                    sel.register(conn, selectors.EVENT_READ, kind)
                continue
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                drop(sock)
                continue
            if not data:
                drop(sock)
            elif kind == "connect":
                with contextlib.suppress(OSError):
                    sock.send(b"y")
                drop(sock)
            elif kind == "echo":
                try:
                    sock.sendall(data)  # tiny messages: never blocks for long
                except OSError:
                    drop(sock)
            # hold: discard whatever arrives


# -- clients ----------------------------------------------------------------------------------


def probe(host: str, port: int, timeout: float) -> int:
    """Retry a TCP connect until it works: the method's path is up end to end."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=2):
                emit({"ok": True})
                return 0
        except OSError as exc:
            last = str(exc)
            time.sleep(0.1)
    emit({"ok": False, "error": last})
    return 1


def connrate(
    host: str, port: int, count: int, parallel: int, timeout: float, max_time: float
) -> int:
    """N short connections: connect (timed) / send 1 byte / read 1 byte / close."""
    addr = (host, port)
    fam = family_of(host)
    deadline = time.monotonic() + max_time
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    per_thread = [count // parallel + (1 if i < count % parallel else 0) for i in range(parallel)]

    def worker(n: int) -> None:
        mine: list[float] = []
        errs: list[str] = []
        for _ in range(n):
            if time.monotonic() >= deadline:
                break
            sock = socket.socket(fam, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                t0 = time.perf_counter()
                sock.connect(addr)
                t1 = time.perf_counter()
                sock.sendall(b"x")
                if sock.recv(1) != b"y":
                    raise OSError("no answer byte")
                mine.append(t1 - t0)
            except OSError as exc:
                errs.append(type(exc).__name__ + ": " + str(exc))
            finally:
                sock.close()
        with lock:
            latencies.extend(mine)
            errors.extend(errs)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in per_thread]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()) + timeout + 1)
    elapsed = time.perf_counter() - start
    ms = [x * 1000 for x in latencies]
    emit(
        {
            "ok": len(latencies),
            "errors": len(errors),
            "first_errors": sorted(set(errors))[:3],
            "elapsed": elapsed,
            "rate": len(latencies) / elapsed if elapsed > 0 else 0.0,
            "p50_ms": percentile(ms, 50),
            "p99_ms": percentile(ms, 99),
        }
    )
    return 0 if latencies else 1


def rr(host: str, port: int, seconds: float) -> int:
    """One connection, 1 byte each way per transaction, as fast as the path allows."""
    sock = socket.create_connection((host, port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(5)
    samples: list[float] = []
    start = time.perf_counter()
    end = start + seconds
    error = ""
    try:
        while True:
            t0 = time.perf_counter()
            if t0 >= end:
                break
            sock.sendall(b"p")
            if not sock.recv(1):
                error = "connection closed"
                break
            samples.append(time.perf_counter() - t0)
    except OSError as exc:
        error = str(exc)
    elapsed = time.perf_counter() - start
    sock.close()
    return emit_rounds(samples, elapsed, error)


def emit_rounds(samples: list[float], elapsed: float, error: str) -> int:
    """Print the request/response figures of timed rounds (seconds each); 0 if any round
    completed."""
    us = [x * 1e6 for x in samples]
    emit(
        {
            "transactions": len(samples),
            "elapsed": elapsed,
            "rate": len(samples) / elapsed if elapsed > 0 else 0.0,
            "p50_us": percentile(us, 50),
            "p99_us": percentile(us, 99),
            "error": error,
        }
    )
    return 0 if samples else 1


def plain_socket(host: str, port: int, nodelay: bool, timeout: float | None) -> socket.socket:
    """A connected socket as a plain client makes one: ``create_connection`` and nothing else.
    ``timeout`` None keeps it blocking (recv sleeps in the kernel); a number makes Python
    wait in poll() before each recv, as ``rr`` does."""
    sock = socket.create_connection((host, port), timeout=timeout)
    if nodelay:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def rr_plain(host: str, port: int, count: int, nodelay: bool, timeout: float | None) -> int:
    """``count`` rounds of 1 byte each way on one blocking connection, each round timed: what
    a single-threaded blocking client sees (no deadline check or clock read beyond the
    round's own two)."""
    sock = plain_socket(host, port, nodelay, timeout)
    samples: list[float] = []
    error = ""
    clock = time.perf_counter
    start = clock()
    try:
        for _ in range(count):
            t0 = clock()
            sock.sendall(b"p")
            if not sock.recv(1):
                error = "connection closed"
                break
            samples.append(clock() - t0)
    except OSError as exc:
        error = str(exc)
    elapsed = clock() - start
    sock.close()
    return emit_rounds(samples, elapsed, error)


def connrate_plain(
    host: str, port: int, count: int, nodelay: bool, timeout: float | None, max_time: float
) -> int:
    """``count`` serial connections from one thread: create_connection, send 1 byte, read the
    echo, close (the client closes first). Each is timed whole, connect to close."""
    deadline = time.monotonic() + max_time
    samples: list[float] = []
    errors: list[str] = []
    clock = time.perf_counter
    start = clock()
    for _ in range(count):
        if time.monotonic() >= deadline:
            break
        t0 = clock()
        try:
            sock = plain_socket(host, port, nodelay, timeout)
        except OSError as exc:
            errors.append(type(exc).__name__ + ": " + str(exc))
            continue
        try:
            sock.sendall(b"x")
            if sock.recv(1) != b"x":
                raise OSError("no echo byte")
            sock.close()
            samples.append(clock() - t0)
        except OSError as exc:
            errors.append(type(exc).__name__ + ": " + str(exc))
            sock.close()
    elapsed = clock() - start
    us = [x * 1e6 for x in samples]
    emit(
        {
            "ok": len(samples),
            "errors": len(errors),
            "first_errors": sorted(set(errors))[:3],
            "elapsed": elapsed,
            "rate": len(samples) / elapsed if elapsed > 0 else 0.0,
            "p50_us": percentile(us, 50),
            "p99_us": percentile(us, 99),
        }
    )
    return 0 if samples else 1


def wait_release(max_hold: float) -> None:
    """Hold until the harness writes a line (or closes stdin), at most ``max_hold`` s."""
    sel = selectors.DefaultSelector()
    sel.register(sys.stdin, selectors.EVENT_READ)
    sel.select(max_hold)


def hold_tcp(
    host: str, port: int, count: int, inflight: int, max_time: float, max_hold: float
) -> int:
    """Open ``count`` connections (at most ``inflight`` handshakes at once); a connection counts
    as held once the server's greeting byte arrived, i.e. the whole path is established."""
    raise_nofile()
    fam = family_of(host)
    sel = selectors.DefaultSelector()
    held: list[socket.socket] = []
    failed = 0
    started = 0
    pending = 0
    errs: dict[str, int] = {}
    deadline = time.monotonic() + max_time
    t_start = time.perf_counter()
    while (started < count or pending) and time.monotonic() < deadline:
        while started < count and pending < inflight:
            sock = socket.socket(fam, socket.SOCK_STREAM)
            sock.setblocking(False)
            rc = sock.connect_ex((host, port))
            started += 1
            if rc not in (0, errno.EINPROGRESS):
                failed += 1
                errs[os.strerror(rc)] = errs.get(os.strerror(rc), 0) + 1
                sock.close()
                continue
            sel.register(sock, selectors.EVENT_READ)
            pending += 1
        for key, _ in sel.select(timeout=0.5):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            sel.unregister(sock)
            pending -= 1
            try:
                ok = sock.recv(1) == b"h"
            except OSError as exc:
                ok = False
                errs[str(exc)] = errs.get(str(exc), 0) + 1
            if ok:
                held.append(sock)
            else:
                failed += 1
                sock.close()
    emit(
        {
            "held": len(held),
            "failed": failed,
            "unfinished": pending + (count - started),
            "errors": errs,
            "elapsed": time.perf_counter() - t_start,
        }
    )
    wait_release(max_hold)
    for sock in held:
        sock.close()
    return 0


def hold_udp(
    host: str, port: int, count: int, inflight: int, max_time: float, max_hold: float
) -> int:
    """``count`` sockets, each with one datagram answered by the echo server (so the method
    holds one session per socket). At most ``inflight`` sessions are being opened at once and
    an unanswered datagram is resent after 1 s (3 tries): a slow method is measured at the rate
    it can open sessions instead of being flooded with retries."""
    raise_nofile()
    fam = family_of(host)
    sel = selectors.DefaultSelector()
    socks: list[socket.socket] = []
    waiting: dict[socket.socket, tuple[float, int]] = {}  # sent at, tries
    answered = failed = started = 0
    deadline = time.monotonic() + max_time
    t_start = time.perf_counter()
    while (started < count or waiting) and time.monotonic() < deadline:
        while started < count and len(waiting) < inflight:
            sock = socket.socket(fam, socket.SOCK_DGRAM)
            sock.setblocking(False)
            sock.connect((host, port))
            socks.append(sock)
            started += 1
            with contextlib.suppress(OSError):
                sock.send(b"u")
            sel.register(sock, selectors.EVENT_READ)
            waiting[sock] = (time.monotonic(), 1)
        for key, _ in sel.select(timeout=0.1):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                sock.recv(2048)
            except OSError:
                continue
            if sock in waiting:
                del waiting[sock]
                sel.unregister(sock)
                answered += 1
        now = time.monotonic()
        for sock, (sent, tries) in list(waiting.items()):
            if now - sent < 1.0:
                continue
            if tries >= 3:
                del waiting[sock]
                sel.unregister(sock)
                failed += 1
                continue
            with contextlib.suppress(OSError):
                sock.send(b"u")
            waiting[sock] = (now, tries + 1)
    emit(
        {
            "held": answered,
            "failed": failed,
            "unfinished": len(waiting) + (count - started),
            "elapsed": time.perf_counter() - t_start,
        }
    )
    wait_release(max_hold)
    for sock in socks:
        sock.close()
    return 0


def dns_query(qid: int, name: str, qtype: int = 1) -> bytes:
    header = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split(".")) + b"\0"
    return header + qname + struct.pack("!HH", qtype, 1)


def dns_load(
    server: str, names: list[str], seconds: float, concurrency: int, timeout: float
) -> int:
    """Fallback for dnsperf: ``concurrency`` queries in flight on one socket, each name once per
    round (uncached: many names; cached: one), for ``seconds``."""
    sock = socket.socket(family_of(server), socket.SOCK_DGRAM)
    sock.connect((server, 53))
    sock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    outstanding: dict[int, float] = {}
    latencies: list[float] = []
    lost = 0
    sent = 0
    free_ids = list(range(65536))
    random.shuffle(free_ids)
    start = time.perf_counter()
    end = start + seconds
    while True:
        now = time.perf_counter()
        if now >= end and not outstanding:
            break
        if now >= end + timeout:
            lost += len(outstanding)
            break
        while now < end and len(outstanding) < concurrency and free_ids:
            qid = free_ids.pop()
            name = names[sent % len(names)]
            with contextlib.suppress(BlockingIOError):
                sock.send(dns_query(qid, name))
            outstanding[qid] = time.perf_counter()
            sent += 1
        for _key, _ in sel.select(timeout=0.05):
            for _ in range(256):
                try:
                    data = sock.recv(4096)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    break
                if len(data) < 2:
                    continue
                (qid,) = struct.unpack("!H", data[:2])
                t0 = outstanding.pop(qid, None)
                if t0 is not None:
                    latencies.append(time.perf_counter() - t0)
                    free_ids.insert(0, qid)
        now = time.perf_counter()
        for qid, t0 in list(outstanding.items()):
            if now - t0 > timeout:
                del outstanding[qid]
                lost += 1
                free_ids.insert(0, qid)
    elapsed = min(time.perf_counter(), end) - start
    ms = [x * 1000 for x in latencies]
    emit(
        {
            "sent": sent,
            "answered": len(latencies),
            "lost": lost,
            "qps": len(latencies) / elapsed if elapsed > 0 else 0.0,
            "p50_ms": percentile(ms, 50),
            "p99_ms": percentile(ms, 99),
            "mean_ms": statistics.fmean(ms) if ms else None,
        }
    )
    return 0 if latencies else 1


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("kind", choices=["connect", "echo", "udp-echo", "hold"])
    s.add_argument("port", type=int)
    for name in ("rr-plain", "connrate-plain"):
        c = sub.add_parser(name)
        c.add_argument("host")
        c.add_argument("port", type=int)
        c.add_argument("--count", type=int, default=5000 if name == "rr-plain" else 2000)
        c.add_argument("--nodelay", action="store_true", help="set TCP_NODELAY (off: plain)")
        c.add_argument(
            "--timeout", type=float, default=None, help="socket timeout (none: blocking)"
        )
        c.add_argument("--max-time", type=float, default=60.0)
    for name in ("probe", "connrate", "rr", "hold-tcp", "hold-udp"):
        c = sub.add_parser(name)
        c.add_argument("host")
        c.add_argument("port", type=int)
        c.add_argument("--count", type=int, default=2000)
        c.add_argument("--parallel", type=int, default=1)
        c.add_argument("--inflight", type=int, default=256)
        c.add_argument("--timeout", type=float, default=5.0)
        c.add_argument("--seconds", type=float, default=5.0)
        c.add_argument("--max-time", type=float, default=60.0)
        c.add_argument("--max-hold", type=float, default=120.0)
    d = sub.add_parser("dns")
    d.add_argument("server")
    d.add_argument("--names-file", required=True)
    d.add_argument("--seconds", type=float, default=5.0)
    d.add_argument("--concurrency", type=int, default=32)
    d.add_argument("--timeout", type=float, default=2.0)
    a = p.parse_args(argv)
    if a.cmd == "serve":
        if a.kind == "udp-echo":
            serve_udp_echo(a.port)
        else:
            serve_tcp(a.kind, a.port)
        return 0
    if a.cmd == "probe":
        return probe(a.host, a.port, a.max_time)
    if a.cmd == "connrate":
        return connrate(a.host, a.port, a.count, a.parallel, a.timeout, a.max_time)
    if a.cmd == "rr":
        return rr(a.host, a.port, a.seconds)
    if a.cmd == "rr-plain":
        return rr_plain(a.host, a.port, a.count, a.nodelay, a.timeout)
    if a.cmd == "connrate-plain":
        return connrate_plain(a.host, a.port, a.count, a.nodelay, a.timeout, a.max_time)
    if a.cmd == "hold-tcp":
        return hold_tcp(a.host, a.port, a.count, a.inflight, a.max_time, a.max_hold)
    if a.cmd == "hold-udp":
        return hold_udp(a.host, a.port, a.count, a.inflight, a.max_time, a.max_hold)
    if a.cmd == "dns":
        with open(a.names_file) as f:
            names = [line.split()[0] for line in f if line.strip()]
        return dns_load(a.server, names, a.seconds, a.concurrency, a.timeout)
    return 2


if __name__ == "__main__":
    sys.exit(main())
