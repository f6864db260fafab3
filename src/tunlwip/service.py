"""Running as a service: systemd notifications (readiness, watchdog), the open-files limit and
logging setup.

``notify`` speaks the sd_notify datagram protocol by hand (one ``sendto`` on an AF_UNIX socket)
so that ``Type=notify`` and ``WatchdogSec=`` need no dependency. The watchdog pings come from a
trio task, so they stop when the event loop is wedged and systemd restarts the gateway.

``configure_logging`` writes to stderr or a file; under journald it leaves the timestamps out
(journald stamps every line itself) and prefixes lines with the syslog priority ``<N>`` that
journald parses, so ``journalctl -p warning`` works.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import resource
import socket
import sys
import time
from collections.abc import Mapping
from typing import NoReturn

import trio

__all__ = [
    "LOG_FORMATS",
    "LOG_LEVELS",
    "NUMERIC_LOG_LEVELS",
    "configure_logging",
    "log_format",
    "notify",
    "parse_level",
    "raise_open_files_limit",
    "ready",
    "reloading",
    "set_log_tag",
    "status",
    "stopping",
    "under_journald",
    "watchdog",
    "watchdog_interval",
]

log = logging.getLogger("tunlwip.service")

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("text", "json")
#: The numeric levels, 0 (silent: only critical) .. 5 (most verbose), by index.
NUMERIC_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "debug")
NOTIFY_TIMEOUT = 1.0  # seconds; a stuck manager must not stall the event loop for long

_PLAIN = "%(levelname)s %(name)s: %(message)s"
_STAMPED = "%(asctime)s " + _PLAIN
_handler: logging.Handler | None = None  # the one configure_logging installed last
_tag: str | None = None  # set_log_tag's: "worker 1"


# -- sd_notify -------------------------------------------------------------------------------


def notify(state: str) -> bool:
    """Send ``state`` (newline-separated ``KEY=value`` lines) to the service manager.

    False when not started by systemd (no ``$NOTIFY_SOCKET``) or when sending failed: a
    notification is never worth failing the gateway for, so errors are only logged at debug.
    """
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):  # abstract namespace: the leading '@' stands for a NUL byte
        address: bytes = b"\0" + os.fsencode(path[1:])
    elif path.startswith("/"):
        address = os.fsencode(path)
    else:  # e.g. "vsock:CID:PORT" (systemd >= 253, VMs): not something a TUN gateway meets
        log.debug("sd_notify: unsupported NOTIFY_SOCKET %r", path)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(NOTIFY_TIMEOUT)
            sock.sendto(state.encode(), address)
    except (OSError, ValueError) as exc:
        log.debug("sd_notify %r to %s failed: %s", state, path, exc)
        return False
    return True


def _status_line(text: str) -> str:
    """One ``STATUS=`` line: a newline in the text would start a bogus assignment."""
    return "STATUS=" + " ".join(text.splitlines())


def ready(status_text: str | None = None) -> bool:
    """Tell systemd the gateway is serving (``systemctl start`` returns only then)."""
    return notify("READY=1" + ("\n" + _status_line(status_text) if status_text else ""))


def reloading() -> bool:
    """Tell systemd a reload began (send ``ready()`` when done); the monotonic timestamp is
    what systemd >= 253 matches the reload with and is ignored by older versions."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")


def stopping(status_text: str | None = None) -> bool:
    """Tell systemd the gateway is shutting down (the grace period may take a while)."""
    return notify("STOPPING=1" + ("\n" + _status_line(status_text) if status_text else ""))


def status(text: str) -> bool:
    """Free-form status shown by ``systemctl status``."""
    return notify(_status_line(text))


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """The watchdog timeout systemd expects pings within (``WatchdogSec=``), in seconds; None
    when there is none for this process.

    ``$WATCHDOG_USEC`` is the timeout; ``$WATCHDOG_PID``, when set, names the process it is
    meant for, so a child that inherited the environment does not ping for its parent."""
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    if usec <= 0 or (pid is not None and pid.strip() != str(os.getpid())):
        return None
    return usec / 1e6


async def watchdog(interval: float) -> NoReturn:
    """Send ``WATCHDOG=1`` now and then every ``interval / 2`` seconds, until cancelled.

    From the trio loop on purpose: when the loop is wedged (a blocking call, a stuck
    callback) the pings stop and systemd restarts the gateway after ``interval``."""
    while True:
        notify("WATCHDOG=1")
        await trio.sleep(interval / 2)


# -- open files ------------------------------------------------------------------------------


def _nr_open() -> int:
    """The kernel's ceiling for RLIMIT_NOFILE (``fs.nr_open``)."""
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 20  # the kernel's default


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; returns (soft, hard) now in force.

    Why: every TCP flow and UDP session holds an upstream socket, and the usual soft limit
    (1024) would refuse flows long before ``tcp.max_connections``; the hard limit is what the
    administrator (or ``LimitNOFILE=``) granted. Never raises: if the kernel refuses (e.g. a
    seccomp filter), the limit stays and the caller's warning tells."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(hard, _nr_open()) if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as exc:
            log.debug("cannot raise RLIMIT_NOFILE to %d: %s", target, exc)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft, hard


