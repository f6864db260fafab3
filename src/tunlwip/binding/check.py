"""One check per return-code convention of the C API, so no call site decodes a code.

The conventions, and the one function for each:

* lwIP ``err_t`` (0 ok, a negative ``ERR_*``): ``check_err`` raises ``LwipError`` naming it;
* ``-errno`` (0 or a count ok, negative an errno): ``check_errno`` raises ``OSError``;
* 0/1 answers and counts: returned as they are (no check needed).

Three setup calls have small status codes of their own (``tl_init``,
``tl_set_client_networks``, ``tl_set_host_addresses``); their wrappers in ``core`` turn them
into ``TunlwipError`` messages naming the case.
"""

from __future__ import annotations

import os

from ..errors import LwipError


def check_err(rc: int, what: str) -> None:
    """lwIP ``err_t``: raise ``LwipError(rc, what)`` unless ``rc`` is ERR_OK."""
    if rc != 0:
        raise LwipError(rc, what)


def check_errno(rc: int, what: str) -> int:
    """``-errno``: raise ``OSError(errno, "what: strerror")`` for a negative ``rc``, else
    return it (a count or 0)."""
    if rc < 0:
        raise OSError(-rc, f"{what}: {os.strerror(-rc)}")
    return rc
