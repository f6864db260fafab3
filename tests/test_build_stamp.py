"""The build stamp: the compiled module names the C sources it was built from, and the package
refuses to import a module built from other sources than its own (a stale build)."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

import pytest

from tunlwip import _stamp
from tunlwip.binding.ffi import ffi, lib
from tunlwip.errors import StaleBuildError, TunlwipError

CSRC = _stamp.CSRC  # the imported package's sources (src/tunlwip/_csrc in a checkout)


def _built() -> str:
    stamp: bytes = ffi.string(lib.tl_build_stamp())
    return stamp.decode()


def _copy(tmp_path: pathlib.Path) -> pathlib.Path:
    copy = tmp_path / "_csrc"
    shutil.copytree(CSRC, copy)
    return copy


def test_the_module_was_built_from_the_package_sources() -> None:
    assert len(_built()) == 64
    assert _built() == _stamp.source_stamp(CSRC)
    _stamp.check_build(_built())  # what importing the binding did


def test_the_stamp_covers_every_c_file_and_header(tmp_path: pathlib.Path) -> None:
    copy = _copy(tmp_path)
    before = _stamp.source_stamp(copy)
    assert before == _stamp.source_stamp(CSRC)
    (copy / "notes.txt").write_text("not a source")  # not compiled: not covered
    assert _stamp.source_stamp(copy) == before
    header = copy / "tunlwip_glue.h"  # the cffi cdef
    header.write_text(header.read_text() + "\n")
    assert _stamp.source_stamp(copy) != before
    shutil.copy2(CSRC / "tunlwip_glue.h", header)
    assert _stamp.source_stamp(copy) == before
    (copy / "poll.c").rename(copy / "poll2.c")  # a rename is another set of files
    assert _stamp.source_stamp(copy) != before


def test_a_module_built_from_other_sources_is_refused(tmp_path: pathlib.Path) -> None:
    copy = _copy(tmp_path)
    relay = copy / "relay.c"
    relay.write_text(relay.read_text() + "/* edited after the build */\n")
    with pytest.raises(StaleBuildError, match=r"stale build.*; rebuild: make install"):
        _stamp.check_build(_built(), copy)
    assert issubclass(StaleBuildError, ImportError) and issubclass(StaleBuildError, TunlwipError)


def test_an_install_without_c_sources_is_not_checked(tmp_path: pathlib.Path) -> None:
    _stamp.check_build("0" * 64, tmp_path / "missing")
    _stamp.check_build("0" * 64, tmp_path)  # a folder with no .c or .h


def test_importing_the_binding_refuses_a_stale_module(tmp_path: pathlib.Path) -> None:
    """The whole path: a fresh interpreter whose package sources (here a copy with one file
    edited) differ from what the module was built from cannot import the binding."""
    copy = _copy(tmp_path)
    (copy / "clock.c").write_text((copy / "clock.c").read_text() + "\n")
    code = f"""
import importlib.util, pathlib, sys
spec = importlib.util.spec_from_file_location("tunlwip._stamp", {str(CSRC.parent / "_stamp.py")!r})
stamp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(stamp)
stamp.CSRC = pathlib.Path(sys.argv[1])
sys.modules["tunlwip._stamp"] = stamp
try:
    import tunlwip.binding.ffi
except ImportError as e:
    print("refused:", e)
else:
    print("imported")
"""

    def run(csrc: pathlib.Path) -> str:
        result = subprocess.run(
            [sys.executable, "-c", code, str(csrc)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return result.stdout

    refused = run(copy)
    assert refused.startswith("refused: tunlwip._lwip was compiled from other C sources"), refused
    assert f"package's own ({copy}): a stale build" in refused
    assert "rebuild: make install" in refused
    assert run(CSRC).startswith("imported")
