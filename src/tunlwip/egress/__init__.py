"""Egress: how each flow leaves the gateway (direct, through a proxy, or refused)."""

from .via import Direct, Drop, HttpProxy, Reject, Socks5Proxy, Via, parse_via

__all__ = ["Direct", "Drop", "HttpProxy", "Reject", "Socks5Proxy", "Via", "parse_via"]
