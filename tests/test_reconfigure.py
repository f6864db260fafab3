"""Gateway.reconfigure: the running gateway takes new policy without losing its flows.

Why: SIGHUP reload (issue 6) must apply DNS, QUIC/ICMP policy and timeouts in place, refuse a
broken config without changing anything, and name the settings that need a restart.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import trio
import trio.testing

from tunlwip import DnsConfig, GatewayConfig, MemoryDevice, StackConfig
from tunlwip.dialer import Keepalive
from tunlwip.errors import ConfigError
from tunlwip.gateway import Gateway
from tunlwip.udp import UdpConfig, UdpSession

from harness import on_loopback
from packets import udp_packet
from tcppeer import PacketWire

CLIENT, TARGET = "198.18.0.2", "203.0.113.9"


async def start(nursery: trio.Nursery, config: GatewayConfig) -> tuple[Gateway, MemoryDevice,
                                                                         PacketWire]:  # fmt: skip
    async def hold(session: UdpSession) -> None:
        await trio.sleep_forever()

    device = MemoryDevice()
    gateway = Gateway(device, on_loopback(config), udp_handler=hold)
    wire = PacketWire(device)
    nursery.start_soon(wire.run)
    await nursery.start(gateway.serve)
    return gateway, device, wire


async def test_quic_and_timeouts_change_in_place(nursery: trio.Nursery, tmp_path: Path) -> None:
    config = GatewayConfig(dns=DnsConfig(upstreams=("udp://127.0.0.1:9",)))
    gateway, device, wire = await start(nursery, config)
    device.inject_packet(udp_packet(CLIENT, TARGET, 1000, 8443, b"x"))  # a session, kept open
    await trio.testing.wait_all_tasks_blocked()
    assert len(gateway.udp) == 1

    new = dataclasses.replace(
        config,
        stack=StackConfig(blocked_udp_ports=(8443,), mtu=9000),
        dial_timeout=3.0,
        udp=UdpConfig(idle_timeout=20),
    )
    assert gateway.reconfigure(new) == ["stack.mtu"]
    device.inject_packet(udp_packet(CLIENT, TARGET, 1001, 8443, b"x"))  # now rejected
    device.inject_packet(udp_packet(CLIENT, TARGET, 1002, 443, b"x"))  # no longer rejected
    await trio.testing.wait_all_tasks_blocked()
    (reply,) = wire.unmatched_nowait()
    assert reply.icmp_type == 3 and reply.icmp_code == 3
    assert len(gateway.udp) == 2  # the old session survived, 443 opened one
    assert gateway.dialer.connect_timeout == 3.0 and gateway.udp.config.idle_timeout == 20
    assert gateway.config.stack.mtu == 1500  # device settings wait for a restart


async def test_dns_policy_and_a_broken_file(nursery: trio.Nursery, tmp_path: Path) -> None:
    block = tmp_path / "block"
    block.write_text("ads.test\n")
    dns_config = DnsConfig(upstreams=("udp://127.0.0.1:9",), block_files=(str(block),))
    gateway, _, _ = await start(nursery, GatewayConfig(dns=dns_config))
    assert gateway.dns is not None and gateway.dns.policy.check("ads.test").action == "block"

    other = tmp_path / "other"
    other.write_text("tracker.test\n")
    new = GatewayConfig(dns=dataclasses.replace(dns_config, block_files=(str(other),),
                                                upstreams=("tcp://127.0.0.1:9",)))  # fmt: skip
    assert gateway.reconfigure(new) == []
    assert gateway.dns.policy.check("ads.test").action == "pass"
    assert gateway.dns.policy.check("tracker.test").action == "block"
    assert gateway.dns.upstream_urls == ["tcp://127.0.0.1:9"]

    broken = GatewayConfig(dns=dataclasses.replace(dns_config, block_files=("/nonexistent",)))
    with pytest.raises(ConfigError):
        gateway.reconfigure(broken)
    assert gateway.dns.policy.check("tracker.test").action == "block"  # the old one stays
    assert gateway.dns.upstream_urls == ["tcp://127.0.0.1:9"]


async def test_liveness_settings_change_for_new_flows(nursery: trio.Nursery) -> None:
    """Idle limit and keepalive are reloaded in place: the relay sweep, lwIP's timing for
    connections accepted from now on and the dialer's for new upstream sockets."""
    gateway, _, _ = await start(nursery, GatewayConfig())
    assert gateway.stack.relay_idle_timeout is None
    assert gateway.stack.tcp_keepalive == gateway.dialer.keepalive == Keepalive(120, 15, 4)
    new = GatewayConfig(idle_timeout=600, keepalive_idle=30, keepalive_interval=5)
    assert gateway.reconfigure(new) == []
    assert gateway.stack.relay_idle_timeout == 600
    assert gateway.stack.tcp_keepalive == gateway.dialer.keepalive == Keepalive(30, 5, 4)
    assert gateway.reconfigure(GatewayConfig(keepalive_idle=None)) == []
    assert gateway.stack.tcp_keepalive is None and gateway.dialer.keepalive is None
