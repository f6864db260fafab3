"""The ``tunlwip`` command: ``up`` runs a gateway on a TUN interface in the foreground.

Exit codes: 0 clean stop, 1 runtime failure, 2 usage, 77 no permission to open the TUN,
78 bad configuration.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import ipaddress
import logging
import signal
import socket
import struct
import sys

import trio

from . import __version__
from .device import TunDevice
from .dialer import Protector, bind_interface, fwmark, no_protection
from .dns.proxy import DnsConfig
from .errors import ConfigError, DeviceError
from .gateway import Gateway, GatewayConfig
from .stack import StackConfig
from .udp import UdpConfig

log = logging.getLogger("tunlwip")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_NOPERM, EXIT_CONFIG = 0, 1, 2, 77, 78
SIOCSIFMTU, SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8922, 0x8913, 0x8914, 0x1
LOG_LEVELS = ["debug", "info", "warning", "error", "critical"]
DEFAULT_CLIENTS = ("198.18.0.0/15", "fd00:18::/64")


def _int_auto(text: str) -> int:
    return int(text, 0)


def _port_list(text: str) -> tuple[int, ...]:
    try:
        ports = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated port list: {text!r}") from None
    if not ports or any(not 1 <= p <= 65535 for p in ports):
        raise argparse.ArgumentTypeError(f"ports must be 1-65535: {text!r}")
    return ports


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunlwip", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"tunlwip {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="run the gateway on a TUN interface (foreground)")
    up.add_argument("--iface", required=True, help="TUN interface to create or attach to")
    up.add_argument("--mtu", type=int, default=1500, help="interface MTU, 576-65520 (1500)")
    protect = up.add_mutually_exclusive_group()
    protect.add_argument("--fwmark", type=_int_auto, help="SO_MARK for the gateway's sockets")
    protect.add_argument("--bind-interface", metavar="IF", help="SO_BINDTODEVICE uplink")
    up.add_argument("--gateway4", default="198.18.0.1", help="lwIP's IPv4 address (198.18.0.1)")
    up.add_argument("--gateway6", default="fd00:18::1", help="lwIP's IPv6 address (fd00:18::1)")
    up.add_argument(
        "--client-net",
        action="append",
        metavar="CIDR",
        help="client networks (repeatable; default 198.18.0.0/15, fd00:18::/64)",
    )
    up.add_argument("--dial-timeout", type=float, default=30.0, help="upstream connect timeout")
    up.add_argument("--idle-timeout", type=float, default=300.0, help="idle TCP flow timeout")
    up.add_argument(
        "--no-dial-before-accept",
        action="store_true",
        help="complete client handshakes before the upstream answered",
    )
    up.add_argument(
        "--unreachable",
        choices=["icmp", "rst"],
        default="icmp",
        help="answer for unreachable destinations (icmp)",
    )
    up.add_argument(
        "--udp-idle-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="close UDP sessions idle this long in both directions (60)",
    )
    up.add_argument(
        "--max-udp-sessions",
        type=int,
        default=4096,
        metavar="N",
        help="evict the least recently active UDP session beyond N (4096)",
    )
    up.add_argument(
        "--quic",
        choices=["reject", "drop", "off"],
        default="reject",
        help="UDP to the QUIC ports: ICMP port unreachable so apps fall back to TCP "
        "at once, silent drop, or forward (reject)",
    )
    up.add_argument(
        "--quic-ports",
        type=_port_list,
        default=(443, 80),
        metavar="PORTS",
        help="comma-separated UDP ports --quic applies to (443,80)",
    )
    up.add_argument(
        "--icmp",
        choices=["reply", "forward", "off"],
        default="reply",
        help="echo requests to any address: answer here, forward with ping sockets "
        "(needs net.ipv4.ping_group_range), or ignore (reply)",
    )
    up.add_argument(
        "--dns-upstream",
        action="append",
        metavar="URL",
        help="DNS upstream, tried in order (repeatable): udp://IP[:port], tcp://IP[:port], "
        "tls://IP[:port][#name], https://HOST[:port]/path[#IP] (default: /etc/resolv.conf)",
    )
    up.add_argument("--dns-block", action="append", metavar="FILE", default=[],
                    help="block list: domains or hosts format (repeatable)")  # fmt: skip
    up.add_argument("--dns-allow", action="append", metavar="FILE", default=[],
                    help="allow list, overrides block lists (repeatable)")  # fmt: skip
    up.add_argument(
        "--dns-blocked-answer",
        choices=["nxdomain", "null", "refused"],
        default="nxdomain",
        help="answer for blocked names (nxdomain)",
    )
    up.add_argument(
        "--dns-hijack",
        choices=["all", "gateway", "off"],
        default="all",
        help="port-53 traffic the DNS proxy answers: to any address, to the gateway's "
        "address only, or none (forwarded as is) (all)",
    )
    up.add_argument("--dns-ca-file", metavar="FILE", help="CA bundle for tls:// and https://")
    up.add_argument("--grace", type=float, default=5.0, help="seconds flows get on SIGTERM")
    up.add_argument(
        "--log-level",
        default="info",
        type=str.lower,
        choices=LOG_LEVELS + [str(i) for i in range(6)],
    )
    sub.add_parser("version", help="print the version")
    return parser  # fmt: skip


def _configure_logging(level: str) -> None:
    if level.isdigit():  # the seed's numeric levels: 0 silent .. 5 debug
        level = ["critical", "error", "warning", "info", "debug", "debug"][int(level)]
    logging.basicConfig(level=level.upper(), format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)  # fmt: skip


def set_link_up(name: str, mtu: int) -> None:
    """Set the TUN's MTU and bring it up (ioctls on a throwaway socket, no `ip` needed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s, SIOCSIFMTU, struct.pack("16si20x", name.encode(), mtu))
        flags = struct.unpack_from("16sh", fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16s24x",
                                   name.encode())))[1]  # fmt: skip
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sh22x", name.encode(), flags | IFF_UP))


