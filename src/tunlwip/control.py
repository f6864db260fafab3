"""The control socket of a running gateway, and ``tunlwip status``, its client.

Protocol: a client connects to the unix stream socket (``/run/tunlwip/<iface>.sock``, mode
0600, so only the gateway's user can ask), sends one JSON request line (``{"cmd": "status"}``,
optionally with ``"max_flows": N`` to list at most N live flows), reads one JSON document
(newline-terminated) and the gateway closes the connection.

What answers is a ``StatusSource``: one gateway (``GatewayStatus``), or the supervisor of
``--workers N``, which asks each worker's own control socket (``request_async``) and merges.

The data path comes first: answers are built synchronously from counters the gateway keeps
anyway, at most ``MAX_CONTROL_CLIENTS`` clients are served at once, a request larger than 4 KiB
or slower than 5 s is dropped, and any error with a client is logged at debug level and ends
only that client's connection.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import resource
import socket
import stat
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, TextIO, runtime_checkable

import trio

from . import __version__
from .errors import TunlwipError
from .local_server import serve_clients
from .stats import human_bytes, human_duration, status_lines, totals_document

if TYPE_CHECKING:
    from .gateway import Gateway

log = logging.getLogger("tunlwip.control")

CONTROL_DIR = Path("/run/tunlwip")
MAX_REQUEST = 4096
REQUEST_TIMEOUT = 5.0
MAX_CONTROL_CLIENTS = 8
MAX_LISTED_FLOWS = 1000
MAX_RESPONSE = 64 << 20  # what the client reads at most


class ControlError(TunlwipError):
    """The control socket cannot be set up (another gateway listens there, bad path)."""


def default_socket_path(iface: str) -> Path:
    return CONTROL_DIR / f"{iface}.sock"


# -- the answers ---------------------------------------------------------------------------------


def status(gateway: Gateway, *, iface: str | None = None,
           max_flows: int = MAX_LISTED_FLOWS) -> dict[str, Any]:  # fmt: skip
    """The ``status`` answer: version, uptime, totals, drops by reason and the live flows
    (most bytes first, at most ``max_flows``; ``flows_omitted`` counts the rest)."""
    stats = gateway.statistics()
    live = stats.flows.live_tcp + stats.flows.live_udp
    flows = gateway.live_flows(max_flows)
    return {
        "version": __version__,
        "iface": iface if iface is not None else _device_name(gateway),
        "pid": os.getpid(),
        "started": gateway.started,
        "uptime": round(stats.uptime, 3),
        "totals": totals_document(stats),
        "drops": stats.stack.dropped,
        "process": process_usage(),
        "flows": [flow.to_json() for flow in flows],
        "flows_live": live,
        "flows_omitted": max(0, live - len(flows)),
    }


def process_usage() -> dict[str, int | None]:
    """The gateway process's resident memory, open file descriptors and their limit (None
    where /proc cannot tell): every flow holds a socket, so fds run out before memory does."""
    usage: dict[str, int | None] = {"rss_bytes": None, "open_files": None}
    try:
        with open("/proc/self/statm") as f:
            usage["rss_bytes"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    with contextlib.suppress(OSError):
        usage["open_files"] = len(os.listdir("/proc/self/fd"))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    usage["open_files_limit"] = None if soft == resource.RLIM_INFINITY else soft
    return usage


def _device_name(gateway: Gateway) -> str | None:
    name = getattr(gateway.stack.device, "name", None)
    return name if isinstance(name, str) else None


def answer(gateway: Gateway, request: bytes, *, iface: str | None = None) -> dict[str, Any]:
    """The response document to one raw request line."""
    parsed = parse_request(request)
    if isinstance(parsed, dict):
        return parsed
    return status(gateway, iface=iface, max_flows=parsed)


def parse_request(request: bytes) -> int | dict[str, Any]:
    """A status request's ``max_flows`` (MAX_LISTED_FLOWS unless it asks for fewer), or the
    error document answering a request that is not one."""
    try:
        message = json.loads(request)
    except (ValueError, UnicodeDecodeError):
        return {"error": "the request is not JSON"}
    command = message.get("cmd") if isinstance(message, dict) else None
    if command != "status":
        return {"error": f"unknown command {command!r}; known: status"}
    limit = message.get("max_flows", MAX_LISTED_FLOWS)
    if isinstance(limit, bool) or not isinstance(limit, int):
        return {"error": "max_flows must be an integer"}
    return max(0, min(limit, MAX_LISTED_FLOWS))


@runtime_checkable
class StatusSource(Protocol):
    """What the control socket and the metrics endpoint ask: the status document."""

    async def status_document(self, max_flows: int) -> dict[str, Any]: ...


class GatewayStatus:
    """One gateway as a ``StatusSource`` (built synchronously: no await between counters)."""

    def __init__(self, gateway: Gateway, iface: str | None = None) -> None:
        self.gateway = gateway
        self.iface = iface

    async def status_document(self, max_flows: int) -> dict[str, Any]:
        return status(self.gateway, iface=self.iface, max_flows=max_flows)


def status_source(gateway: Gateway | StatusSource, iface: str | None) -> StatusSource:
    return gateway if isinstance(gateway, StatusSource) else GatewayStatus(gateway, iface)


# -- the server ----------------------------------------------------------------------------------


async def serve_control(
    gateway: Gateway | StatusSource,
    path: str | os.PathLike[str] | None = None,
    *,
    iface: str | None = None,
    task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Answer control requests about ``gateway`` on the unix socket ``path`` until cancelled.

    ``path`` defaults to ``/run/tunlwip/<iface>.sock`` (``iface``: the device's name). The
    directory is created (0755) if missing; the socket is 0600. A stale socket file is
    replaced, but if another gateway still answers there, ControlError is raised (through
    ``nursery.start``). The socket file is removed on exit. ``started(path)`` once listening.
    ``gateway`` may be any ``StatusSource`` (the supervisor of ``--workers N``); then ``iface``
    or ``path`` must be given.
    """
    if iface is None and not isinstance(gateway, StatusSource):
        iface = _device_name(gateway)
    source = status_source(gateway, iface)
    if path is None:
        if iface is None:
            raise ControlError("no control socket path given and the device has no name")
        path = default_socket_path(iface)
    path = Path(path)
    listener, identity = _bind(path)
    started_path = path

    async def serve_client(sock: trio.socket.SocketType) -> None:
        await _serve_client(source, sock)

    try:
        await serve_clients(listener, serve_client, max_clients=MAX_CONTROL_CLIENTS,
                            what="control socket",
                            started=lambda: task_status.started(started_path))  # fmt: skip
    finally:
        listener.close()
        _remove_if_ours(path, identity)