# -- logging ---------------------------------------------------------------------------------


def under_journald(fd: int = 2) -> bool:
    """True when ``fd`` (stderr) is the stream systemd connected to journald.

    systemd's documented check: ``$JOURNAL_STREAM`` is ``DEV:INODE`` of that stream, so a
    child whose stderr was redirected elsewhere (or a shell started from the service) does
    not wrongly believe it logs to the journal.
    """
    try:
        dev, inode = (int(part) for part in os.environ.get("JOURNAL_STREAM", "").split(":"))
        st = os.fstat(fd)
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, inode)


def log_format(journald: bool) -> str:
    """The format string: no timestamp under journald, which stamps each line itself."""
    return _PLAIN if journald else _STAMPED


class _JournalFormatter(logging.Formatter):
    """Prefixes every line with its syslog priority (``<3>``): journald reads that as the
    entry's priority (``SyslogLevelPrefix=`` is on by default), one entry per line, so each
    line of a traceback keeps the error priority."""

    PRIORITY = {"CRITICAL": 2, "ERROR": 3, "WARNING": 4, "INFO": 6, "DEBUG": 7}

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{self.PRIORITY.get(record.levelname, 6)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: ``time`` (UTC, ISO 8601, milliseconds),
    ``level``, ``logger``, ``message`` and, when there is one, ``exception`` (the traceback
    text; its newlines are escaped, so a record never spans lines). Why: log shippers then
    need no pattern to split records or to find a traceback's end."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        document = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            document["exception"] = record.exc_text
        if record.stack_info:
            document["stack"] = self.formatStack(record.stack_info)
        if (worker := getattr(record, "worker", None)) is not None:
            document["worker"] = worker
        return json.dumps(document, ensure_ascii=False)


class _JournalJsonFormatter(JsonFormatter):
    """JSON under journald: the ``<N>`` priority prefix, which journald strips, so the
    journal keeps the priority and the message stays one JSON object."""

    def format(self, record: logging.LogRecord) -> str:
        return f"<{_JournalFormatter.PRIORITY.get(record.levelname, 6)}>" + super().format(record)


class _TagFilter(logging.Filter):
    """Puts the process's tag in front of every message (``[worker 1] up: ...``) and, for
    the JSON format, in its own field: several workers write to one stderr or file."""

    def __init__(self, tag: str) -> None:
        super().__init__()
        self.tag = tag

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "tagged", False):
            record.msg = f"[{self.tag}] {record.msg}"
            record.tagged = True
            record.worker = self.tag
        return True


def set_log_tag(tag: str | None) -> None:
    """Tag every later log record of this process (``configure_logging`` applies it): a
    worker of ``tunlwip up --workers N`` says which one it is."""
    global _tag
    _tag = tag


def parse_level(level: str) -> int:
    """A level name (``debug`` .. ``critical``, any case) or ``0``..``5`` as a
    :mod:`logging` level; ValueError naming the accepted values otherwise."""
    name = level.strip().lower()
    if name.isdigit() and int(name) < len(NUMERIC_LOG_LEVELS):
        name = NUMERIC_LOG_LEVELS[int(name)]
    if name not in LOG_LEVELS:
        raise ValueError(f"bad log level {level!r}: use one of {', '.join(LOG_LEVELS)} or 0-5 "
                         "(0 only critical .. 5 debug)")  # fmt: skip
    value: int = getattr(logging, name.upper())
    return value


def configure_logging(level: str, log_file: str | None = None, fmt: str = "text") -> None:
    """Log at ``level`` to ``log_file`` (appended, always timestamped) or else stderr, as
    text or (``fmt="json"``) one JSON object per line.

    Each call replaces the handler the previous call installed, so calling it again on
    SIGHUP reopens a log file that logrotate moved away. ValueError for a bad level and
    OSError when the file cannot be opened, in both cases with the previous setup untouched.
    """
    numeric = parse_level(level)
    if fmt not in LOG_FORMATS:
        raise ValueError(f"bad log format {fmt!r}: use one of {', '.join(LOG_FORMATS)}")
    json_lines = fmt == "json"
    handler: logging.Handler
    formatter: logging.Formatter
    if log_file is not None:
        handler = logging.FileHandler(log_file, encoding="utf-8")
        journald = False
    else:
        handler = logging.StreamHandler(sys.stderr)
        journald = under_journald()
    if json_lines:
        formatter = _JournalJsonFormatter() if journald else JsonFormatter()
    elif journald:
        formatter = _JournalFormatter(_PLAIN)
    else:
        formatter = logging.Formatter(_STAMPED)
    handler.setFormatter(formatter)
    if _tag is not None:
        handler.addFilter(_TagFilter(_tag))
    global _handler
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
        _handler.close()
    _handler = handler
    root.addHandler(handler)
    root.setLevel(numeric)
