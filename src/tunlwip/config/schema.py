"""The configuration file's layout: its sections, the order of their keys, and ``collect``,
which finds every key on the structs.

Theory of operation
-------------------
The keys are declared on the struct fields (``fields.setting``). The file groups them by
section, and a section takes keys from several structs (``[tcp]``: the gateway's dial and
liveness settings, the stack's connection limits), so the order in which ``--print``,
``--help`` and docs/configuration.md list them is written here, once, as ``KEYS``.
``collect`` walks a root struct (``Settings``) and its nested structs and returns one
``Option`` per key in that order; it fails at import if a key is declared on a field but
missing from ``KEYS``, or the other way round.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .fields import STRUCT_DEFAULT, Setting, nested_struct, spec_of
from .kinds import Kind

__all__ = ["KEYS", "SECTIONS", "Option", "collect"]

SECTIONS: dict[str, str] = {
    "device": "the TUN interface and lwIP's side of it",
    "protect": "how the gateway's own sockets are kept out of the TUN",
    "tcp": "TCP flows",
    "udp": "UDP sessions",
    "quic": "UDP to the QUIC ports",
    "icmp": "ICMP echo (ping)",
    "dns": "the built-in DNS proxy",
    "egress": "where flows leave: the catch-all after the [[route]] tables",
    "metrics": "the Prometheus endpoint",
    "logging": "log output",
    "limits": "shutdown",
}

#: Every key of every section, in the order the file, the flags and the docs list them.
KEYS: dict[str, tuple[str, ...]] = {
    "device": ("name", "mtu", "txqueuelen", "ipv4", "ipv6", "client_networks", "offload",
               "verify_checksums", "forward_local_destinations", "workers"),
    "protect": ("fwmark", "interface"),
    "tcp": ("dial_timeout", "idle_timeout", "keepalive_idle", "keepalive_interval",
            "keepalive_count", "dial_before_accept", "unreachable", "max_pending_dials",
            "max_pending_dials_per_client", "claim_timeout", "max_connections", "max_half_open",
            "max_connections_per_client", "max_buffered_bytes",
            "max_buffered_bytes_per_connection"),
    "udp": ("idle_timeout", "dns_idle_timeout", "sweep_interval", "max_sessions", "when_full",
            "max_sessions_per_client", "queue_datagrams"),
    "quic": ("mode", "ports"),
    "icmp": ("echo", "idle_timeout"),
    "dns": ("hijack", "upstreams", "via", "block_lists", "allow_lists", "blocked_answer",
            "overrides", "ca_file", "query_timeout", "attempt_timeout", "tcp_idle_timeout",
            "tcp_query_timeout", "reject_encrypted", "cache_size", "min_ttl", "max_ttl",
            "max_negative_ttl", "max_in_flight", "max_in_flight_per_client"),
    "egress": ("proxy", "handshake_timeout", "sniff_timeout"),
    "metrics": ("listen",),
    "logging": ("level", "file", "format"),
    "limits": ("grace",),
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Option:
    """One configuration key, as found on the structs."""

    spec: Setting
    #: The attribute path from the root struct ("gateway.stack.mtu", "iface").
    attr: str
    #: The file's default (None: not set; see ``unset``).
    default: Any

    @property
    def path(self) -> str:
        return self.spec.path

    @property
    def kind(self) -> Kind:
        return self.spec.kind

    @property
    def help(self) -> str:
        return self.spec.help

    @property
    def cli(self) -> str | None:
        return self.spec.cli

    @property
    def unset(self) -> str:
        return self.spec.unset

    @property
    def section(self) -> str:
        return self.spec.section

    @property
    def key(self) -> str:
        return self.spec.key

    @property
    def field(self) -> str | None:
        """Where it lives in GatewayConfig ("stack.mtu"); None for the command's own settings
        (interface name, protection, logging, grace)."""
        owner, _, rest = self.attr.partition(".")
        return rest if owner == "gateway" else None

    @property
    def dest(self) -> str:
        """The argparse destination of the flag."""
        return "cfg_" + self.path.replace(".", "__")

    @property
    def default_text(self) -> str:
        """The default as docs/configuration.md shows it."""
        return f"`{self.kind.dump(self.default)}`" if self.default is not None else self.unset


def _walk(struct: type, prefix: str) -> list[Option]:
    """The options of ``struct``'s fields, descending into nested structs."""
    found = []
    for field in dataclasses.fields(struct):
        spec = spec_of(field)
        if spec is not None:
            default = spec.file_default
            if default is STRUCT_DEFAULT:
                factory = field.default_factory
                default = factory() if factory is not dataclasses.MISSING else field.default
            found.append(Option(spec, prefix + field.name,
                                None if default is dataclasses.MISSING else default))  # fmt: skip
        elif (nested := nested_struct(field)) is not None:
            found += _walk(nested, f"{prefix}{field.name}.")
    return found


def collect(root: type) -> tuple[Option, ...]:
    """Every key declared on ``root`` and its nested structs, in ``KEYS`` order."""
    walked = _walk(root, "")
    found = {opt.path: opt for opt in walked}
    order = [f"{section}.{key}" for section in SECTIONS for key in KEYS[section]]
    if len(found) != len(walked) or sorted(found) != sorted(order):
        missing, extra = set(order) - set(found), set(found) - set(order)
        raise AssertionError(f"KEYS and the struct fields disagree: not declared {missing}, "
                             f"not in KEYS {extra}")  # fmt: skip
    return tuple(found[path] for path in order)
