"""Endpoint: an IP address and a port, the unit every flow is described in."""

from __future__ import annotations

import ipaddress
from typing import NamedTuple

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Endpoint(NamedTuple):
    """An (address, port) pair; ``str()`` gives ``1.2.3.4:80`` or ``[2001:db8::1]:80``."""

    address: IPAddress
    port: int

    @classmethod
    def parse(cls, address: str | IPAddress, port: int) -> Endpoint:
        return cls(ipaddress.ip_address(address), int(port))

    @property
    def family(self) -> int:
        """4 or 6."""
        return self.address.version

    def sockaddr(self) -> tuple[str, int]:
        """The form the socket module wants for connect/sendto."""
        return (str(self.address), self.port)

    def __str__(self) -> str:
        if self.address.version == 6:
            return f"[{self.address}]:{self.port}"
        return f"{self.address}:{self.port}"
