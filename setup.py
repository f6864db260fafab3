"""Only here because cffi_modules has no pyproject.toml key; all metadata lives in pyproject.toml.

Two commands are adapted: build_ext fails, with one clear message, only when it has to compile
and no lwIP tree is there (build_ffi.require_lwip); sdist copies the verified lwIP tree
(vendor/lwip/upstream with fetch.sh's stamp: the files the build needs plus lwIP's licence,
README and changelog) into the same place in the release tree, so the sdist builds offline.
An unverified tree (TUNLWIP_LWIP_DIR) is never shipped. The wheel is tagged abi3 (cp311): cffi
compiles the module with Py_LIMITED_API, except on free-threaded and debug builds of CPython.
"""

from __future__ import annotations

import pathlib
import shutil
import sys
import sysconfig

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.command.sdist import sdist

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import build_ffi  # noqa: E402


class BuildExt(build_ext):
    def run(self) -> None:
        build_ffi.require_lwip()
        super().run()


class Sdist(sdist):
    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        tree = build_ffi.DEFAULT_TREE
        # setuptools merges the file list of an older egg-info (an editable install writes every
        # file of the tree into SOURCES.txt): of lwIP, only what lwip_dist_files names goes in.
        wanted = set()
        if build_ffi.is_verified(tree):
            wanted = {f"vendor/lwip/upstream/{rel}" for rel in build_ffi.lwip_dist_files(tree)}
        files = [f for f in files
                 if not pathlib.PurePath(f).as_posix().startswith("vendor/lwip/upstream/")
                 or pathlib.PurePath(f).as_posix() in wanted]  # fmt: skip
        super().make_release_tree(base_dir, files)
        if not build_ffi.is_verified(tree):
            # Making an sdist is not compiling: it works, but says loudly what it lacks.
            print(
                "setup.py sdist: warning: no verified lwIP tree in vendor/lwip/upstream, so this "
                "sdist carries no lwIP and building it needs TUNLWIP_LWIP_DIR (run `bash "
                "vendor/lwip/fetch.sh` first; `make dist` does)",
                file=sys.stderr,
            )
            return
        dest = pathlib.Path(base_dir, "vendor", "lwip", "upstream")
        for rel in build_ffi.lwip_dist_files(tree):
            target = dest / rel
            if not target.exists():  # sources and COPYING may be there already (hard links)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(tree / rel, target)


def _limited_api() -> dict[str, dict[str, str]]:
    """Tag the wheel cp311-abi3 when cffi builds the module against the limited API."""
    if sysconfig.get_config_var("Py_GIL_DISABLED") or hasattr(sys, "gettotalrefcount"):
        return {}
    return {"bdist_wheel": {"py_limited_api": "cp311"}}


setup(
    cffi_modules=["build_ffi.py:ffibuilder"],
    cmdclass={"build_ext": BuildExt, "sdist": Sdist},
    options=_limited_api(),
)
