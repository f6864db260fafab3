"""Service integration: sd_notify datagrams, journald detection, logging setup, the unit file."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from tunlwip import service

UNIT = Path(__file__).resolve().parent.parent / "contrib" / "tunlwip@.service"


# -- sd_notify -------------------------------------------------------------------------------


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket standing in for systemd's, named by $NOTIFY_SOCKET."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


def test_notify_sends_the_datagram(notify_socket: socket.socket) -> None:
    assert service.notify("STATUS=hello") is True
    assert notify_socket.recv(4096) == b"STATUS=hello"
    assert service.ready("serving dmesh1") is True
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=serving dmesh1"
    assert service.ready() is True
    assert notify_socket.recv(4096) == b"READY=1"
    assert service.stopping() is True
    assert notify_socket.recv(4096) == b"STOPPING=1"
    assert service.status("two\nlines") is True  # a newline must not start a new assignment
    assert notify_socket.recv(4096) == b"STATUS=two lines"


def test_reloading_carries_the_monotonic_time(notify_socket: socket.socket) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert service.reloading() is True
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    match = re.fullmatch(rb"RELOADING=1\nMONOTONIC_USEC=(\d+)", notify_socket.recv(4096))
    assert match is not None
    assert before <= int(match[1]) <= after


def test_notify_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"tunlwip-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert service.ready() is True
        assert sock.recv(4096) == b"READY=1"


def test_not_under_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert service.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert service.ready() is False


@pytest.mark.parametrize("where", ["missing", "not-a-socket", "relative", "too-long"])
def test_notify_failure_is_false_not_an_exception(
    where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    paths = {
        "missing": str(tmp_path / "gone"),
        "not-a-socket": str(tmp_path),
        "relative": "vsock:2:1234",
        "too-long": "/" + "x" * 200,
    }
    monkeypatch.setenv("NOTIFY_SOCKET", paths[where])
    with caplog.at_level(logging.DEBUG, logger="tunlwip.service"):
        assert service.ready() is False
    assert "sd_notify" in caplog.text


# -- journald --------------------------------------------------------------------------------


def test_under_journald_compares_device_and_inode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    st = os.fstat(2)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    assert service.under_journald() is True
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
    assert service.under_journald() is False
    for bad in ("", "garbage", "1:2:3", "x:y"):
        monkeypatch.setenv("JOURNAL_STREAM", bad)
        assert service.under_journald() is False
    monkeypatch.delenv("JOURNAL_STREAM")
    assert service.under_journald() is False


def test_under_journald_follows_fd_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """JOURNAL_STREAM names the journal stream; once fd 2 is something else (a child whose
    stderr was redirected), it no longer applies."""
    journal = tmp_path / "journal"
    journal.touch()
    st = journal.stat()
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    saved = os.dup(2)
    try:
        with journal.open("w") as f:
            os.dup2(f.fileno(), 2)
        assert service.under_journald() is True
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    assert service.under_journald() is False


# -- the watchdog ----------------------------------------------------------------------------


def test_watchdog_interval_is_for_this_process_only() -> None:
    pid = str(os.getpid())
    assert service.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": pid}) == 30.0
    assert service.watchdog_interval({"WATCHDOG_USEC": "500000"}) == 0.5  # no PID: ours
    assert service.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert service.watchdog_interval({}) is None
    assert service.watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert service.watchdog_interval({"WATCHDOG_USEC": "soon"}) is None


async def test_watchdog_pings_at_half_the_interval(
    notify_socket: socket.socket, autojump_clock: trio.testing.MockClock
) -> None:
    """WATCHDOG=1 at once and then every interval/2 of trio's clock, from a trio task."""
    notify_socket.setblocking(False)
    with trio.move_on_after(0.95):  # pings at 0, 0.2, 0.4, 0.6, 0.8
        await service.watchdog(0.4)
    pings = []
    with contextlib.suppress(BlockingIOError):
        while True:
            pings.append(notify_socket.recv(4096))
    assert pings == [b"WATCHDOG=1"] * 5


async def test_watchdog_stops_with_a_blocked_loop(notify_socket: socket.socket) -> None:
    """A loop stuck in a blocking call sends nothing meanwhile: what lets systemd notice."""
    notify_socket.setblocking(False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(service.watchdog, 0.2)
        await trio.sleep(0.05)
        assert notify_socket.recv(4096) == b"WATCHDOG=1"
        time.sleep(0.5)  # noqa: ASYNC251 (wedged on purpose: no checkpoint, no ping)
        with pytest.raises(BlockingIOError):
            notify_socket.recv(4096)
        await trio.sleep(0.01)  # the loop runs again: the overdue ping goes out
        assert notify_socket.recv(4096) == b"WATCHDOG=1"
        nursery.cancel_scope.cancel()


# -- open files ------------------------------------------------------------------------------


def test_open_files_limit_is_raised_to_the_hard_limit() -> None:
    """In a child (the limit is per process): soft 64, hard 4096 -> 4096 (prlimit's result)."""
    code = (
        "import resource; from tunlwip import service;"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, 4096));"
        "print(*service.raise_open_files_limit(), *resource.getrlimit(resource.RLIMIT_NOFILE))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout  # fmt: skip
    assert out.split() == ["4096", "4096", "4096", "4096"]


