"""The ``tunlwip`` command: ``up`` runs a gateway on a TUN interface in the foreground.

Settings come from ``/etc/tunlwip/<iface>.toml`` (or ``--config PATH``) with the flags given on
top; ``check-config`` validates them without touching the network. SIGHUP makes ``up`` re-read
both and apply what can change while flows run (see ``reload``). ``route up|down`` sets up the
host's policy routing into the TUN (the gateway itself never touches routing).

Exit codes: 0 clean stop, 1 runtime failure, 2 usage, 77 no permission to open the TUN,
78 bad configuration.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import functools
import logging
import signal
import socket
import struct
import sys
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from . import __version__, config, control, route, service
from .config import CONFIG_DIR, ConfigProblems, Settings
from .device import TunDevice
from .device.tun import offload_names
from .errors import ConfigError, DeviceError, TunlwipError
from .flows import write_flow_log
from .gateway import Gateway
from .service import configure_logging
from .stats import stop_lines, totals_document

if TYPE_CHECKING:
    from .workers import WorkerRole

log = logging.getLogger("tunlwip")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_NOPERM, EXIT_CONFIG = 0, 1, 2, 77, 78
#: Seconds the flow log gets, after the grace period, to write the records of the flows reset.
FLOW_LOG_FLUSH_TIMEOUT = 10.0
#: File descriptors the gateway keeps besides one per flow: the TUN, epoll, the control socket
#: and its clients, DNS upstream sockets, logs.
FD_MARGIN = 256
SIOCSIFMTU, SIOCGIFFLAGS, SIOCSIFFLAGS, SIOCSIFTXQLEN, IFF_UP = 0x8922, 0x8913, 0x8914, 0x8943, 0x1

Command = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    """Subcommands set ``handler`` (and ``needs_config`` when they read the configuration)."""
    parser = argparse.ArgumentParser(prog="tunlwip", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"tunlwip {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser(
        "up",
        help="run the gateway on a TUN interface (foreground)",
        description="Run the gateway. Flags override the config file's values.",
    )
    add_arguments(up)
    up.add_argument(
        "--control-socket",
        metavar="PATH",
        help="unix socket `tunlwip status` asks (default /run/tunlwip/IFACE.sock)",
    )
    up.add_argument("--flow-log", metavar="FILE",
                    help="append a JSON line per closed flow to FILE (created 0640; a "
                         "symbolic link is refused)")  # fmt: skip
    add_worker_arguments(up)
    up.set_defaults(handler=cmd_up, needs_config=True)
    check = sub.add_parser(
        "check-config",
        help="validate the configuration (exit 0 or 78)",
        description="Validate the configuration `up` would run with.",
    )
    add_arguments(check)
    check.add_argument(
        "--print",
        dest="print_config",
        action="store_true",
        help="print the effective configuration as TOML (every key)",
    )
    check.set_defaults(handler=cmd_check_config, needs_config=True)
    control.add_status_parser(sub)
    sub.choices["status"].set_defaults(handler=control.run_status, needs_config=False)
    route.add_route_parser(sub)
    version = sub.add_parser("version", help="print the version")
    version.set_defaults(handler=cmd_version, needs_config=False)
    return parser


# -- the configuration's flags ---------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """A flag for every key that has one (``config.SCHEMA``: its help, its key path and its
    default make the flag's help). All default to None, so ``overrides_from_args`` can tell
    the flags given from the rest (a flag given replaces the file's value; a repeated flag
    such as ``--dns-upstream`` replaces the whole list)."""
    parser.add_argument(
        "--config", metavar="PATH", help=f"config file (default {CONFIG_DIR}/IFACE.toml if present)"
    )
    protect = parser.add_mutually_exclusive_group()
    for opt in config.SCHEMA:
        if opt.cli is None:
            continue
        default = opt.default_text.replace("`", "") if opt.default is not None else opt.unset
        target = protect if opt.section == "protect" else parser
        text = f"{opt.help} [{opt.path}; {default}]".replace("%", "%%")
        target.add_argument(opt.cli, dest=opt.dest, default=None, help=text, **opt.kind.argparse())


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """The hidden flags with which the supervisor of ``--workers N`` starts each worker
    (``workers.worker_arguments``): not for people."""
    parser.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-lifeline", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-dir", help=argparse.SUPPRESS)


def overrides_from_args(args: argparse.Namespace) -> dict[str, object]:
    """The flags given, as TOML-like values by key path (for ``config.load``)."""
    given = {}
    for opt in config.SCHEMA:
        value = getattr(args, opt.dest, None) if opt.cli else None
        if value is not None:
            given[opt.path] = value
    return given


# -- the device ------------------------------------------------------------------------------


def set_link_up(name: str, mtu: int, txqueuelen: int) -> None:
    """Set the TUN's MTU and queue length (see ``Settings.effective_txqueuelen``) and bring it up
    (ioctls on a throwaway socket, no `ip` needed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s, SIOCSIFMTU, struct.pack("16si20x", name.encode(), mtu))
        fcntl.ioctl(s, SIOCSIFTXQLEN, struct.pack("16si20x", name.encode(), txqueuelen))
        flags = struct.unpack_from("16sh", fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16s24x",
                                   name.encode())))[1]  # fmt: skip
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sh22x", name.encode(), flags | IFF_UP))


