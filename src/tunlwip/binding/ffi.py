"""The one importer of the compiled module ``tunlwip._lwip`` (lwIP plus our C glue, cffi API
mode). Only the binding's own modules import ``ffi`` and ``lib`` from here."""

from __future__ import annotations

from .._lwip import ffi, lib
from .._stamp import check_build

# Refuse a module compiled from other C sources than these (a stale .so): rebuild: make install.
check_build(ffi.string(lib.tl_build_stamp()).decode())

__all__ = ["ffi", "lib"]