def test_log_format() -> None:
    assert "asctime" not in service.log_format(journald=True)
    assert service.log_format(journald=False) == "%(asctime)s %(levelname)s %(name)s: %(message)s"


# -- configure_logging -----------------------------------------------------------------------


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """Restore the root logger (pytest's capture handlers, level) after the test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield root
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)


@pytest.mark.parametrize(
    ("level", "expected"),
    [
        ("debug", logging.DEBUG),
        ("INFO", logging.INFO),
        ("warning", logging.WARNING),
        ("error", logging.ERROR),
        ("critical", logging.CRITICAL),
        ("0", logging.CRITICAL),
        ("1", logging.ERROR),
        ("2", logging.WARNING),
        ("3", logging.INFO),
        ("4", logging.DEBUG),
        ("5", logging.DEBUG),
    ],
)
def test_levels(level: str, expected: int, root_logger: logging.Logger) -> None:
    service.configure_logging(level, None)
    assert root_logger.level == expected


@pytest.mark.parametrize("level", ["verbose", "6", "-1", "", "warn "])
def test_bad_level_is_a_clear_value_error(level: str, root_logger: logging.Logger) -> None:
    service.configure_logging("warning", None)
    with pytest.raises(ValueError, match=r"bad log level .*debug, info, warning.* or 0-5"):
        service.configure_logging(level, None)
    assert root_logger.level == logging.WARNING  # the previous setup stays


def test_numeric_levels_match_the_config_schema() -> None:
    config = pytest.importorskip("tunlwip.config.kinds")  # the log level kind reads them
    numeric = getattr(config, "NUMERIC_LOG_LEVELS", None)
    if numeric is None:
        pytest.skip("tunlwip.config has no NUMERIC_LOG_LEVELS")
    assert tuple(numeric) == service.NUMERIC_LOG_LEVELS


def test_log_file_is_appended_with_timestamps(tmp_path: Path, root_logger: logging.Logger) -> None:
    path = tmp_path / "tunlwip.log"
    path.write_text("earlier line\n")
    service.configure_logging("3", str(path))
    logging.getLogger("tunlwip.test").info("hello %s", "file")
    logging.getLogger("tunlwip.test").debug("not at info")
    service.configure_logging("info", str(path))  # SIGHUP: reopened, one handler only
    logging.getLogger("tunlwip.test").warning("again")
    lines = path.read_text().splitlines()
    assert lines[0] == "earlier line"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO tunlwip.test: hello file",
                        lines[1])  # fmt: skip
    assert lines[2].endswith(" WARNING tunlwip.test: again")
    assert len(lines) == 3


def test_unopenable_log_file_keeps_the_old_setup(
    tmp_path: Path, root_logger: logging.Logger
) -> None:
    good = tmp_path / "good.log"
    service.configure_logging("info", str(good))
    with pytest.raises(FileNotFoundError):
        service.configure_logging("debug", str(tmp_path / "no" / "such" / "dir.log"))
    logging.getLogger("tunlwip.test").info("still here")
    assert root_logger.level == logging.INFO
    assert good.read_text().endswith("INFO tunlwip.test: still here\n")


def _run_logging(tmp_path: Path, journald: bool, fmt: str = "text") -> list[str]:
    """stderr of a child that configures logging, with stderr a file and JOURNAL_STREAM
    naming that file (as systemd does) or not set."""
    out = tmp_path / "stderr"
    code = (
        "import logging; from tunlwip import service;"
        f"service.configure_logging('info', None, {fmt!r});"
        "log = logging.getLogger('tunlwip'); log.info('up'); log.warning('careful');"
        "log.error('two\\nlines')"
    )
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    with out.open("w") as f:
        if journald:
            st = os.fstat(f.fileno())
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        subprocess.run([sys.executable, "-c", code], stderr=f, env=env, check=True, timeout=60)
    return out.read_text().splitlines()


def test_stderr_under_journald_has_priorities_and_no_timestamps(tmp_path: Path) -> None:
    assert _run_logging(tmp_path, journald=True) == [
        "<6>INFO tunlwip: up",
        "<4>WARNING tunlwip: careful",
        "<3>ERROR tunlwip: two",
        "<3>lines",
    ]


def test_json_lines(tmp_path: Path, root_logger: logging.Logger) -> None:
    """One JSON object per line: time, level, logger, message, and the traceback of an
    exception as one escaped string, so a record never spans lines."""
    path = tmp_path / "tunlwip.json"
    service.configure_logging("info", str(path), "json")
    log = logging.getLogger("tunlwip.test")
    log.info("hello %s", "json")
    log.debug("not at info")
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        log.exception("it failed: %d", 42)
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert set(first) == {"time", "level", "logger", "message"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])
    assert (first["level"], first["logger"], first["message"]) == ("info", "tunlwip.test",
                                                                    "hello json")  # fmt: skip
    assert (second["level"], second["message"]) == ("error", "it failed: 42")
    assert second["exception"].startswith("Traceback (most recent call last):")
    assert second["exception"].endswith("ValueError: bad\nthing")


def test_json_under_journald_keeps_the_priority_prefix(tmp_path: Path) -> None:
    lines = _run_logging(tmp_path, journald=True, fmt="json")
    assert [line[:3] for line in lines] == ["<6>", "<4>", "<3>"]  # "two\nlines": one record
    assert [json.loads(line[3:])["message"] for line in lines] == ["up", "careful", "two\nlines"]


def test_bad_log_format_is_a_clear_value_error(root_logger: logging.Logger) -> None:
    with pytest.raises(ValueError, match=r"bad log format 'xml': use one of text, json"):
        service.configure_logging("info", None, "xml")


def test_stderr_elsewhere_has_timestamps(tmp_path: Path) -> None:
    lines = _run_logging(tmp_path, journald=False)
    assert len(lines) == 4
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO tunlwip: up", lines[0])
    assert lines[3] == "lines"


# -- the unit file ---------------------------------------------------------------------------


def _unit() -> dict[str, dict[str, list[str]]]:
    """The unit as section -> key -> values in order (keys may repeat; an empty assignment
    resets the list, as in systemd)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"setting outside a section: {line}"
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {line}"
        values = current.setdefault(key.strip(), [])
        if value.strip():
            values.append(value.strip())
        else:
            values.clear()
    return sections