# -- up --------------------------------------------------------------------------------------


def check_open_files(settings: Settings) -> int:
    """Raise the open-files limit to the hard limit, log it, and warn once if it cannot hold
    a socket for every flow the limits allow (beyond it, new flows are refused: counted as
    ``refused.file_descriptors``). Returns the soft limit now in force."""
    soft, hard = service.raise_open_files_limit()
    config = settings.gateway
    needed = config.stack.max_tcp_connections + config.udp.max_sessions + FD_MARGIN
    log.info("open files: limit %d (hard %d)", soft, hard)
    if soft < needed:
        log.warning("open files: the limit %d is below the %d that tcp.max_connections (%d) + "
                    "udp.max_sessions (%d) + %d for the gateway's own need; flows beyond it "
                    "are refused. Raise the hard limit (LimitNOFILE=, ulimit -Hn) or lower "
                    "those settings", soft, needed, config.stack.max_tcp_connections,
                    config.udp.max_sessions, FD_MARGIN)  # fmt: skip
    return soft


class Reloader:
    """Re-reads the configuration the way ``up`` first read it: the same file (or default
    path) and the same command-line flags on top."""

    def __init__(self, path: str | None, overrides: Mapping[str, object]) -> None:
        self.path = path
        self.overrides = dict(overrides)

    def load(self) -> Settings:
        return config.load(self.path, self.overrides)


def _policy_summary(gateway: Gateway, sep: str = ", ") -> str:
    """ "quic reject 443,80, icmp reply": the policy in force (ICMP may have fallen back)."""
    s = gateway.config.stack
    quic = "off" if s.blocked_udp_action == "off" else \
        f"{s.blocked_udp_action} {','.join(map(str, s.blocked_udp_ports))}"  # fmt: skip
    return f"quic {quic}{sep}icmp {s.icmp_echo}"


