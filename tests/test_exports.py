"""The public API, pinned: what docs/embedding.md tells embedders to import, and the error roots.

Why: the seams inside tunlwip move (binding, gateway, config and DNS modules are split and
merged), and a name an embedder imports must not disappear or wander with them. A change to
these lists is a change to the public API: update docs/embedding.md with it.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from types import ModuleType

import pytest

import tunlwip
from tunlwip.errors import TunlwipError

PACKAGE_EXPORTS = {
    "CustomVia",
    "ProxyError",
    "Route",
    "RouteStatistics",
    "RouteTable",
    "parse_via",
    "CallbackDevice",
    "ConfigError",
    "DeviceError",
    "DnsConfig",
    "Endpoint",
    "FdPacketDevice",
    "FlowInfo",
    "FlowRecord",
    "Gateway",
    "GatewayConfig",
    "GatewayStatistics",
    "HostAddressError",
    "LwipError",
    "LwipStack",
    "LwipTcpStream",
    "MemoryDevice",
    "PacketDevice",
    "ProtectError",
    "RefusedCounters",
    "StackConfig",
    "StackHooks",
    "StackStatistics",
    "TunDevice",
    "TunlwipError",
    "UdpConfig",
    "UdpSession",
}

#: Modules whose ``__all__`` is their public face.
MODULE_ALL = {
    "tunlwip.device": {
        "CallbackDevice",
        "FdPacketDevice",
        "MemoryDevice",
        "PacketDevice",
        "TunDevice",
    },
    "tunlwip.dns.upstreams": {
        "HttpsUpstream",
        "TcpUpstream",
        "TlsUpstream",
        "UdpUpstream",
        "Upstream",
        "UpstreamError",
        "UpstreamSet",
        "parse_upstream",
    },
}

#: Names docs/embedding.md (and the examples) import from a module other than ``tunlwip``.
DOCUMENTED_IN_MODULES = {
    "tunlwip.dialer": {"Dialer", "Protector", "bind_interface", "callback", "fwmark",
                       "no_protection"},
    "tunlwip.egress": {"Direct", "Drop", "HttpProxy", "Reject", "Socks5Proxy", "parse_via"},
    "tunlwip.egress.custom": {"CustomVia", "TcpOpener"},
    "tunlwip.egress.routes": {"RouteDecision", "RouteTable", "route_table"},
    "tunlwip.forward": {"SpliceResult", "splice"},
    "tunlwip.gateway": {"Gateway", "GatewayConfig", "GatewayStatistics", "RefusedCounters"},
    "tunlwip.hostaddrs": {"HostAddresses"},
    "tunlwip.shares": {"share_of"},
}  # fmt: skip

#: Exceptions that never leave their module (control flow inside one parser).
PRIVATE_EXCEPTIONS = {"tunlwip.sniff._Short"}


def _public_names(module: ModuleType) -> set[str]:
    return {
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }


def test_the_package_exports_exactly_its_all() -> None:
    assert set(tunlwip.__all__) == PACKAGE_EXPORTS
    assert len(tunlwip.__all__) == len(PACKAGE_EXPORTS)
    assert _public_names(tunlwip) == PACKAGE_EXPORTS
    assert tunlwip.__version__


@pytest.mark.parametrize(("module_name", "expected"), sorted(MODULE_ALL.items()))
def test_module_all(module_name: str, expected: set[str]) -> None:
    module = importlib.import_module(module_name)
    assert set(module.__all__) == expected
    for name in expected:
        assert getattr(module, name) is not None


@pytest.mark.parametrize(("module_name", "names"), sorted(DOCUMENTED_IN_MODULES.items()))
def test_documented_module_names_exist(module_name: str, names: set[str]) -> None:
    module = importlib.import_module(module_name)
    missing = {name for name in names if not hasattr(module, name)}
    assert not missing, f"{module_name} lost {sorted(missing)}"


def test_package_names_are_the_same_objects_as_in_their_modules() -> None:
    from tunlwip import device, gateway

    for name in MODULE_ALL["tunlwip.device"]:
        assert getattr(tunlwip, name) is getattr(device, name)
    for name in DOCUMENTED_IN_MODULES["tunlwip.gateway"]:
        assert getattr(tunlwip, name) is getattr(gateway, name)


def _all_modules() -> list[ModuleType]:
    modules = [tunlwip]
    for info in pkgutil.walk_packages(tunlwip.__path__, "tunlwip."):
        if info.name != "tunlwip.__main__":  # runs the CLI when imported
            modules.append(importlib.import_module(info.name))
    return modules


def test_every_exception_tunlwip_raises_on_purpose_derives_from_tunlwip_error() -> None:
    """errors.py's promise (one root), across every module."""
    outside = []
    for module in _all_modules():
        for value in vars(module).values():
            if not (inspect.isclass(value) and issubclass(value, BaseException)):
                continue
            qualified = f"{value.__module__}.{value.__qualname__}"
            if value.__module__ != module.__name__ or qualified in PRIVATE_EXCEPTIONS:
                continue
            if not issubclass(value, TunlwipError):
                outside.append(qualified)
    assert outside == []


def test_packet_error_is_still_a_value_error() -> None:
    from tunlwip.packet import PacketError, parse_syn

    with pytest.raises(ValueError, match="empty packet") as info:
        parse_syn(b"")
    assert isinstance(info.value, PacketError)
    assert isinstance(info.value, TunlwipError)
