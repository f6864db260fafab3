"""The Python side of SOCKS5 dials in C (``egress/c_socks5.py``, ``binding/dial.py``).

Why: a flow's record and its route's ``proxy_failures`` must not depend on which path dialed
it, so every reason C reports must be one the Python client gives for the same failure, and
reply codes naming the destination's failure must reach the client as a direct dial's would.
The C state machine itself is tested against a hostile server in
``tests/integration/test_c_socks5_netns.py`` and fuzzed (``fuzz/packet_fuzzer.c``).
"""

from __future__ import annotations

import errno
import inspect

import pytest

from tunlwip.binding import dial as cdial
from tunlwip.binding.ffi import lib
from tunlwip.egress import proxy_dial, sockio, socks5
from tunlwip.egress.c_socks5 import c_route_for, failure, start_failure
from tunlwip.egress.via import Socks5Proxy, parse_via
from tunlwip.errors import ProtectError, ProxyError


def socks(url: str) -> Socks5Proxy:
    via = parse_via(url)
    assert isinstance(via, Socks5Proxy)
    return via


def test_every_c_reason_is_one_the_python_client_gives() -> None:
    python_client = "".join(inspect.getsource(m) for m in (socks5, sockio, proxy_dial))
    assert set(cdial.PROXY_REASONS) == set(range(1, lib.TL_SOCKS5_REASONS))
    for code, text in cdial.PROXY_REASONS.items():
        if text is None:
            continue
        assert f'"{text}"' in python_client, (code, text)
        error = failure(code, errno.EPROTO)
        assert isinstance(error, ProxyError) and error.reason == f"proxy: {text}", error


@pytest.mark.parametrize(("reason", "err", "kind"), [
    (lib.TL_SOCKS5_DEST_REFUSED, errno.ECONNREFUSED, ConnectionRefusedError),
    (lib.TL_SOCKS5_TTL_EXPIRED, errno.ETIMEDOUT, TimeoutError),
    (lib.TL_SOCKS5_HOST_UNREACHABLE, errno.EHOSTUNREACH, OSError),
    (lib.TL_SOCKS5_NET_UNREACHABLE, errno.ENETUNREACH, OSError),
])  # fmt: skip
def test_reply_codes_of_the_destination_are_a_direct_dials_errors(
    reason: int, err: int, kind: type[OSError]
) -> None:
    error = failure(reason, err)
    assert type(error) is kind and error.errno == err and not isinstance(error, ProxyError)


def test_a_start_that_fails_reads_as_the_python_paths_connect_to_the_proxy() -> None:
    assert isinstance(start_failure(cdial.PROTECT_FAILED + errno.EPERM), ProtectError)
    for shortage in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
        error = start_failure(shortage)
        assert error.errno == shortage and not isinstance(error, ProxyError)
    refused = start_failure(errno.ECONNREFUSED)
    assert isinstance(refused, ProxyError) and refused.reason == "proxy: refused"
    unreachable = start_failure(errno.ENETUNREACH)
    assert isinstance(unreachable, ProxyError) and unreachable.reason == "proxy: unreachable"


def test_c_routes_only_for_proxies_given_by_address() -> None:
    plain = c_route_for(socks("socks5://198.18.1.2:1080"))
    assert plain is not None and plain.auth is None and not plain.remote_dns
    assert (plain.proxy.family, plain.proxy.port) == (4, 1080)
    v6 = c_route_for(socks("socks5://u:p@[fd00::2]:1080?remote_dns=true"))
    assert v6 is not None and v6.proxy.family == 6 and v6.remote_dns
    assert v6.auth == socks5.auth_request("u", "p")
    assert c_route_for(socks("socks5://proxy.example:1080")) is None


def test_the_name_sent_is_checked_as_on_the_python_path() -> None:
    route = c_route_for(socks("socks5://198.18.1.2:1080?remote_dns=true"))
    assert route is not None
    assert route.name_for("www.test.") == b"www.test"
    assert route.name_for(None) is None
    assert route.name_for("bad name\x00") is None
    assert route.name_for("a" * 300) is None
    by_address = c_route_for(socks("socks5://198.18.1.2:1080"))
    assert by_address is not None and by_address.name_for("www.test") is None
