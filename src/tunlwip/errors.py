"""One exception root for everything tunlwip raises on purpose."""

from __future__ import annotations


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
    """lwIP returned an error code."""

    def __init__(self, err: int, what: str = "") -> None:
        self.err = err
        name = ERR_NAMES.get(err, "unknown error")
        super().__init__(f"{what + ': ' if what else ''}lwIP {name} ({err})")


ERR_NAMES = {
    0: "ERR_OK",
    -1: "ERR_MEM",
    -2: "ERR_BUF",
    -3: "ERR_TIMEOUT",
    -4: "ERR_RTE",
    -5: "ERR_INPROGRESS",
    -6: "ERR_VAL",
    -7: "ERR_WOULDBLOCK",
    -8: "ERR_USE",
    -9: "ERR_ALREADY",
    -10: "ERR_ISCONN",
    -11: "ERR_CONN",
    -12: "ERR_IF",
    -13: "ERR_ABRT",
    -14: "ERR_RST",
    -15: "ERR_CLSD",
    -16: "ERR_ARG",
}