def reload(gateway: Gateway, running: Settings, current: Settings, reloader: Reloader) -> Settings:
    """SIGHUP: load the configuration again and apply it without dropping flows (DNS lists,
    upstreams and cache, QUIC/ICMP policy, timeouts, limits, logging). Settings that need a
    restart are named in one warning; any error keeps the old configuration. Returns the
    configuration now in force (``running``: the one ``up`` started with)."""
    try:
        new = reloader.load()
        pending = [config.config_key(name) for name in gateway.reconfigure(new.gateway)]
    except ConfigError as exc:
        log.error("reload: configuration not reloaded, keeping the old one: %s", exc)
        return current
    pending += new.needs_restart(running)
    if pending:
        log.warning("reload: these settings need a restart: %s", ", ".join(pending))
    try:
        configure_logging(new.log_level, new.log_file, new.log_format)
    except OSError as exc:
        log.error("reload: logging.file: cannot open %s (%s); logging unchanged",
                  new.log_file, exc.strerror)  # fmt: skip
    dns = gateway.dns
    urls = " ".join(dns.upstream_urls) if dns is not None else ""
    dns_text = "DNS off" if dns is None else f"{len(dns.policy)} DNS rules, upstreams {urls}"
    log.info("reloaded %s: %s, %s", new.source or "(no config file)", dns_text,
             _policy_summary(gateway))  # fmt: skip
    return new


