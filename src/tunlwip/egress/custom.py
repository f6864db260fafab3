"""A ``via`` an embedder writes: an async function that opens the flow's upstream stream.

Why: the routes' built-in ways out (direct, SOCKS5, HTTP CONNECT, reject, drop) cover what a
configuration file can say; a program embedding tunlwip may have its own (a mesh client, an
SSH channel, a test double that is a real server). It names the way out and gives the opener;
a route (``config.routes.Route``, built in code, not from a file) uses it like any other via.

The contract of ``open_tcp(target, name)``, for the gateway that calls it:

* ``target`` is the flow's original destination, ``name`` the name the route decision had
  (from the DNS proxy's answers or the client's first bytes), or None;
* the client's connection is accepted first (opening needs a task), then ``open_tcp`` runs,
  within the gateway's dial timeout; raising ``ConnectionRefusedError``, another ``OSError``,
  or running out of time resets the client, and the flow record says why;
* it returns a connected ``trio.abc.Stream``: a ``trio.SocketStream`` over a TCP socket goes to
  the C relay (which detaches its socket: the stream is not to be closed after), any other
  stream is relayed in Python and closed when the flow ends.

A custom via carries TCP only (``Route`` refuses one on a route that also matches UDP). The
gateway's side is ``egress.accepted``; this module only defines the type.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from ..endpoint import Endpoint
from ..errors import ConfigError

if TYPE_CHECKING:
    import trio

__all__ = ["CustomVia", "TcpOpener"]

#: ``open_tcp(target, name)``: the connected upstream stream of one TCP flow.
TcpOpener = Callable[[Endpoint, str | None], Awaitable["trio.abc.Stream"]]

_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")


@dataclasses.dataclass(frozen=True)
class CustomVia:
    """An embedder's way out for TCP flows: ``name`` shows in status and flow records
    (``custom:NAME``), ``open_tcp`` opens the upstream stream (see the module docstring)."""

    name: str
    open_tcp: TcpOpener = dataclasses.field(compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ConfigError(f"custom via {self.name!r}: a name is 1-32 characters of a-z, "
                              "0-9, _ and -, starting with a letter")  # fmt: skip
        if not callable(self.open_tcp):
            raise ConfigError(f"custom via {self.name!r}: open_tcp must be an async function")

    def __str__(self) -> str:
        return f"custom:{self.name}"
