"""HTTP CONNECT (RFC 9110 section 9.3.6) through an HTTP proxy, with optional Basic auth.

Theory of operation
-------------------
``connect_request`` writes ``CONNECT host:port HTTP/1.1`` with ``Host`` and, with credentials,
``Proxy-Authorization: Basic``. The driver (``proxy_dial``) reads the response head with
``sockio.recv_through``: it peeks for the head's end (``\\r\\n\\r\\n``) and consumes exactly
through it, at most ``MAX_HEAD`` bytes, so the first bytes the destination sends stay in the
socket for the C relay (there are no leftovers to hand over). ``parse_response_head`` parses
that head with h11 (the HTTP/1.1 parser the DoH client uses) and maps its status:

===========================  ==================================================================
status                       raised (what the client then sees)
===========================  ==================================================================
2xx                          nothing: the tunnel is open
1xx                          nothing yet: an interim response, the next head follows
407                          ProxyError "proxy authentication required" (ICMP unreachable)
403                          ProxyError "forbidden by proxy" (ICMP unreachable)
X-Squid-Error with errno     that errno: 111 -> ConnectionRefusedError (RST), 110 ->
                             TimeoutError, 113 / 101 -> EHOSTUNREACH / ENETUNREACH (ICMP)
X-Squid-Error ERR_DNS_FAIL   EHOSTUNREACH (ICMP host unreachable)
504                          TimeoutError (the configured unreachable answer)
500, 502, 503                EHOSTUNREACH (ICMP host unreachable)
anything else                ProxyError "unexpected status"
===========================  ==================================================================

Why 500/502/503 are "host unreachable", not "refused": tinyproxy answers ``500 Unable to
connect`` alike for a refused port, an unreachable host and a name it cannot resolve, and a
bare 502/503 does not say which either; claiming "refused" would tell the client the port is
closed when it may not be. squid's ``X-Squid-Error: ERR_CONNECT_FAIL 111`` does say it, so a
refused port through squid is a refused port for the client.
"""

from __future__ import annotations

import base64
import errno
import ipaddress
import re

import h11

from ..errors import ProxyError
from ..hostname import is_hostname
from .socks5 import Address

__all__ = ["HEAD_END", "MAX_HEAD", "MAX_HEADS", "authority", "connect_request",
           "parse_response_head"]  # fmt: skip

#: The most bytes one response head may have (status line and headers).
MAX_HEAD = 8192
#: Interim (1xx) heads accepted before the final one.
MAX_HEADS = 4
HEAD_END = b"\r\n\r\n"
# squid's ``X-Squid-Error: ERR_CONNECT_FAIL 111``: the failure, and its errno in ASCII digits
# (not str.isdigit, which also takes "²": found by the fuzzer).
_SQUID_ERROR = re.compile(rb"(ERR_[A-Z_]+)(?: ([0-9]{1,4}))?")


def authority(host: Address, port: int) -> str:
    """``host:port`` as CONNECT names it (``[v6]:port`` for IPv6)."""
    if isinstance(host, ipaddress.IPv6Address):
        return f"[{host}]:{port}"
    if isinstance(host, str) and not is_hostname(host):
        raise ValueError(f"{host!r} is not a host name")
    return f"{host}:{port}"


def connect_request(host: Address, port: int, username: str | None = None,
                    password: str | None = None) -> bytes:  # fmt: skip
    """The request head asking the proxy for a tunnel to ``host``:``port``."""
    target = authority(host, port)
    lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
    if username is not None:
        token = base64.b64encode(f"{username}:{password or ''}".encode()).decode("ascii")
        lines.append(f"Proxy-Authorization: Basic {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def parse_response_head(head: bytes) -> int:
    """The status of one response head (exactly one, ending in ``HEAD_END``): a 2xx or 1xx
    status is returned, any other raises the mapped error (see the module's table)."""
    if len(head) > MAX_HEAD:
        raise ProxyError("response head too long")
    if not head.endswith(HEAD_END) or head.find(HEAD_END) != len(head) - len(HEAD_END):
        raise ProxyError("bad response", detail="not one response head")
    http = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
    http.send(h11.Request(method="CONNECT", target="tunnel:1", headers=[("Host", "tunnel:1")]))
    http.receive_data(head)
    try:
        event = http.next_event()
    except h11.RemoteProtocolError as exc:
        raise ProxyError("bad response", detail=str(exc)[:80]) from None
    if isinstance(event, (h11.InformationalResponse, h11.Response)) and \
            event.http_version not in (b"1.0", b"1.1"):  # fmt: skip
        raise ProxyError("bad response", detail="HTTP version")  # h11 takes any digit.digit
    if isinstance(event, h11.InformationalResponse):
        return event.status_code
    if not isinstance(event, h11.Response):
        raise ProxyError("bad response", detail="no status line")
    status = event.status_code
    if 200 <= status < 300:
        return status
    raise status_error(status, dict(event.headers).get(b"x-squid-error", b""))


def status_error(status: int, squid_error: bytes = b"") -> OSError:
    """What a failed CONNECT with ``status`` means for the client (see the module's table)."""
    if status == 407:
        return ProxyError("proxy authentication required", errno.EACCES)
    if status == 403:
        return ProxyError("forbidden by proxy", errno.EACCES)
    if squid_error:
        mapped = _squid_error(squid_error)
        if mapped is not None:
            return mapped
    if status == 504:
        return TimeoutError(errno.ETIMEDOUT, "gateway timeout (via HTTP proxy)")
    if status in (500, 502, 503):
        return OSError(errno.EHOSTUNREACH, f"host unreachable (via HTTP proxy: {status})")
    return ProxyError("unexpected status", detail=str(status))


def _squid_error(value: bytes) -> OSError | None:
    """squid names the failure and its errno: ``ERR_CONNECT_FAIL 111``, ``ERR_DNS_FAIL 0``."""
    match = _SQUID_ERROR.fullmatch(value.strip())
    if match is None:
        return None
    if match[1] == b"ERR_DNS_FAIL":
        return OSError(errno.EHOSTUNREACH, "name not resolved (via HTTP proxy)")
    if match[1] != b"ERR_CONNECT_FAIL" or match[2] is None:
        return None
    err = int(match[2])
    if err == errno.ECONNREFUSED:
        return ConnectionRefusedError(err, "connection refused (via HTTP proxy)")
    if err == errno.ETIMEDOUT:
        return TimeoutError(err, "connect timed out (via HTTP proxy)")
    if err in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return OSError(err, "unreachable (via HTTP proxy)")
    return None
