"""Build tunlwip._lwip: lwIP 2.1.3 plus our C glue, cffi API mode.

Only our own flat functions and the extern "Python" callbacks are declared to cffi; lwIP's
structures stay opaque.

The lwIP tree is looked for in this order: ``TUNLWIP_LWIP_DIR`` (an unpacked tree, used as
is), then ``vendor/lwip/upstream`` (where ``vendor/lwip/fetch.sh`` unpacks the verified tarball,
and where an sdist carries it). Importing this file never fails for want of lwIP, so reading
the package metadata or making an sdist's file list works without it; only compiling does
(``require_lwip``), with a message naming the three ways to provide it.

Our C files are ``OUR_SOURCES`` (in ``src/tunlwip/_csrc``); the packet fuzzer's build (Makefile)
takes the same list from here. The module carries the build stamp of those sources
(``tl_build_stamp()``, computed by ``src/tunlwip/_stamp.py``), which the package checks at import.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shlex
import subprocess
import sysconfig
import types

from cffi import FFI

ROOT = pathlib.Path(__file__).resolve().parent
PORT = ROOT / "vendor" / "lwip" / "port"
CSRC = ROOT / "src" / "tunlwip" / "_csrc"
DEFAULT_TREE = ROOT / "vendor" / "lwip" / "upstream"
# setuptools compiles only sources inside the project: an lwIP tree elsewhere (TUNLWIP_LWIP_DIR)
# is compiled through one-line wrappers here that #include its files.
WRAPPERS = ROOT / "build" / "lwip-wrappers"

# The pin (also in vendor/lwip/fetch.sh): the sha256 of Debian's orig tarball of lwIP 2.1.3.
LWIP_TARBALL = "lwip_2.1.3+dfsg1.orig.tar.xz"
LWIP_SHA256 = "0a8276d09fc4e97bbba2f953d74af2388fc2195ea156be9d7589e297a68fde24"
VERIFIED_STAMP = ".tunlwip-verified"  # fetch.sh writes the tarball's sha256 into it

MISSING_LWIP = f"""\
build_ffi.py: error: the lwIP 2.1.3 source is needed to compile tunlwip._lwip and was not found
(looked in TUNLWIP_LWIP_DIR and vendor/lwip/upstream). Provide it one of three ways:
  1. TUNLWIP_LWIP_DIR=/path/to/lwip          an unpacked lwIP 2.1.3 tree (holding src/core/tcp.c)
  2. TUNLWIP_LWIP_TARBALL=/path/to/{LWIP_TARBALL} bash vendor/lwip/fetch.sh
                                            a local tarball, sha256 {LWIP_SHA256}
  3. bash vendor/lwip/fetch.sh (or `make install`): Debian's package client (apt-get source lwip)
Installing from the sdist needs none of these: it carries the verified lwIP tree."""


def find_lwip() -> pathlib.Path | None:
    """The lwIP tree to build from (the folder holding ``src/``), or None."""
    env = os.environ.get("TUNLWIP_LWIP_DIR")
    candidates = [pathlib.Path(env).resolve()] if env else [DEFAULT_TREE]
    for tree in candidates:
        if (tree / "src" / "core" / "tcp.c").is_file():
            return tree
    return None


def require_lwip() -> pathlib.Path:
    """The lwIP tree, ready to compile; exits with the message naming the three ways without one."""
    tree = find_lwip()
    if tree is None:
        raise SystemExit(MISSING_LWIP)
    _write_wrappers()
    return tree


def is_verified(tree: pathlib.Path) -> bool:
    stamp = tree / VERIFIED_STAMP
    return stamp.is_file() and stamp.read_text().strip() == LWIP_SHA256


LWIP = (find_lwip() or DEFAULT_TREE) / "src"

# Our C layer, one job a file (tl_internal.h lists them); the fuzz build compiles the same list.
OUR_SOURCES = [
    "clock.c", "counters.c", "settings.c", "netif.c", "input.c", "frag_train.c",
    "transport_input.c", "half_open.c", "tcp_conn.c", "udp_icmp.c", "poll.c", "relay.c",
    "vnet.c", "vnet_input.c", "udp_relay.c", "socks5_udp.c", "dial.c", "dial_socket.c", "admit.c",
    "socks5_dial.c",
]  # fmt: skip

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


def _load_stamp_module() -> types.ModuleType:
    """src/tunlwip/_stamp.py, loaded by path: building must not import the package."""
    spec = importlib.util.spec_from_file_location("_tunlwip_stamp", CSRC.parent / "_stamp.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_stamp() -> str:
    """The stamp compiled into the module: the sha256 of src/tunlwip/_csrc's sources."""
    stamp: str = _load_stamp_module().source_stamp(CSRC)
    return stamp