def _bind(path: Path) -> tuple[trio.socket.SocketType, tuple[int, int]]:
    """Listen on ``path`` (mode 0600). Binds a temporary name and renames it into place, so
    the socket is never reachable with looser permissions. (Blocking, but only local file
    operations, once at startup.)"""
    if not path.parent.is_dir():
        try:
            path.parent.mkdir(parents=True)
            os.chmod(path.parent, 0o755)
        except OSError as exc:
            raise ControlError(f"cannot create {path.parent}: {exc.strerror or exc}") from exc
    _clear_stale(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(temporary))
        os.chmod(temporary, 0o600)
        sock.listen(16)
        os.replace(temporary, path)
        info = path.stat()
    except OSError as exc:
        sock.close()
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise ControlError(f"cannot listen on {path}: {exc.strerror or exc}") from exc
    return trio.socket.from_stdlib_socket(sock), (info.st_dev, info.st_ino)


def _clear_stale(path: Path) -> None:
    """Remove a socket file nobody listens on; refuse if someone does, or if it is no socket."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ControlError(f"{path} exists and is not a socket; not replacing it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError, TimeoutError):
            pass  # nobody home (a crashed gateway's leftover): replace it
        except OSError as exc:
            raise ControlError(f"cannot check {path}: {exc.strerror or exc}") from exc
        else:
            raise ControlError(f"another gateway is listening on {path}")
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _remove_if_ours(path: Path, identity: tuple[int, int]) -> None:
    """Unlink the socket file unless another gateway has replaced it since."""
    try:
        info = path.lstat()
        if (info.st_dev, info.st_ino) == identity:
            path.unlink()
    except OSError:
        pass


async def _serve_client(source: StatusSource, sock: trio.socket.SocketType) -> None:
    """One request, one answer, all within REQUEST_TIMEOUT."""
    with sock, trio.move_on_after(REQUEST_TIMEOUT) as scope:
        try:
            request = await _read_line(sock)
            if request is None:
                return
            parsed = parse_request(request)
            document = parsed if isinstance(parsed, dict) else \
                await source.status_document(parsed)  # fmt: skip
            data = (json.dumps(document, separators=(",", ":")) + "\n").encode()
            view = memoryview(data)
            while view:
                sent = await sock.send(view)
                view = view[sent:]
        except Exception as exc:  # a control client must never take the gateway down
            log.debug("control client failed: %r", exc, exc_info=True)
    if scope.cancelled_caught:
        log.debug("control client too slow: dropped after %.0f s", REQUEST_TIMEOUT)


async def _read_line(sock: trio.socket.SocketType) -> bytes | None:
    """The request line (at most MAX_REQUEST bytes; the newline may be missing at EOF)."""
    buffer = b""
    while b"\n" not in buffer:
        data = await sock.recv(MAX_REQUEST + 1 - len(buffer))
        if not data:
            break
        buffer += data
        if len(buffer) > MAX_REQUEST:
            log.debug("control request over %d bytes dropped", MAX_REQUEST)
            return None
    line = buffer.split(b"\n", 1)[0]
    return line if line.strip() else None


# -- the client: ``tunlwip status`` --------------------------------------------------------------


def add_status_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``status [--iface X] [--control-socket PATH] [--json]`` to the ``tunlwip`` command.

    ``--control-socket`` is named as in ``up``; ``--socket``, its older name, still works but
    warns (one flag name for one thing on both sides)."""
    parser = subparsers.add_parser(
        "status",
        help="show a running gateway's counters and live flows",
        description="Ask a running `tunlwip up` over its control socket for its counters, "
        "drops and live flows.",
    )
    parser.add_argument("--iface", help="the gateway's TUN interface (default: the only one "
                        f"with a socket in {CONTROL_DIR})")  # fmt: skip
    parser.add_argument("--control-socket", dest="control_socket", metavar="PATH",
                        help="control socket path, as given to `up --control-socket` (default "
                             "/run/tunlwip/<iface>.sock)")  # fmt: skip
    parser.add_argument(
        "--socket",
        dest="control_socket",
        metavar="PATH",
        action=_DeprecatedSocketFlag,
        help=argparse.SUPPRESS,
    )
    parser.add_argument("--format", choices=("table", "json", "prometheus"), default=None,
                        help="table (default), the raw JSON answer, or the Prometheus text "
                             "format (what `up --metrics-listen` serves)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="the same as --format json")
    parser.add_argument("--timeout", type=float, default=REQUEST_TIMEOUT, metavar="SECONDS",
                        help=f"give up after this long ({REQUEST_TIMEOUT:g})")  # fmt: skip


class _DeprecatedSocketFlag(argparse.Action):
    """``status --socket PATH``: stores like ``--control-socket`` and says so on stderr."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:  # fmt: skip
        print("tunlwip status: --socket is deprecated, use --control-socket", file=sys.stderr)
        setattr(namespace, self.dest, values)


def run_status(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """``tunlwip status``: 0 with the answer printed; 1 (message on stderr) if no gateway
    answered."""
    out = out if out is not None else sys.stdout
    try:
        path = _client_path(getattr(args, "control_socket", None), getattr(args, "iface", None))
        raw = request(path, {"cmd": "status"}, timeout=getattr(args, "timeout", REQUEST_TIMEOUT))
        try:
            document = json.loads(raw)
        except ValueError:
            raise _StatusError(f"the answer from {path} is not JSON") from None
        if not isinstance(document, dict):
            raise _StatusError(f"unexpected answer from {path}")
        if "error" in document:
            raise _StatusError(f"the gateway on {path} said: {document['error']}")
    except _StatusError as exc:
        print(f"tunlwip status: {exc}", file=sys.stderr)
        return 1
    form = getattr(args, "format", None) or ("json" if getattr(args, "json", False) else "table")
    if form == "json":
        out.write(raw.decode())
    elif form == "prometheus":
        from . import metrics  # imports this module: loaded only when asked for

        out.write(metrics.render(document).decode())
    else:
        out.write(format_status(document))
    return 0


class _StatusError(TunlwipError):
    """``tunlwip status`` could not get an answer; the message says why, for the user."""


def _client_path(path: str | None, iface: str | None) -> Path:
    if path:
        return Path(path)
    if iface:
        return default_socket_path(iface)
    try:
        found = sorted(p for p in CONTROL_DIR.glob("*.sock"))
    except OSError:
        found = []
    if len(found) == 1:
        return found[0]
    if not found:
        raise _StatusError(f"no gateway found in {CONTROL_DIR}: is `tunlwip up` running? "
                           "(or give --iface / --control-socket)")  # fmt: skip
    names = ", ".join(p.stem for p in found)
    raise _StatusError(f"several gateways run ({names}): choose one with --iface")


def request(path: Path, message: dict[str, Any], *, timeout: float = REQUEST_TIMEOUT) -> bytes:
    """Send one request to the control socket at ``path``; the raw JSON answer."""
    hint = f"is `tunlwip up --iface {path.stem}` running?"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
            sock.sendall(json.dumps(message).encode() + b"\n")
            chunks, size = [], 0
            while data := sock.recv(1 << 16):
                chunks.append(data)
                size += len(data)
                if size > MAX_RESPONSE:
                    raise _StatusError(f"the answer from {path} is too large")
        except (FileNotFoundError, ConnectionRefusedError):
            raise _StatusError(f"no gateway on {path}: {hint}") from None
        except PermissionError:
            raise _StatusError(f"permission denied on {path} (run as the gateway's user, "
                               "usually root)") from None  # fmt: skip
        except TimeoutError:
            raise _StatusError(f"the gateway on {path} did not answer within "
                               f"{timeout:g} s") from None  # fmt: skip
        except OSError as exc:
            if exc.errno == errno.ENOTSOCK:
                raise _StatusError(f"{path} is not a socket: {hint}") from None
            raise _StatusError(f"cannot talk to {path}: {exc.strerror or exc}") from None
    raw = b"".join(chunks)
    if not raw.strip():
        raise _StatusError(f"the gateway on {path} closed without answering")
    return raw


async def request_async(path: Path, message: dict[str, Any]) -> dict[str, Any]:
    """``request`` from a trio task, the answer parsed: how the supervisor asks its workers
    (the caller bounds the time). OSError or ValueError when no good answer came."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with sock:
        await sock.connect(str(path))
        await sock.send(json.dumps(message).encode() + b"\n")
        chunks, size = [], 0
        while data := await sock.recv(1 << 16):
            chunks.append(data)
            size += len(data)
            if size > MAX_RESPONSE:
                raise ValueError(f"the answer from {path} is too large")
    document = json.loads(b"".join(chunks))
    if not isinstance(document, dict) or "error" in document:
        raise ValueError(f"unexpected answer from {path}: {document!r:.200}")
    return document


# -- the table -----------------------------------------------------------------------------------


def format_status(doc: dict[str, Any]) -> str:
    """The readable form of a status answer: totals (``stats.status_lines``), drops, then the
    flows by bytes."""
    lines = [f"tunlwip {doc.get('version', '?')} on {doc.get('iface') or '?'} "
             f"(pid {doc.get('pid', '?')}), up {human_duration(doc.get('uptime', 0))}"]  # fmt: skip
    lines += status_lines(doc)
    rows = [("PROTO", "CLIENT", "TARGET", "NAME", "UP", "DOWN", "AGE")]
    for flow in doc.get("flows") or []:
        rows.append((str(flow.get("protocol", "")), str(flow.get("client", "")),
                     str(flow.get("target", "")), str(flow.get("name") or "-"),
                     human_bytes(flow.get("bytes_up", 0)), human_bytes(flow.get("bytes_down", 0)),
                     human_duration(flow.get("age", 0))))  # fmt: skip
    lines.append("")
    if len(rows) == 1:
        lines.append("no open flows")
    else:
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        right = {4, 5, 6}
        for row in rows:
            cells = [cell.rjust(w) if i in right else cell.ljust(w)
                     for i, (cell, w) in enumerate(zip(row, widths, strict=True))]  # fmt: skip
            lines.append("  ".join(cells).rstrip())
    omitted = doc.get("flows_omitted") or 0
    if omitted:
        lines.append(f"... and {omitted} more")
    return "\n".join(lines) + "\n"
