"""lwIP's ``err_t`` values (``lwip/err.h``), declared once for the whole package.

Pure Python on purpose: ``tunlwip.errors`` names codes in ``LwipError`` without importing the
compiled module.
"""

from __future__ import annotations

import enum


class Err(enum.IntEnum):
    """lwIP's error codes: 0 is success, every failure is negative."""

    ERR_OK = 0
    ERR_MEM = -1
    ERR_BUF = -2
    ERR_TIMEOUT = -3
    ERR_RTE = -4
    ERR_INPROGRESS = -5
    ERR_VAL = -6
    ERR_WOULDBLOCK = -7
    ERR_USE = -8
    ERR_ALREADY = -9
    ERR_ISCONN = -10
    ERR_CONN = -11
    ERR_IF = -12
    ERR_ABRT = -13
    ERR_RST = -14
    ERR_CLSD = -15
    ERR_ARG = -16


def err_name(err: int) -> str | None:
    """``"ERR_MEM"`` for -1, ..., None for a value lwIP does not define."""
    try:
        return Err(err).name
    except ValueError:
        return None
