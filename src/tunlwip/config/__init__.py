"""The configuration: typed structs that validate once, and the TOML file that fills them.

Theory of operation
-------------------
One declaration per key. Each configuration key is a field of a frozen dataclass, declared
with ``setting(...)``: the default, the key path in the file (``"udp.idle_timeout"``), the
rule (a ``Kind``), the help and the flag. From those declarations come:

* ``sections``: ``StackConfig``, ``UdpConfig``, ``DnsConfig``, ``GatewayConfig``, the structs
  embedders construct and the gateway runs on; ``__post_init__`` checks every field, naming
  its key path (``InvalidFields``: a ``ConfigError`` that is also a ``ValueError``);
* ``settings.Settings``: those plus the command's own keys (TUN, protection, metrics,
  logging, grace), ``SCHEMA`` (every key, in file order: ``schema``), ``--print``;
* ``loader.load``: file and flags, every problem at once (``ConfigProblems``), each with its
  key path, unknown keys with a "did you mean";
* the flags of ``tunlwip up`` (``cli.add_arguments``) and the check that
  docs/configuration.md documents every key with its type and default (tests/test_config_cli.py).

Why no library: pydantic, msgspec and attrs+cattrs were weighed. msgspec stops at the first
error and does not validate on construction (embedders would lose their checks); pydantic
and cattrs report every error with its path, but in their own words, so keeping every message
operators see today would mean translating theirs back, and attrs classes are not
dataclasses (``dataclasses.replace``, used throughout, would break). Each would be a new
dependency for operators and slower to import; stdlib dataclasses with field metadata do the
job in a few hundred lines.
"""

from __future__ import annotations

from .fields import ConfigProblems, InvalidFields, Setting, setting
from .kinds import parse_listen
from .loader import CONFIG_DIR, default_path, load
from .schema import KEYS, SECTIONS, Option
from .sections import DnsConfig, GatewayConfig, StackConfig, UdpConfig
from .settings import OPTIONS, SCHEMA, Settings, config_key

__all__ = [
    "CONFIG_DIR",
    "KEYS",
    "OPTIONS",
    "SCHEMA",
    "SECTIONS",
    "ConfigProblems",
    "DnsConfig",
    "GatewayConfig",
    "InvalidFields",
    "Option",
    "Setting",
    "Settings",
    "StackConfig",
    "UdpConfig",
    "config_key",
    "default_path",
    "load",
    "parse_listen",
    "setting",
]
