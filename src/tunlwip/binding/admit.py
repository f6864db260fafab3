"""Admission in C (``_csrc/admit.c``): plain held SYNs dialed without calling Python.

``configure`` gives C the limits and the ports Python must see; ``python_count`` mirrors one
change of Python's own per-client counts (keys as ``shares.client_key`` makes them);
``client_counts`` reads a client's four counts; ``fast_count`` is how many SYNs C dialed alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from .ffi import ffi, lib

#: The counts kept per client, by whom and in what state.
C_DIALING: int = lib.TL_ADMIT_C_DIALING
C_OPEN: int = lib.TL_ADMIT_C_OPEN
PY_DIALING: int = lib.TL_ADMIT_PY_DIALING
PY_OPEN: int = lib.TL_ADMIT_PY_OPEN

_V6_TAG = 1 << 64

#: SYNs admit.c dialed without Python since the counters were reset.
fast_count: Callable[[], int] = lib.tl_admit_fast_count
reset_counters: Callable[[], None] = lib.tl_admit_reset_counters
#: Forget Python's counts (a new stack starts with empty tables).
forget_python: Callable[[], None] = lib.tl_admit_forget_python


def _split(key: int) -> tuple[int, int]:
    """(family, C key) of a ``shares.client_key``."""
    return (4, key) if key < _V6_TAG else (6, key ^ _V6_TAG)


def configure(*, on: bool, max_open: int = 0, max_pending: int = 0, open_share: int = 0,
              pending_share: int = 0, python_ports: Iterable[int] = ()) -> None:  # fmt: skip
    """Turn C's admission on (with these limits; SYNs to ``python_ports`` go to Python) or
    off (every SYN goes to Python)."""
    ports = sorted(set(python_ports))
    array = ffi.new("uint16_t[]", ports or [0])
    clamp = 0xFFFFFFFF
    lib.tl_admit_configure(1 if on else 0, min(max_open, clamp), min(max_pending, clamp),
                           min(open_share, clamp), min(pending_share, clamp), array,
                           len(ports))  # fmt: skip


def python_count(kind: int, key: int, delta: int) -> None:
    """Python's count of ``kind`` (``PY_DIALING``, ``PY_OPEN``) for the client ``key``
    changed by ``delta``."""
    family, value = _split(key)
    lib.tl_admit_python(family, value, kind, delta)


def client_counts(key: int) -> tuple[int, int, int, int]:
    """The client's (C dialing, C open, Python dialing, Python open)."""
    family, value = _split(key)
    out = ffi.new("uint32_t[4]")
    lib.tl_admit_client_counts(family, value, out)
    return out[0], out[1], out[2], out[3]
