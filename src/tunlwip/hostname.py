"""The syntax of DNS host names, in one place.

Two strictnesses, on purpose. A name tunlwip *uses* (the TLS server name of a DNS upstream,
the name a client sent in its TLS SNI or HTTP Host header) must be a host name as RFC 1123
2.1 has it, with underscores allowed (seen in the wild): labels of letters, digits, "_" and
"-" that neither start nor end with "-". A name in an operator's block or allow list is only
compared, never used, and real lists carry names such as ``-ads-.example``; those are taken
as written (``is_list_name``) rather than dropped as bad lines.
"""

from __future__ import annotations

import re

MAX_NAME = 253  # characters of a name without its final dot (RFC 1035 2.3.4: 255 octets)

_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
# IGNORECASE: callers compare in lower case, but a URL's host may come in any case.
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*", re.IGNORECASE)
_LIST_NAME = re.compile(r"(?:[a-z0-9_-]{1,63}\.)*[a-z0-9_-]{1,63}")


def is_hostname(name: str) -> bool:
    """``name``, without a final dot, is a host name of at most ``MAX_NAME`` characters."""
    return len(name) <= MAX_NAME and _HOSTNAME.fullmatch(name) is not None


def is_list_name(name: str) -> bool:
    """``name``, lower-case and without a final dot, has the shape of a block or allow list
    entry: labels of 1-63 characters of ``[a-z0-9_-]`` (the caller bounds the length)."""
    return _LIST_NAME.fullmatch(name) is not None
