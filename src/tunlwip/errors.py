"""One exception root for everything tunlwip raises on purpose."""

from __future__ import annotations

import errno

from .binding.err import err_name


class TunlwipError(Exception):
    """Base class of tunlwip's own errors."""


class ConfigError(TunlwipError):
    """The configuration is invalid; the message names the offending key or value."""


class DeviceError(TunlwipError):
    """The packet device could not be opened, configured or used."""


class ProtectError(TunlwipError, OSError):
    """A socket could not be protected, so it was not used (the dial fails closed)."""


class StaleBuildError(TunlwipError, ImportError):
    """The compiled module ``tunlwip._lwip`` was built from other C sources than the package's
    (a stale build, e.g. after ``git pull``): rebuild it (``make install``)."""


class HostAddressError(TunlwipError):
    """The gateway host's own addresses (refused as destinations) cannot be learned."""


class LwipError(TunlwipError):
    """lwIP returned an error code (an ``err_t``: ``binding.err.Err``)."""

    def __init__(self, err: int, what: str = "") -> None:
        self.err = int(err)
        #: lwIP's name of the code ("ERR_MEM"), None for a value lwIP does not define.
        self.name = err_name(self.err)
        super().__init__(
            f"{what + ': ' if what else ''}lwIP {self.name or 'unknown error'} ({self.err})"
        )


class ProxyError(TunlwipError, OSError):
    """A proxy could not carry a flow: it failed, refused the handshake, or answered something
    that is not its protocol. ``reason`` is a short stable text (``"proxy: bad version"``,
    ``"proxy: handshake timeout"``) fit for a flow's close reason and a per-reason counter;
    ``errno`` says what kind of failure it is (``EPROTO`` for a broken reply, ``ETIMEDOUT``,
    ``EACCES`` for authentication, ``ECONNREFUSED`` when the proxy itself refused us)."""

    def __init__(self, reason: str, err: int | None = None, detail: str = "") -> None:
        self.reason = reason if reason.startswith("proxy") else f"proxy: {reason}"
        code = errno.EPROTO if err is None else err
        super().__init__(code, self.reason + (f" ({detail})" if detail else ""))
        self.errno = code


def dial_failure_reason(exc: OSError) -> str:
    """A flow record's close reason for a way out that could not be opened: the proxy's own
    reason, else what the destination did ("refused", "dial timeout", "unreachable")."""
    if isinstance(exc, ProxyError):
        return exc.reason  # "proxy: refused", "proxy: handshake timeout" ...
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, TimeoutError):
        return "dial timeout"
    if isinstance(exc, ProtectError):
        return "protect failed"
    return "unreachable"
