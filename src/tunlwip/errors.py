"""One exception root for everything tunlwip raises on purpose."""

from __future__ import annotations

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