def _preamble() -> str:
    """The module's own C: our API's header, and the build stamp (checked at import)."""
    return (
        '#include <stdint.h>\n#include <stddef.h>\n#include "tunlwip_glue.h"\n'
        f'const char *tl_build_stamp(void) {{ return "{build_stamp()}"; }}\n'
    )


def _cdef() -> str:
    header = (CSRC / "tunlwip_glue.h").read_text()
    lines = [ln for ln in header.splitlines() if not ln.lstrip().startswith("#")]
    return "\n".join(lines) + CALLBACKS


def _path(p: pathlib.Path) -> str:
    """Relative to the project when inside it, else absolute (objects then stay in build/)."""
    return os.path.relpath(p, ROOT) if p.is_relative_to(ROOT) else str(p)


def _outside() -> bool:
    return not LWIP.is_relative_to(ROOT)


def _write_wrappers() -> None:
    if not _outside():
        return
    for s in LWIP_SOURCES:
        wrapper = WRAPPERS / s
        text = f'#include "{LWIP / s}"  /* TUNLWIP_LWIP_DIR */\n'
        if not wrapper.is_file() or wrapper.read_text() != text:
            wrapper.parent.mkdir(parents=True, exist_ok=True)
            wrapper.write_text(text)


def _sources() -> list[str]:
    ours = [CSRC / s for s in OUR_SOURCES]
    lwip = WRAPPERS if _outside() else LWIP
    return [_path(lwip / s) for s in LWIP_SOURCES] + [_path(p) for p in ours]


def _include_dirs(lwip_src: pathlib.Path = LWIP) -> list[pathlib.Path]:
    return [PORT, lwip_src / "include", CSRC]


def lwip_dist_files(tree: pathlib.Path) -> list[str]:
    """The files of an lwIP tree an sdist carries, relative to the tree: the sources compiled, the
    headers they include (asked of the C preprocessor; all of src/include without one) and the
    licence, README and changelog."""
    src = tree / "src"
    files = {"COPYING", "README", "CHANGELOG", VERIFIED_STAMP}
    files.update(f"src/{s}" for s in LWIP_SOURCES)
    cc = shlex.split(sysconfig.get_config_var("CC") or "cc")
    includes = [f"-I{d}" for d in _include_dirs(src)]
    compiled = [src / s for s in LWIP_SOURCES] + sorted(CSRC.glob("*.c"))
    try:
        out = subprocess.run(
            [*cc, "-MM", *includes, *map(str, compiled)],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        out = ""
    deps = [pathlib.Path(w) for w in out.replace("\\\n", " ").split() if w.endswith(".h")]
    headers = {str(d.resolve().relative_to(tree)) for d in deps if d.resolve().is_relative_to(tree)}
    if not headers:
        headers = {str(p.relative_to(tree)) for p in (src / "include").rglob("*.h")}
    return sorted(files | headers)


ffibuilder = FFI()
ffibuilder.cdef(_cdef())
ffibuilder.set_source(
    "tunlwip._lwip",
    _preamble(),
    sources=_sources(),
    include_dirs=[_path(p) for p in _include_dirs()],
    extra_compile_args=["-O2", "-std=gnu11", "-Wno-unused-parameter", "-Wno-unused-variable",
                        "-Wno-address"],
)

if __name__ == "__main__":
    require_lwip()
    ffibuilder.compile(verbose=True)
