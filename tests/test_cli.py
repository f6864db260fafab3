"""`tunlwip` command line: exit codes and argument validation (no network touched)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys

import pytest

from tunlwip import config, service
from tunlwip.cli import EXIT_CONFIG, EXIT_NOPERM, EXIT_OK, check_open_files, main


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["version"]) == EXIT_OK
    assert capsys.readouterr().out.startswith("tunlwip ")


def test_usage_error_is_2() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["up"])  # --iface missing
    assert exc.value.code == 2


@pytest.mark.parametrize(
    "args",
    [
        ["--mtu", "100"],
        ["--mtu", "70000"],
        ["--gateway4", "not-an-ip"],
        ["--client-net", "300.1.2.0/24"],
        ["--dial-timeout", "0"],
        ["--fwmark", "0"],
    ],
)
def test_bad_config_is_78(args: list[str]) -> None:
    assert main(["up", "--iface", "tlwcli0", *args]) == EXIT_CONFIG


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root+setpriv")
def test_no_permission_for_the_tun_is_77() -> None:
    """An unprivileged user cannot create a TUN: the command says so and exits 77."""
    proc = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         sys.executable, "-m", "tunlwip", "up", "--iface", "tlwnoperm0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == EXIT_NOPERM, proc.stderr
    assert "tlwnoperm0" in proc.stderr


@pytest.mark.parametrize(("soft", "warned"), [(1024, True), (69_888, False), (1 << 20, False)])
def test_open_files_warning_at_start(
    soft: int, warned: bool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The limit is logged; a warning names the shortage when the limit cannot hold a socket
    for each of tcp.max_connections + udp.max_sessions (65536 + 4096) plus the margin (256)."""
    monkeypatch.setattr(service, "raise_open_files_limit", lambda: (soft, 1 << 20))
    with caplog.at_level(logging.INFO, logger="tunlwip"):
        assert check_open_files(config.load(None, {"device.name": "tlwcli0"})) == soft
    assert f"open files: limit {soft} (hard {1 << 20})" in caplog.text
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == warned
    if warned:
        assert "below the 69888 that tcp.max_connections (65536)" in warnings[0].getMessage()
