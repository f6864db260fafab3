"""``Settings``: what ``tunlwip up`` runs with, the gateway's structs plus the command's own keys.

Theory of operation
-------------------
The command's own keys (the TUN's name, queue length and offload, the protection, the
metrics endpoint, logging, the grace period) are fields of ``Settings``, declared like the
gateway's (``fields.setting``), so ``SCHEMA`` (every key, in file order: ``schema.collect``)
covers both, and ``--print`` (``to_toml``), the loader (``from_values``) and the reload's
"needs a restart" list all read the same declarations.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..dialer import Protector, bind_interface, fwmark, no_protection
from ..service import LOG_FORMATS
from .fields import check_fields, nested_struct, setting, spec_of
from .kinds import (
    Boolean,
    Choice,
    FilePath,
    IfName,
    Integer,
    Listen,
    LogLevel,
    Mark,
    Number,
    OffOr,
    show,
)
from .routes import Route, routes_toml
from .schema import SECTIONS, Option, collect
from .sections import DnsConfig, GatewayConfig

if TYPE_CHECKING:
    from .dns_routes import DnsRoute

__all__ = ["OPTIONS", "SCHEMA", "Settings", "config_key"]


@dataclasses.dataclass(frozen=True)
class Settings:
    """A validated configuration: what ``tunlwip up`` runs with."""

    iface: str = setting("device.name", IfName(), cli="--iface", unset="the `--iface` value",
                         restart=True, help="TUN interface to create or attach to")  # fmt: skip
    gateway: GatewayConfig = dataclasses.field(default_factory=GatewayConfig)
    #: As configured; None: automatic (see ``effective_txqueuelen``).
    txqueuelen: int | None = setting(
        "device.txqueuelen", Integer(1, 1_000_000), None, cli="--txqueuelen", restart=True,
        unset="auto: 16 MiB of MTU-sized packets, 500 to 10000",
        help="packets the kernel queues for the gateway to read before it drops")  # fmt: skip
    offload: bool = setting(
        "device.offload", Boolean(), True, cli="--offload", restart=True,
        help="open the TUN with a virtio-net header: a connection's TCP segments reach the "
             "kernel in one write (GSO), checksums left to it, and uploads arrive as offloaded "
             "super-segments (TSO, USO); off, one packet per read and write as sent (for "
             "captures on the TUN)")  # fmt: skip
    workers: int = setting(
        "device.workers", Integer(1, 64), 1, cli="--workers", restart=True,
        help="worker processes, each reading one queue of the TUN (IFF_MULTI_QUEUE) with its "
             "own lwIP, relay and DNS proxy, under one supervisor; 1: one process, no "
             "supervisor")  # fmt: skip
    #: SO_MARK of the gateway's sockets; at most one of ``fwmark`` and ``bind_interface``.
    fwmark: int | None = setting(
        "protect.fwmark", Mark(), None, cli="--fwmark", unset="none", restart=True,
        help="SO_MARK for the gateway's sockets (pair with `ip rule add not fwmark N table "
             "T`)")  # fmt: skip
    bind_interface: str | None = setting(
        "protect.interface", IfName(), None, cli="--bind-interface", unset="none", restart=True,
        help="SO_BINDTODEVICE: bind the gateway's sockets to this uplink")  # fmt: skip
    metrics_listen: str | None = setting(
        "metrics.listen", Listen(), None, cli="--metrics-listen", unset="off", restart=True,
        help="serve the Prometheus text format at `http://ADDR:PORT/metrics` (IPv6: "
             "`[ADDR]:PORT`)")  # fmt: skip
    log_level: str = setting(
        "logging.level", LogLevel(), "info", cli="--log-level",
        help="log level, by name or number (0: critical only .. 4 and 5: debug)")  # fmt: skip
    log_file: str | None = setting("logging.file", FilePath(readable=False), None,
                                   cli="--log-file", unset="stderr",
                                   help="append the log to this file")  # fmt: skip
    log_format: str = setting(
        "logging.format", Choice(*LOG_FORMATS), "text", cli="--log-format",
        help="one line of text per record, or one JSON object per line (time, level, logger, "
             "message, exception)")  # fmt: skip
    grace: float = setting("limits.grace", Number(minimum=0), 5.0, cli="--grace",
                           help="seconds open flows get on SIGINT/SIGTERM")  # fmt: skip
    #: The file read, or None (built-in defaults and flags only).
    source: Path | None = None

    def __post_init__(self) -> None:
        check_fields(self)

    @classmethod
    def from_values(cls, values: Mapping[str, Any], source: Path | None,
                    routes: tuple[Route, ...] = (),
                    dns_routes: tuple[DnsRoute, ...] = ()) -> Settings:  # fmt: skip
        """The structs filled from checked values by key path (every key present), with the
        ``[[route]]`` and ``[[dns.route]]`` tables."""

        def fill(struct: type[Any], **given: Any) -> Any:
            if struct is GatewayConfig:
                given["routes"] = routes
            if struct is DnsConfig:
                given["routes"] = dns_routes
            for field in dataclasses.fields(struct):
                if (spec := spec_of(field)) is not None:
                    given[field.name] = values[spec.path]
                elif field.name not in given and (nested := nested_struct(field)) is not None:
                    given[field.name] = fill(nested)
            return struct(**given)

        settings: Settings = fill(cls, source=source)
        return settings

    @property
    def effective_txqueuelen(self) -> int:
        """The TUN's queue length: as set, or 16 MiB worth of MTU-sized packets (500-10000).
        Every packet dropped there costs a client a retransmission timeout, and many parallel
        flows overflow the kernel's default of 500; the byte budget bounds kernel memory."""
        if self.txqueuelen is not None:
            return self.txqueuelen
        return min(10_000, max(500, (16 << 20) // self.gateway.stack.mtu))

    @property
    def protect(self) -> tuple[int | None, str | None]:
        """(fwmark, interface): at most one is set."""
        return self.fwmark, self.bind_interface

    def protector(self) -> Protector:
        if self.fwmark is not None:
            return fwmark(self.fwmark)
        if self.bind_interface is not None:
            return bind_interface(self.bind_interface)
        return no_protection

    def value(self, opt: Option) -> Any:
        """The effective value of one key (None: not set)."""
        return functools.reduce(getattr, opt.attr.split("."), self)

    def needs_restart(self, running: Settings) -> list[str]:
        """The command's own keys that differ from ``running`` and only take effect when
        ``up`` starts again (the gateway names its own: ``Gateway.reconfigure``)."""
        return [opt.path for opt in SCHEMA
                if opt.spec.restart and self.value(opt) != running.value(opt)]  # fmt: skip

    def to_toml(self) -> str:
        """Every key, defaults included; ``load`` of this text gives the same Settings."""
        lines = [f"# tunlwip: effective configuration (from {self.source or 'built-in defaults'}"
                 " and the command line)"]  # fmt: skip
        for section, about in SECTIONS.items():
            lines += ["", f"[{section}]  # {about}"]
            for opt in SCHEMA:
                if opt.section != section:
                    continue
                value = self.value(opt)
                if value is None and isinstance(opt.kind, OffOr):  # off, even if on by default
                    lines.append(f"{opt.key} = {show(OffOr.OFF)}")
                elif value is None:
                    lines.append(f"# {opt.key}: not set ({opt.unset})")
                else:
                    lines.append(f"{opt.key} = {opt.kind.dump(value)}")
                    if getattr(value, "password", None) is not None:
                        lines[-1] += "  # password not shown"
        lines += routes_toml(self.gateway.routes)
        if self.gateway.dns.routes:
            from .dns_routes import dns_routes_toml  # split DNS: only when configured

            lines += dns_routes_toml(self.gateway.dns.routes)
        return "\n".join(lines) + "\n"


#: Every key, in the order of the file, ``--print``, ``--help`` and the docs.
SCHEMA: tuple[Option, ...] = collect(Settings)
OPTIONS: dict[str, Option] = {opt.path: opt for opt in SCHEMA}


def config_key(field: str) -> str:
    """The key path of a GatewayConfig field ("stack.mtu" -> "device.mtu"), for messages;
    anything after the field name (" (to forward)") is kept."""
    name, sep, rest = field.partition(" ")
    for opt in SCHEMA:
        if opt.field == name:
            return opt.path + sep + rest
    return field
