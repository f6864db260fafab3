#!/usr/bin/env python3
"""atheris harness for the HTTP CONNECT client: the response head parser, and the reads that
find a head's end without taking a byte past it.

Input: a mode byte, then the body (the proxy's bytes).
  mode & 1 == 0: ``parse_response_head`` on the body as one head
  mode & 1 == 1: the client's whole read of the response (interim heads, then the final one)
                 from a fake socket whose arrivals are ``(mode >> 1) + 1`` bytes each
                 (fake_socket.py), with the head bound lowered to 64 + the body's first byte
                 now and then (mode & 0x80) so the bound is reached often
A finding is any exception but the parser's own (``ProxyError``, and the OSErrors statuses
map to), a success for a head that does not begin ``HTTP/1.x 2xx`` or is not exactly one
head, or a read that consumed a byte past the final head.

    .venv/bin/python fuzz/http_connect_fuzzer.py [libFuzzer options] CORPUS_DIR
"""

from __future__ import annotations

import re
import sys

import atheris

with atheris.instrument_imports(include=["tunlwip", "h11"]):
    from tunlwip.egress import http_connect
    from tunlwip.egress.sockio import recv_through
    from tunlwip.errors import ProxyError

from fake_socket import FakeSocket, run

STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})")
HEAD_END = http_connect.HEAD_END


def _check_head(head: bytes, status: int) -> None:
    match = STATUS_LINE.match(head)
    if match is None or int(match.group(1)) != status or not 100 <= status < 300:
        raise AssertionError(f"accepted {head[:80]!r} as status {status}")
    if head.find(HEAD_END) != len(head) - len(HEAD_END):
        raise AssertionError(f"accepted more or less than one head: {head[:80]!r}")


def _parse(body: bytes) -> None:
    try:
        status = http_connect.parse_response_head(body)
    except (ProxyError, ConnectionRefusedError, TimeoutError, OSError):
        return
    _check_head(body, status)


async def _read_response(sock: FakeSocket, limit: int) -> int:
    """What proxy_dial._http_connect does after sending the request."""
    for _ in range(http_connect.MAX_HEADS):
        head = await recv_through(sock, HEAD_END, limit)  # type: ignore[arg-type]
        status = http_connect.parse_response_head(head)
        _check_head(head, status)
        if status >= 200:
            return status
    raise ProxyError("bad response", detail="too many interim responses")


def _read(mode: int, body: bytes) -> None:
    limit = 64 + (body[0] if body else 0) if mode & 0x80 else http_connect.MAX_HEAD
    sock = FakeSocket(body, bytes([(mode >> 1 & 0x3F) + 1]))
    try:
        run(_read_response(sock, limit))
    except (ProxyError, ConnectionRefusedError, TimeoutError, OSError):
        if sock.consumed > len(body):
            raise AssertionError("consumed more than was sent") from None
        return
    # Success: every head read ends exactly where the consumed bytes end.
    if not body[: sock.consumed].endswith(HEAD_END):
        raise AssertionError(f"consumed {sock.consumed} bytes, not through a head's end")
    heads = body[: sock.consumed].count(HEAD_END)
    if heads > http_connect.MAX_HEADS:
        raise AssertionError(f"consumed {heads} heads")


def test_one_input(data: bytes) -> None:
    if not data:
        return
    mode, body = data[0], data[1:]
    if mode & 1:
        _read(mode, body)
    else:
        _parse(body)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
