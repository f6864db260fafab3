"""Build tunlwip._lwip: lwIP 2.1.3 (fetched by vendor/lwip/fetch.sh) plus our C glue, cffi API mode.

Only our own flat functions and the extern "Python" callbacks are declared to cffi; lwIP's
structures stay opaque. The lwIP tree must have been fetched first (`make install` does it).
"""

from __future__ import annotations

import os
import pathlib
import sys

from cffi import FFI

ROOT = pathlib.Path(__file__).resolve().parent
LWIP = ROOT / "vendor" / "lwip" / "upstream" / "src"
PORT = ROOT / "vendor" / "lwip" / "port"
CSRC = ROOT / "src" / "tunlwip" / "_csrc"

LWIP_SOURCES = [
    "core/init.c", "core/def.c", "core/inet_chksum.c", "core/ip.c", "core/mem.c",
    "core/memp.c", "core/netif.c", "core/pbuf.c", "core/tcp.c", "core/tcp_in.c",
    "core/tcp_out.c", "core/udp.c", "core/timeouts.c", "core/stats.c",
    "core/ipv4/ip4.c", "core/ipv4/ip4_addr.c", "core/ipv4/ip4_frag.c", "core/ipv4/icmp.c",
    "core/ipv6/ip6.c", "core/ipv6/ip6_addr.c", "core/ipv6/ip6_frag.c", "core/ipv6/icmp6.c",
    "core/ipv6/nd6.c",
]  # fmt: skip

CALLBACKS = """
extern "Python+C" uintptr_t tl_py_accept(void *pcb);
extern "Python+C" int tl_py_recv(uintptr_t conn, const uint8_t *data, size_t len,
                                 int may_defer);
extern "Python+C" void tl_py_sent(uintptr_t conn, uint32_t len);
extern "Python+C" void tl_py_error(uintptr_t conn, int err);
extern "Python+C" void tl_py_output(const uint8_t *data, size_t len);
extern "Python+C" int tl_py_syn(const uint8_t *packet, size_t len,
                                const tl_endpoint *src, const tl_endpoint *dst);
extern "Python+C" int tl_py_udp(const tl_endpoint *src, const tl_endpoint *dst,
                                const uint8_t *data, size_t len);
extern "Python+C" void tl_py_icmp_echo(const tl_endpoint *src, const tl_endpoint *dst,
                                       const uint8_t *msg, size_t len);
extern "Python+C" void tl_py_relay_done(uintptr_t conn, int reason, uint64_t bytes_up,
                                        uint64_t bytes_down);
extern "Python+C" void tl_py_relay_first_data(uintptr_t conn, const uint8_t *data, size_t len);
extern "Python+C" void tl_py_fd_ready(uintptr_t token);
"""


def _cdef() -> str:
    header = (CSRC / "tunlwip_glue.h").read_text()
    lines = [ln for ln in header.splitlines() if not ln.lstrip().startswith("#")]
    return "\n".join(lines) + CALLBACKS


def _sources() -> list[str]:
    if not (LWIP / "core" / "tcp.c").exists():
        sys.exit(
            "build_ffi.py: lwIP source not found in vendor/lwip/upstream; "
            "run `bash vendor/lwip/fetch.sh` (or `make install`) first"
        )
    rel = lambda p: os.path.relpath(p, ROOT)  # noqa: E731 - setuptools wants relative paths
    ours = [CSRC / "glue.c", CSRC / "relay.c", CSRC / "vnet.c"]
    return [rel(LWIP / s) for s in LWIP_SOURCES] + [rel(p) for p in ours]


ffibuilder = FFI()
ffibuilder.cdef(_cdef())
ffibuilder.set_source(
    "tunlwip._lwip",
    '#include <stdint.h>\n#include <stddef.h>\n#include "tunlwip_glue.h"\n',
    sources=_sources(),
    include_dirs=[
        os.path.relpath(p, ROOT) for p in (PORT, LWIP / "include", CSRC)
    ],
    extra_compile_args=["-O2", "-std=gnu11", "-Wno-unused-parameter", "-Wno-unused-variable",
                        "-Wno-address"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
