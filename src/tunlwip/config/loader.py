"""Loading: the file, then the flags on top, checked key by key into ``Settings``.

Precedence: built-in defaults < the config file < the command-line flags actually given. The
file is ``--config PATH`` (which must exist) or else ``/etc/tunlwip/<iface>.toml`` when present.
Each value is parsed and checked as it is read (``Kind.parse``), so every problem of the file
and the flags is reported at once, in file order, with the value as the user spelt it; the
structs built at the end check their fields again (that is the embedders' check; for loaded
values only the rules across fields can still fail there, and they name their keys too).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .fields import ConfigProblems, InvalidFields
from .kinds import close_match, show
from .routes import parse_routes
from .schema import SECTIONS
from .settings import OPTIONS, SCHEMA, Settings

__all__ = ["CONFIG_DIR", "default_path", "load"]

CONFIG_DIR = Path("/etc/tunlwip")
#: The file's key of the ``[[route]]`` tables (``GatewayConfig.routes``).
ROUTES = "route"
#: The file's key of the ``[[dns.route]]`` tables (``DnsConfig.routes``).
DNS_ROUTES = "dns.route"


def default_path(iface: str) -> Path:
    return CONFIG_DIR / f"{iface}.toml"


def _suggest(word: str, candidates: Iterable[str]) -> str:
    close = close_match(word, candidates)
    return f" (did you mean {close}?)" if close else ""


def _read_file(path: Path, base: Path, problems: list[str]) -> dict[str, Any]:
    """The file's values by key path (parsed and checked); problems are appended."""
    try:
        with path.open("rb") as f:
            document = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    values: dict[str, Any] = {}
    for section, table in document.items():
        if section == ROUTES:  # [[route]]: an ordered list of tables, not a section
            values[ROUTES], found = parse_routes(table, base)
            problems += found
            continue
        if section not in SECTIONS:
            if isinstance(table, dict):
                close = close_match(section, SECTIONS)
                hint = f" (did you mean [{close}]?)" if close else ""
                problems.append(f"unknown section [{section}]{hint}")
            else:
                elsewhere = [o.path for o in SCHEMA if o.key == section]
                hint = f" (did you mean {elsewhere[0]}?)" if elsewhere else ""
                problems.append(f"unknown key {section}{hint}")
            continue
        if not isinstance(table, dict):
            problems.append(f"{section}: expected a table [{section}], got {show(table)}")
            continue
        keys = [o.key for o in SCHEMA if o.section == section]
        for key, value in table.items():
            if f"{section}.{key}" == DNS_ROUTES:  # [[dns.route]]: a list of tables
                from .dns_routes import parse_dns_routes  # split DNS: only when configured

                values[DNS_ROUTES], found = parse_dns_routes(value, base)
                problems += found
                continue
            opt = OPTIONS.get(f"{section}.{key}")
            if opt is None:
                elsewhere = [o.path for o in SCHEMA if o.key == key]
                hint = f" (did you mean {elsewhere[0]}?)" if elsewhere else _suggest(key, keys)
                problems.append(f"unknown key {section}.{key}{hint}")
                continue
            try:
                values[opt.path] = opt.kind.parse(value, opt.path, base)
            except ConfigError as exc:
                problems.append(str(exc))
    if "protect.fwmark" in values and "protect.interface" in values:
        problems.append("protect: fwmark and interface are mutually exclusive (set one)")
    return values


def load(path: str | Path | None = None, overrides: Mapping[str, object] | None = None) -> Settings:
    """Load and validate: ``path`` (must exist), else the default file of the interface named
    by ``overrides["device.name"]`` if present; then ``overrides`` (TOML-like values by key
    path: the command-line flags given) on top. Raises ConfigError naming every bad key."""
    overrides = overrides or {}
    problems: list[str] = []
    values: dict[str, Any] = {}
    source: Path | None = None
    if path is not None:
        source = Path(path)
    elif isinstance(name := overrides.get("device.name"), str) and name:
        candidate = default_path(name)
        try:
            candidate.stat()
            source = candidate
        except (FileNotFoundError, NotADirectoryError):
            source = None  # no file: built-in defaults (any other error: reading it fails)
        except OSError:
            source = candidate
    if source is not None:
        values = _read_file(source, Path(os.path.abspath(source)).parent, problems)
    for key, value in overrides.items():
        opt = OPTIONS[key]
        try:
            values[key] = opt.kind.parse(value, key, None)
        except ConfigError as exc:
            problems.append(f"{exc} (flag {opt.cli})" if opt.cli else str(exc))
            continue
        if opt.section == "protect":  # a protection flag replaces the file's protection
            other = "protect.interface" if key == "protect.fwmark" else "protect.fwmark"
            values.pop(other, None)
    if problems:
        raise ConfigProblems(problems)
    routes = values.pop(ROUTES, ())
    dns_routes = values.pop(DNS_ROUTES, ())
    for opt in SCHEMA:
        values.setdefault(opt.path, opt.default)
    if values["udp.sweep_interval"] is None:
        values["udp.sweep_interval"] = min(30.0, values["udp.idle_timeout"] / 2)
    try:
        # the gateway's structs, then ours
        return Settings.from_values(values, source, routes, dns_routes)
    except InvalidFields as exc:  # a rule across fields (dns.min_ttl <= dns.max_ttl), or:
        if values["device.name"] is None and exc.fields == ["Settings.iface"]:
            raise ConfigError("device.name: not set (give --iface or set it in [device])") \
                from None  # fmt: skip
        raise ConfigProblems(exc.problems) from None
