"""How the build finds lwIP: vendor/lwip/fetch.sh refuses a tarball with the wrong hash before
anything is unpacked; build_ffi.py imports without lwIP and fails only when asked to compile."""

from __future__ import annotations

import hashlib
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
FETCH = ROOT / "vendor" / "lwip" / "fetch.sh"
PINNED = "0a8276d09fc4e97bbba2f953d74af2388fc2195ea156be9d7589e297a68fde24"


def _fetch(**env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("TUNLWIP_LWIP_")}
    full.update(env)
    return subprocess.run(
        ["bash", str(FETCH)], env=full, capture_output=True, text=True, timeout=60, check=False
    )


def test_wrong_hash_names_the_file_and_both_hashes(tmp_path: pathlib.Path) -> None:
    bad = tmp_path / "lwip_2.1.3+dfsg1.orig.tar.xz"
    bad.write_bytes(b"not lwIP")
    upstream = FETCH.parent / "upstream"
    before = sorted(p.name for p in upstream.iterdir()) if upstream.is_dir() else None
    result = _fetch(TUNLWIP_LWIP_TARBALL=str(bad))
    assert result.returncode == 1
    assert str(bad) in result.stderr
    assert PINNED in result.stderr
    assert hashlib.sha256(b"not lwIP").hexdigest() in result.stderr
    assert "nothing was unpacked" in result.stderr
    after = sorted(p.name for p in upstream.iterdir()) if upstream.is_dir() else None
    assert before == after


def test_missing_tarball_and_bad_dir_are_errors(tmp_path: pathlib.Path) -> None:
    result = _fetch(TUNLWIP_LWIP_TARBALL=str(tmp_path / "missing.tar.xz"))
    assert result.returncode == 1 and "no such file" in result.stderr
    result = _fetch(TUNLWIP_LWIP_DIR=str(tmp_path))
    assert result.returncode == 1 and "src/core/tcp.c missing" in result.stderr


def test_an_unpacked_tree_is_used_as_is(tmp_path: pathlib.Path) -> None:
    (tmp_path / "src" / "core").mkdir(parents=True)
    (tmp_path / "src" / "core" / "tcp.c").write_text("")
    result = _fetch(TUNLWIP_LWIP_DIR=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "as is" in result.stdout


def _build_ffi(code: str, lwip_dir: pathlib.Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNLWIP_LWIP_")}
    env["TUNLWIP_LWIP_DIR"] = str(lwip_dir)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip


def test_build_ffi_imports_without_lwip_and_fails_only_to_compile(tmp_path: pathlib.Path) -> None:
    result = _build_ffi(
        "import build_ffi as b; print(b.find_lwip(), len(b.LWIP_SOURCES))", tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == "None"
    result = _build_ffi("import build_ffi as b; b.require_lwip()", tmp_path)
    assert result.returncode == 1
    for way in ("TUNLWIP_LWIP_DIR=", "TUNLWIP_LWIP_TARBALL=", "apt-get source lwip"):
        assert way in result.stderr


def test_build_ffi_pins_the_same_tarball_as_fetch_sh() -> None:
    sys.path.insert(0, str(ROOT))
    try:
        import build_ffi
    finally:
        sys.path.remove(str(ROOT))
    script = FETCH.read_text()
    assert f"ORIG_SHA256={build_ffi.LWIP_SHA256}" in script
    assert f"ORIG_TARBALL={build_ffi.LWIP_TARBALL}" in script
    assert build_ffi.LWIP_SHA256 == PINNED
    tree = build_ffi.find_lwip()
    if tree is not None:  # what an sdist carries: the compiled sources, their headers, the licence
        files = build_ffi.lwip_dist_files(tree)
        assert {"COPYING", "README", "CHANGELOG", "src/core/tcp.c"} <= set(files)
        assert "src/include/lwip/tcp.h" in files
        assert not any(f.startswith("src/apps/") for f in files)


def test_our_c_layer_is_one_list_for_the_module_and_the_fuzzer() -> None:
    """build_ffi.OUR_SOURCES names every C file of the layer, and the fuzz build takes it."""
    sys.path.insert(0, str(ROOT))
    try:
        import build_ffi
    finally:
        sys.path.remove(str(ROOT))
    csrc = ROOT / "src" / "tunlwip" / "_csrc"
    assert sorted(build_ffi.OUR_SOURCES) == sorted(p.name for p in csrc.glob("*.c"))
    makefile = (ROOT / "Makefile").read_text()
    assert "b.OUR_SOURCES" in makefile and "$(OUR_FUZZ_SOURCES)" in makefile


def test_c_files_share_declarations_only_through_the_internal_header() -> None:
    """No hand-written extern in a .c file, TL_PY defined once, a comment on top of each."""
    csrc = ROOT / "src" / "tunlwip" / "_csrc"
    for path in sorted(csrc.glob("*.c")):
        text = path.read_text()
        assert text.startswith("/*"), f"{path.name}: no theory-of-operation comment on top"
        assert '#include "tl_internal.h"' in text, path.name
        externs = [ln for ln in text.splitlines() if ln.lstrip().startswith("extern ")]
        assert externs == [], f"{path.name}: {externs}"
    defined = [p.name for p in csrc.iterdir() if "#define TL_PY(" in p.read_text()]
    assert defined == ["tl_internal.h"]