def test_unit_settings() -> None:
    unit = _unit()
    service_ = unit["Service"]

    def one(key: str) -> str:
        assert len(service_.get(key, [])) == 1, key
        return service_[key][0]

    assert one("Type") == "notify"
    assert one("NotifyAccess") == "main"
    assert one("ExecStart").endswith("/tunlwip up --iface %i")
    assert re.fullmatch(r"\S*kill -HUP \$MAINPID", one("ExecReload"))
    assert one("Restart") == "on-failure"
    assert one("WatchdogSec") == "30s"
    assert int(one("LimitNOFILE")) >= 65536 + 4096 + 256  # the defaults' flows, see cli.FD_MARGIN
    assert {"77", "78"} <= set(one("RestartPreventExitStatus").split())
    assert one("CapabilityBoundingSet").split() == ["CAP_NET_ADMIN", "CAP_NET_RAW"]
    assert one("AmbientCapabilities").split() == ["CAP_NET_ADMIN", "CAP_NET_RAW"]
    assert one("NoNewPrivileges") == "yes"
    assert one("ProtectSystem") == "strict"
    assert one("RuntimeDirectory") == "tunlwip"
    assert one("ConfigurationDirectory") == "tunlwip"
    assert one("DeviceAllow") == "/dev/net/tun rw"
    assert set(one("RestrictAddressFamilies").split()) == {
        "AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}  # fmt: skip
    for breaks_the_gateway in ("PrivateNetwork", "PrivateDevices", "PrivateUsers"):
        assert breaks_the_gateway not in service_
    assert "network-online.target" in unit["Unit"]["After"]
    assert "network-online.target" in unit["Unit"]["Wants"]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def _verify(unit_dir: Path, instance: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "verify", "--man=no", "--recursive-errors=no",
         str(unit_dir / instance)],
        capture_output=True, text=True, timeout=120, cwd=unit_dir,
    )  # fmt: skip


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """`verify` needs ExecStart's binary to exist: a copy of the unit points at a stand-in.
    It exits 0 even for settings it ignores as invalid, so its output must be empty too (a
    deliberately broken copy proves that such mistakes do show up)."""
    fake = tmp_path / "tunlwip"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    text = UNIT.read_text()
    assert "ExecStart=/usr/local/bin/tunlwip " in text
    (tmp_path / "tunlwip@.service").write_text(
        text.replace("ExecStart=/usr/local/bin/tunlwip ", f"ExecStart={fake} ")
    )
    proc = _verify(tmp_path, "tunlwip@dmesh1.service")
    ours = [line for line in (proc.stdout + proc.stderr).splitlines() if "tunlwip" in line]
    assert proc.returncode == 0 and not ours, proc.stdout + proc.stderr

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tunlwip@.service").write_text(
        (tmp_path / "tunlwip@.service").read_text().replace("Type=notify", "Type=notifyy")
    )
    proc = _verify(broken, "tunlwip@dmesh1.service")
    assert "notifyy" in proc.stdout + proc.stderr
