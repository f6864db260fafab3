"""The one importer of the compiled module ``tunlwip._lwip`` (lwIP plus our C glue, cffi API
mode). Only the binding's own modules import ``ffi`` and ``lib`` from here."""

from __future__ import annotations

from .._lwip import ffi, lib

# --- build stamp check (csplit): compare lib.tl_build_stamp() with tunlwip._stamp here, right
# after the import above, and fail with "rebuild: make install" on a mismatch. ---

__all__ = ["ffi", "lib"]