async def run_up(settings: Settings, reloader: Reloader | None = None, *,
                 control_socket: str | None = None, flow_log: str | None = None,
                 worker: WorkerRole | None = None) -> int:  # fmt: skip
    """Open the TUN, serve until SIGINT/SIGTERM (SIGHUP reloads), drain and log counters.
    ``worker``: serve the queue the supervisor of ``--workers N`` passed instead, answer on
    the worker's own control socket, serve no metrics and tell systemd nothing."""
    reloader = reloader or Reloader(str(settings.source) if settings.source else None, {})
    config = settings.gateway
    if worker is not None:
        device = worker.adopt_queue()
        control_socket = str(worker.control_socket)
    else:
        device = TunDevice.open(settings.iface, offload=settings.offload)
        try:
            set_link_up(device.name, config.stack.mtu, settings.effective_txqueuelen)
        except OSError as exc:
            await device.aclose()
            raise DeviceError(f"cannot configure {device.name}: {exc.strerror}") from exc
    log.info("%s: offloads %s", device.name, " ".join(offload_names(device.offloads)) or
             ("none" if device.vnet_header else "off (--no-offload)"))  # fmt: skip
    try:
        gateway = Gateway(device, config, protector=settings.protector())
    except BaseException:
        await device.aclose()
        raise
    running = current = settings
    start_failed = False
    gateway_scope = trio.CancelScope()  # stopped first, so the last records reach the flow log
    flow_log_done = trio.Event()

    async def serve_gateway(*, task_status: trio.TaskStatus[Gateway]) -> None:
        with gateway_scope:
            await gateway.serve(task_status=task_status)

    async def write_log(path: str, *, task_status: trio.TaskStatus[None]) -> None:
        try:
            await write_flow_log(gateway, path, task_status=task_status)
        finally:
            flow_log_done.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(serve_gateway)
        try:
            socket_path = await nursery.start(
                functools.partial(control.serve_control, gateway, control_socket,
                                  iface=device.name))  # fmt: skip
            if flow_log:
                await nursery.start(write_log, flow_log)
            if settings.metrics_listen and worker is None:
                from . import metrics  # prometheus_client: imported only when serving it

                address, port = await nursery.start(
                    functools.partial(metrics.serve_metrics, gateway, settings.metrics_listen,
                                      iface=device.name))  # fmt: skip
                host = f"[{address}]" if ":" in address else address
                log.info("metrics on http://%s:%d/metrics", host, port)
        except (OSError, TunlwipError) as exc:
            if isinstance(exc, OSError) and exc.filename and exc.strerror:
                log.error("cannot start: %s: %s", exc.filename, exc.strerror)
            else:
                log.error("cannot start: %s", exc)
            start_failed = True
            nursery.cancel_scope.cancel()
            await trio.lowlevel.checkpoint()  # raises Cancelled: leaves the nursery at once
        s = gateway.config.stack  # the gateway may have fallen back (ICMP forward -> reply)
        keep = config.keepalive
        log.info("%s: iface %s mtu %d gateway %s %s clients %s protect %s dial-before-accept %s "
                 "tcp-idle %s keepalive %s udp-idle %gs %s config %s",
                 "up" if worker is None else "serving", device.name, s.mtu,
                 s.ipv4_address, s.ipv6_address, ",".join(map(str, s.client_networks)) or "any",
                 gateway.protect_mode, "on" if config.dial_before_accept else "off",
                 "off" if config.idle_timeout is None else f"{config.idle_timeout:g}s",
                 f"{keep.idle}s/{keep.interval}sx{keep.count}" if keep else "off",
                 config.udp.idle_timeout, _policy_summary(gateway, " "),
                 settings.source or "none")  # fmt: skip
        log.info("control socket %s%s", socket_path,
                 f"; flow log {flow_log}" if flow_log else "")  # fmt: skip
        if gateway.dns is not None:
            log.info("dns: hijack %s upstreams %s rules %d blocked-answer %s encrypted %s",
                     config.dns.hijack, " ".join(gateway.dns.upstream_urls) or "none",
                     len(gateway.dns.policy), config.dns.blocked_answer,
                     "rejected" if config.dns.reject_encrypted else "forwarded")  # fmt: skip
        if worker is None:
            service.ready(f"serving {device.name}")
        else:
            nursery.start_soon(worker.watch_supervisor)
        if (interval := service.watchdog_interval()) is not None:
            log.info("systemd watchdog: pinging every %g s", interval / 2)
            nursery.start_soon(service.watchdog, interval)
        stop = (signal.SIGINT, signal.SIGTERM)
        with trio.open_signal_receiver(*stop, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    service.reloading()
                    current = reload(gateway, running, current, reloader)
                    service.ready(f"serving {device.name}")
                    continue
                flows = gateway.statistics().active_flows
                log.info("%s: stopping, giving %d flows %g s", signal.Signals(signum).name,
                         flows, current.grace)  # fmt: skip
                service.stopping(f"stopping: {flows} flows get {current.grace:g} s")
                break
        drained = await gateway.drain(current.grace)
        final = gateway.statistics()
        for line in stop_lines(totals_document(final), drained=drained):
            log.info("%s", line)
        if worker is not None:
            worker.write_totals(totals_document(final), final.stack.dropped, drained)
        # Stop the gateway alone first: flows still open are reset now and their records
        # (close reason "stopped") are written before the flow log closes at the end of its
        # subscription; a stuck disk gets FLOW_LOG_FLUSH_TIMEOUT, not forever.
        gateway_scope.cancel()
        if flow_log:
            with trio.move_on_after(FLOW_LOG_FLUSH_TIMEOUT) as flush:
                await flow_log_done.wait()
            if flush.cancelled_caught:
                log.warning("flow log: last records not written within %g s",
                            FLOW_LOG_FLUSH_TIMEOUT)  # fmt: skip
        nursery.cancel_scope.cancel()
    await device.aclose()
    return EXIT_FAILURE if start_failed else EXIT_OK


def cmd_up(args: argparse.Namespace) -> int:
    """``up``: one gateway, the supervisor of ``--workers N``, or one of its workers."""
    try:
        role = _worker_role(args)
    except DeviceError as exc:
        print(f"tunlwip up: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if role is not None:
        service.set_log_tag(f"worker {role.index}")
    overrides = overrides_from_args(args)
    # Until the configuration is loaded: stderr, at the level given on the command line.
    configure_logging(str(overrides.get("logging.level", "info")),
                      fmt=str(overrides.get("logging.format", "text")))  # fmt: skip
    try:
        settings = config.load(args.config, overrides)
    except ConfigError as exc:
        log.error("bad configuration: %s", exc)
        return EXIT_CONFIG
    try:
        configure_logging(settings.log_level, settings.log_file, settings.log_format)
    except OSError as exc:
        log.error("bad configuration: logging.file: cannot open %s: %s", settings.log_file,
                  exc.strerror)  # fmt: skip
        return EXIT_CONFIG
    reloader = Reloader(args.config, overrides)
    if settings.workers > 1 and role is None:
        return _run_supervisor(args, settings, reloader)
    check_open_files(settings)
    return _exit_code_of(functools.partial(run_up, settings, reloader,
                                           control_socket=args.control_socket,
                                           flow_log=args.flow_log, worker=role))  # fmt: skip


def _worker_role(args: argparse.Namespace) -> WorkerRole | None:
    if getattr(args, "worker_fd", None) is None:
        return None
    from .workers import WorkerRole, check_worker_fd

    queue = check_worker_fd(args.worker_fd, "--worker-fd")
    lifeline = check_worker_fd(args.worker_lifeline, "--worker-lifeline")
    return WorkerRole(args.worker_index or 0, queue, lifeline, Path(args.worker_dir or "."))


def _run_supervisor(args: argparse.Namespace, settings: Settings, reloader: Reloader) -> int:
    """``up --workers N`` (N > 1): the supervisor (workers.py); exit codes as ``up``'s."""
    from .workers import Supervisor

    supervisor = Supervisor(settings, reloader, getattr(args, "raw_argv", ["up"]),
                            control_socket=args.control_socket)  # fmt: skip
    return _exit_code_of(supervisor.run)


def _exit_code_of(main: Callable[[], Awaitable[int]]) -> int:
    """Run ``up``'s event loop (a gateway's, or the supervisor's) and turn what ends it into
    ``up``'s exit code, with one log line for our own errors instead of a traceback."""
    try:
        try:
            code: int = trio.run(main)
            return code
        except BaseExceptionGroup as group:
            if (own := _own_error(group)) is None:
                raise
            raise own from own.__cause__  # keeps the cause: an OSError with the errno
    except DeviceError as exc:
        log.error("%s", exc)
        cause = exc.__cause__
        if isinstance(cause, OSError) and cause.errno in (errno.EPERM, errno.EACCES):
            return EXIT_NOPERM
        return EXIT_FAILURE
    except ConfigError as exc:
        log.error("bad configuration: %s", exc)
        return EXIT_CONFIG
    except TunlwipError as exc:  # e.g. HostAddressError: one line, not a traceback
        log.error("%s", exc)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_OK


def _own_error(group: BaseExceptionGroup[BaseException]) -> TunlwipError | None:
    """The first error in ``group`` if all are tunlwip's own: each trio nursery a task's error
    passes wraps it in a group, which would print as nested tracebacks, not one line."""
    ours, rest = group.split(TunlwipError)
    exc: BaseException | None = ours
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc if rest is None and isinstance(exc, TunlwipError) else None


# -- check-config, version -------------------------------------------------------------------


def cmd_check_config(args: argparse.Namespace) -> int:
    """Exit 0 if ``up`` would accept the configuration, else 78 with one line per problem."""
    try:
        settings = config.load(args.config, overrides_from_args(args))
    except ConfigError as exc:
        problems = exc.problems if isinstance(exc, ConfigProblems) else [str(exc)]
        for problem in problems:
            print(f"tunlwip check-config: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    if args.print_config:
        sys.stdout.write(settings.to_toml())
    else:
        source = settings.source or "built-in defaults"
        print(f"configuration OK ({source}, interface {settings.iface})")
    return EXIT_OK


def cmd_version(args: argparse.Namespace) -> int:
    print(f"tunlwip {__version__}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.raw_argv = list(sys.argv[1:] if argv is None else argv)  # what workers repeat
    if getattr(args, "needs_config", False) and args.config is None \
            and getattr(args, config.OPTIONS["device.name"].dest) is None:  # fmt: skip
        parser.error(f"{args.command}: give --iface IFACE (reads {CONFIG_DIR}/IFACE.toml "
                     "if present) or --config PATH")  # fmt: skip
    handler: Command = args.handler
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
