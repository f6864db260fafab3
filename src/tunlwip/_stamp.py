"""The build stamp: which C sources the compiled module ``tunlwip._lwip`` was built from.

Why: after ``git pull`` (or any edit of ``_csrc``) an editable install keeps the old ``.so``
until it is rebuilt, and a module whose C differs from the package's Python fails in odd ways
far from the cause. So ``build_ffi.py`` compiles ``source_stamp(_csrc)`` into the module
(``tl_build_stamp()``), and the binding compares it with the sources next to it at import
(``check_build``), refusing a stale module with one clear message.

The stamp is the sha256 over the package's C sources and headers (``_csrc/*.c``, ``*.h``; the
cffi cdef is ``tunlwip_glue.h``, so it is covered): each file's name and contents, in name
order, each length-prefixed so no two different sets of files hash alike.

This module is pure (no import of the compiled module, nothing but the standard library):
``build_ffi.py`` loads it by file path, without importing the package.
"""

from __future__ import annotations

import hashlib
import pathlib

__all__ = ["CSRC", "STALE_BUILD", "check_build", "source_stamp"]

CSRC = pathlib.Path(__file__).resolve().parent / "_csrc"

STALE_BUILD = (
    "tunlwip._lwip was compiled from other C sources than the package's own ({csrc}): a stale "
    "build (e.g. after git pull); rebuild: make install (or pip install -e . in its environment)"
)


def _files(csrc_dir: pathlib.Path) -> list[pathlib.Path]:
    return sorted(
        (p for p in csrc_dir.iterdir() if p.suffix in (".c", ".h") and p.is_file()),
        key=lambda p: p.name,
    )


def source_stamp(csrc_dir: pathlib.Path) -> str:
    """The hex sha256 of the C sources and headers in ``csrc_dir``."""
    digest = hashlib.sha256()
    for path in _files(csrc_dir):
        name, data = path.name.encode(), path.read_bytes()
        for part in (name, data):
            digest.update(len(part).to_bytes(8, "big"))
            digest.update(part)
    return digest.hexdigest()


def check_build(built_stamp: str, csrc_dir: pathlib.Path | None = None) -> None:
    """Raise ``StaleBuildError`` (an ImportError) unless ``built_stamp`` is the stamp of the
    sources in ``csrc_dir`` (default: the package's own, ``CSRC``).

    An install without C sources (``csrc_dir`` missing or holding none; wheels ship them, but a
    distributor may strip them) is accepted: there is nothing the module could be stale
    against, and refusing a module that was built and installed together would only break it.
    """
    if csrc_dir is None:
        csrc_dir = CSRC
    if not csrc_dir.is_dir() or not _files(csrc_dir):
        return
    expected = source_stamp(csrc_dir)
    if built_stamp != expected:
        # Imported here, not at the top: build_ffi.py loads this file outside the package.
        from .errors import StaleBuildError

        message = STALE_BUILD.format(csrc=csrc_dir)
        raise StaleBuildError(f"{message} [module {built_stamp[:12]}, sources {expected[:12]}]")
