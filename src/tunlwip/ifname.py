"""Linux interface names: the one check both the configuration and ``TunDevice.open`` apply.

Why here: the kernel refuses a bad name only when the device is created (``dev_valid_name``),
after /dev/net/tun was opened; checking it up front gives the same answer with a message that
names the setting, and one rule means ``device.name`` in a config file and a name passed to
``TunDevice.open`` cannot disagree.
"""

from __future__ import annotations

IFNAMSIZ = 16  # including the NUL: a name has at most 15 bytes


def is_interface_name(name: str) -> bool:
    """``name`` is one the kernel accepts: 1-15 bytes, not "." or "..", no "/", ":" or
    whitespace."""
    if name in ("", ".", "..") or len(name.encode()) >= IFNAMSIZ:
        return False
    return not any(c in "/:" or c.isspace() for c in name)