def _config_from_args(args: argparse.Namespace) -> tuple[GatewayConfig, Protector]:
    try:
        nets = tuple(ipaddress.ip_network(n, strict=False)
                     for n in (args.client_net or DEFAULT_CLIENTS))  # fmt: skip
        gw4 = ipaddress.IPv4Address(args.gateway4)
        gw6 = ipaddress.IPv6Address(args.gateway6)
        stack = StackConfig(mtu=args.mtu, ipv4_address=gw4, ipv6_address=gw6,
                            client_networks=nets, blocked_udp_ports=args.quic_ports,
                            blocked_udp_action=args.quic, icmp_echo=args.icmp)  # fmt: skip
        udp = UdpConfig(idle_timeout=args.udp_idle_timeout, max_sessions=args.max_udp_sessions,
                        sweep_interval=min(30.0, args.udp_idle_timeout / 2))  # fmt: skip
        dns = DnsConfig(upstreams=tuple(args.dns_upstream or ()),
                        block_files=tuple(args.dns_block), allow_files=tuple(args.dns_allow),
                        blocked_answer=args.dns_blocked_answer, hijack=args.dns_hijack,
                        ca_file=args.dns_ca_file)  # fmt: skip
        config = GatewayConfig(stack=stack, dial_timeout=args.dial_timeout,
                               idle_timeout=args.idle_timeout,
                               dial_before_accept=not args.no_dial_before_accept,
                               unreachable_reply=args.unreachable, udp=udp, dns=dns)  # fmt: skip
    except ValueError as exc:
        raise _ConfigProblem(str(exc)) from exc
    protector: Protector = no_protection
    if args.fwmark is not None:
        if not 0 < args.fwmark < 2**32:
            raise _ConfigProblem("--fwmark must be between 1 and 2^32-1")
        protector = fwmark(args.fwmark)
    elif args.bind_interface:
        protector = bind_interface(args.bind_interface)
    return config, protector


class _ConfigProblem(Exception):
    pass


