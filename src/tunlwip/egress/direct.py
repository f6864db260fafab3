"""The dialer of a ``direct`` route: the gateway's own, or one with the route's protector.

``direct?fwmark=N`` and ``direct?interface=IF`` leave by another protected path than the
gateway's; everything else about their sockets is the gateway dialer's. This lives apart from
``proxy_dial`` so that TCP and UDP routes and DNS upstreams reached directly never import the
proxy clients (every module imported stays in an idle gateway's memory).
"""

from __future__ import annotations

from ..dialer import Dialer, bind_interface, fwmark
from .via import Direct

__all__ = ["dialer_for"]


def dialer_for(via: Direct, dialer: Dialer) -> Dialer:
    """The dialer of a direct route: ``dialer`` itself, or one with the route's fwmark or
    interface as its protector. (Cache it per route: one is made per call.)"""
    if via.fwmark is not None:
        return dialer.with_protector(fwmark(via.fwmark))
    if via.interface is not None:
        return dialer.with_protector(bind_interface(via.interface))
    return dialer
