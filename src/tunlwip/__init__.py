"""tunlwip: a userspace TUN gateway; lwIP terminates every flow, trio re-creates it."""

from .config.routes import Route as Route
from .device import CallbackDevice as CallbackDevice
from .device import FdPacketDevice as FdPacketDevice
from .device import MemoryDevice as MemoryDevice
from .device import PacketDevice as PacketDevice
from .device import TunDevice as TunDevice
from .dns.proxy import DnsConfig as DnsConfig
from .egress.custom import CustomVia as CustomVia
from .egress.routes import RouteStatistics as RouteStatistics
from .egress.routes import RouteTable as RouteTable
from .egress.via import parse_via as parse_via
from .endpoint import Endpoint as Endpoint
from .errors import ConfigError as ConfigError
from .errors import DeviceError as DeviceError
from .errors import HostAddressError as HostAddressError
from .errors import LwipError as LwipError
from .errors import ProtectError as ProtectError
from .errors import ProxyError as ProxyError
from .errors import TunlwipError as TunlwipError
from .flows import FlowInfo as FlowInfo
from .flows import FlowRecord as FlowRecord
from .gateway import Gateway as Gateway
from .gateway import GatewayConfig as GatewayConfig
from .gateway import GatewayStatistics as GatewayStatistics
from .gateway import RefusedCounters as RefusedCounters
from .stack import LwipStack as LwipStack
from .stack import StackConfig as StackConfig
from .stack import StackHooks as StackHooks
from .stack import StackStatistics as StackStatistics
from .tcp import LwipTcpStream as LwipTcpStream
from .udp import UdpConfig as UdpConfig
from .udp import UdpSession as UdpSession

#: The public API (docs/embedding.md); tests/test_exports.py pins it.
__all__ = [
    "CallbackDevice",
    "ConfigError",
    "CustomVia",
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
    "ProxyError",
    "RefusedCounters",
    "Route",
    "RouteStatistics",
    "RouteTable",
    "StackConfig",
    "StackHooks",
    "StackStatistics",
    "TunDevice",
    "TunlwipError",
    "UdpConfig",
    "UdpSession",
    "parse_via",
]

__version__ = "0.1.0"