async def run_up(args: argparse.Namespace, config: GatewayConfig, protector: Protector) -> int:
    device = TunDevice.open(args.iface)
    try:
        set_link_up(device.name, config.stack.mtu)
    except OSError as exc:
        await device.aclose()
        raise DeviceError(f"cannot configure {device.name}: {exc.strerror}") from exc
    try:
        gateway = Gateway(device, config, protector=protector)
    except BaseException:  # a bad DNS upstream URL or list file (ConfigError), ...
        await device.aclose()
        raise
    async with trio.open_nursery() as nursery:
        await nursery.start(gateway.serve)
        s = gateway.config.stack  # the gateway may have fallen back (ICMP forward -> reply)
        quic = (
            "off"
            if s.blocked_udp_action == "off"
            else f"{s.blocked_udp_action} {','.join(map(str, s.blocked_udp_ports))}"
        )
        log.info("up: iface %s mtu %d gateway %s %s clients %s protect %s dial-before-accept %s "
                 "udp-idle %gs quic %s icmp %s", device.name, s.mtu, s.ipv4_address,
                 s.ipv6_address, ",".join(map(str, s.client_networks)), gateway.protect_mode,
                 "on" if config.dial_before_accept else "off", config.udp.idle_timeout, quic,
                 s.icmp_echo)  # fmt: skip
        if gateway.dns is not None:
            log.info("dns: hijack %s upstreams %s rules %d blocked-answer %s",
                     config.dns.hijack, " ".join(gateway.dns.upstream_urls) or "none",
                     len(gateway.dns.policy), config.dns.blocked_answer)  # fmt: skip
        stop = (signal.SIGINT, signal.SIGTERM)
        with trio.open_signal_receiver(*stop, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    _reload(gateway)
                    continue
                log.info("%s: stopping, giving %d flows %.0f s", signal.Signals(signum).name,
                         gateway.statistics().active_flows, args.grace)  # fmt: skip
                break
        drained = await gateway.drain(args.grace)
        stats = gateway.statistics()
        c, u = stats.stack.counters, stats.udp
        log.info("stopped%s: dials ok %d refused %d failed %d; udp sessions %d expired %d "
                 "evicted %d; quic rejected %d; echo replied %d forwarded %d; packets in %d "
                 "out %d; drops %s", "" if drained else " (grace period over, flows reset)",
                 stats.dials_ok, stats.dials_refused, stats.dials_failed, u.opened, u.expired,
                 u.evicted, c["udp_port_rejected"], c["icmp_echo_replied"],
                 c["icmp_echo_forwarded"], c["packets_in"], c["packets_out"],
                 stats.stack.dropped or "none")  # fmt: skip
        if stats.dns is not None:
            d = stats.dns
            log.info("dns: queries %d blocked %d overridden %d cached %d forwarded %d failed %d "
                     "(timeouts %d) truncated %d malformed %d", d.queries, d.blocked,
                     d.overridden, d.cache_hits, d.forwarded, d.upstream_failures, d.timeouts,
                     d.truncated, d.malformed + d.formerr)  # fmt: skip
        nursery.cancel_scope.cancel()
    await device.aclose()
    return EXIT_OK


def _reload(gateway: Gateway) -> None:
    """SIGHUP: re-read the DNS block and allow lists; a bad file keeps the old policy."""
    if gateway.dns is None:
        log.info("SIGHUP: nothing to reload (DNS proxy off)")
        return
    try:
        gateway.dns.reload()
    except ConfigError as exc:
        log.error("SIGHUP: DNS policy not reloaded, keeping the old one: %s", exc)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "version":
        print(f"tunlwip {__version__}")
        return EXIT_OK
    _configure_logging(args.log_level)
    try:
        config, protector = _config_from_args(args)
    except _ConfigProblem as exc:
        log.error("bad configuration: %s", exc)
        return EXIT_CONFIG
    try:
        return trio.run(run_up, args, config, protector)
    except DeviceError as exc:
        log.error("%s", exc)
        cause = exc.__cause__
        if isinstance(cause, OSError) and cause.errno in (errno.EPERM, errno.EACCES):
            return EXIT_NOPERM
        return EXIT_FAILURE
    except ConfigError as exc:
        log.error("bad configuration: %s", exc)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
