"""Value kinds: how one setting's values are read, checked, written and given as a flag.

Theory of operation
-------------------
A kind has two jobs that are kept apart on purpose:

``check(value, where, shown)``
    The rule on a value as the structs hold it (an ``int`` in range, an ``IPv4Address``, one
    of the choices). The section structs run it for every field in ``__post_init__``, so an
    embedder's ``StackConfig(mtu=100)`` and the file's ``mtu = 100`` meet the same rule,
    written once, here.
``convert(raw, where, base)``
    The file's (or a flag's) spelling turned into that value: ``"198.18.0.1"`` into an
    address, ``"off"`` into None, ``"0x1d"`` into 29, a relative path into an absolute one.
    It also makes the checks only a loaded file needs before anything is built: that a list
    file can be read, a CA bundle loads, an upstream URL parses (the DNS proxy checks those
    again when it is built, since files change).

``parse`` (the loader's entry) is convert, then check, with the value shown as the user spelt
it. Every problem is a ``ConfigError`` whose message starts with ``where``, the key path
(``udp.idle_timeout: expected a number, got "abc"``).
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import math
import os
import ssl
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ..dialer import Dialer
from ..dns.policy import DnsPolicy
from ..dns.upstreams import parse_upstream
from ..errors import ConfigError
from ..ifname import is_interface_name
from ..service import LOG_LEVELS, NUMERIC_LOG_LEVELS


def show(value: object) -> str:
    """A value as TOML would spell it, for messages (``"abc"``, ``true``, ``[1, 2]``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{show(k)} = {show(v)}" for k, v in value.items()) + "}"
    return str(value)


def close_match(word: str, candidates: Iterable[str]) -> str | None:
    """The candidate ``word`` was probably meant to be, if any (for "did you mean")."""
    import difflib  # only for a mistake: a gateway that loaded its file never needs it

    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return close[0] if close else None


def _reason(exc: ConfigError) -> str:
    """Strip the "DNS upstream 'x': " style prefix: the key path replaces it."""
    text = str(exc)
    return text.split(": ", 1)[1] if text.startswith("DNS ") and ": " in text else text


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class Kind:
    """A value type; see the module docstring for convert and check."""

    doc = ""  #: the type column of docs/configuration.md
    expected = ""  #: "a number": in "expected a number, got ..."

    def parse(self, raw: object, where: str, base: Path | None) -> Any:
        """The file's (or a flag's) value as the structs hold it; ConfigError if it is bad."""
        value = self.convert(raw, where, base)
        self.check(value, where, show(raw))
        return value

    def convert(self, raw: object, where: str, base: Path | None) -> Any:
        """The spelling turned into the value (default: as it is)."""
        return raw

    def check(self, value: Any, where: str, shown: str) -> None:
        """Raise ConfigError naming ``where`` if ``value`` breaks this kind's rule."""

    def dump(self, value: Any) -> str:
        return show(value)

    def argparse(self) -> dict[str, Any]:
        """Keyword arguments for ``add_argument``: the flag's text becomes a TOML-like value."""
        return {}

    def wrong(self, where: str, shown: str) -> ConfigError:
        return ConfigError(f"{where}: expected {self.expected}, got {shown}")


class Number(Kind):
    """A finite float (TOML integers accepted); ``minimum`` inclusive, ``positive`` strict."""

    expected = "a number"

    def __init__(self, *, positive: bool = False, minimum: float | None = None) -> None:
        self.positive, self.minimum = positive, minimum
        self.doc = "number > 0" if positive else f"number >= {minimum:g}" if minimum is not None \
            else "number"  # fmt: skip

    def convert(self, raw: object, where: str, base: Path | None) -> float:
        if not _is_number(raw):
            raise self.wrong(where, show(raw))
        return float(raw)  # type: ignore[arg-type]

    def check(self, value: Any, where: str, shown: str) -> None:
        if not _is_number(value):
            raise self.wrong(where, shown)
        if not math.isfinite(value):
            raise ConfigError(f"{where}: must be a finite number, got {shown}")
        if self.positive and value <= 0:
            raise ConfigError(f"{where}: must be > 0, got {shown}")
        if self.minimum is not None and value < self.minimum:
            raise ConfigError(f"{where}: must be >= {self.minimum:g}, got {shown}")

    def dump(self, value: Any) -> str:
        return repr(float(value))

    def argparse(self) -> dict[str, Any]:
        return {"type": float, "metavar": "SECONDS"}


class Integer(Kind):
    """An int within [minimum, maximum] (bounds optional)."""

    expected = "an integer"

    def __init__(self, minimum: int | None = None, maximum: int | None = None) -> None:
        self.minimum, self.maximum = minimum, maximum
        if minimum is not None and maximum is not None:
            self.doc = f"integer {minimum}-{maximum}"
        else:
            self.doc = f"integer >= {minimum}" if minimum is not None else "integer"

    def check(self, value: Any, where: str, shown: str) -> None:
        if not _is_int(value):
            raise self.wrong(where, shown)
        low, high = self.minimum, self.maximum
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"between {low} and {high}" if low is not None and high is not None \
                else f">= {low}" if low is not None else f"<= {high}"  # fmt: skip
            raise ConfigError(f"{where}: must be {bounds}, got {value}")

    def argparse(self) -> dict[str, Any]:
        return {"type": int, "metavar": "N"}


class OffOr(Kind):
    """``inner``'s values, or "off" (and 0) for "none": a limit an operator may leave out.
    Off is None, which ``--print`` writes as "off" (a commented-out key would mean the
    default, which may be on)."""

    OFF = "off"

    def __init__(self, inner: Number | Integer) -> None:
        self.inner = inner
        self.doc = f'{inner.doc}, or "off" (or 0)'
        self.expected = f'{inner.expected} or "off"'

    def parse(self, raw: object, where: str, base: Path | None) -> Any:
        value = raw
        if value == self.OFF or (not isinstance(value, bool) and value == 0):
            return None
        if isinstance(value, str):  # from the command line: a number, spelt as text
            try:
                value = float(value) if isinstance(self.inner, Number) else int(value)
            except ValueError:
                raise self.wrong(where, show(value)) from None
            if value == 0:
                return None
        with self._naming_off(where, show(value)):
            return self.inner.parse(value, where, base)

    def check(self, value: Any, where: str, shown: str) -> None:
        if value is not None:
            with self._naming_off(where, shown):
                self.inner.check(value, where, shown)

    @contextlib.contextmanager
    def _naming_off(self, where: str, shown: str) -> Iterator[None]:
        """A wrong type is reported as 'expected a number or "off"': "off" is a value too."""
        try:
            yield
        except ConfigError as exc:
            if str(exc).startswith(f"{where}: expected "):
                raise self.wrong(where, shown) from None
            raise

    def dump(self, value: Any) -> str:
        return self.inner.dump(value)

    def argparse(self) -> dict[str, Any]:
        metavar = self.inner.argparse().get("metavar", "VALUE")
        return {"metavar": f"{metavar}|off"}


class Boolean(Kind):
    doc, expected = "boolean", "true or false"

    def check(self, value: Any, where: str, shown: str) -> None:
        if not isinstance(value, bool):
            raise self.wrong(where, shown)

    def argparse(self) -> dict[str, Any]:
        return {"action": argparse.BooleanOptionalAction}


class Choice(Kind):
    """One of some strings; ``Choice.of(SomeLiteral)`` takes them from the field's type, so
    the type and the rule cannot drift apart."""

    def __init__(self, *values: str) -> None:
        self.values = values
        self.doc = "one of " + ", ".join(f'"{v}"' for v in values)
        self.expected = self.doc

    @classmethod
    def of(cls, literal: object) -> Choice:
        return cls(*typing.get_args(literal))

    def check(self, value: Any, where: str, shown: str) -> None:
        if value not in self.values:
            raise self.wrong(where, shown)

    def argparse(self) -> dict[str, Any]:
        return {"choices": list(self.values)}


class Address(Kind):
    def __init__(self, version: int) -> None:
        self.version = version
        self.type = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
        self.doc = f"IPv{version} address"
        self.expected = f"an {self.doc}"

    def convert(self, raw: object, where: str, base: Path | None) -> Any:
        try:
            address = ipaddress.ip_address(raw)  # type: ignore[arg-type]
        except ValueError:
            raise self.wrong(where, show(raw)) from None
        if isinstance(raw, int):
            raise self.wrong(where, show(raw))
        return address

    def check(self, value: Any, where: str, shown: str) -> None:
        if not isinstance(value, self.type):
            raise self.wrong(where, shown)

    def dump(self, value: Any) -> str:
        return show(str(value))

    def argparse(self) -> dict[str, Any]:
        return {"metavar": "ADDR"}


class Network(Kind):
    doc, expected = "CIDR network", 'a network such as "198.18.0.0/15"'

    def convert(self, raw: object, where: str, base: Path | None) -> Any:
        if not isinstance(raw, str):
            raise self.wrong(where, show(raw))
        try:
            return ipaddress.ip_network(raw, strict=False)
        except ValueError:
            raise self.wrong(where, show(raw)) from None

    def check(self, value: Any, where: str, shown: str) -> None:
        if not isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
            raise self.wrong(where, shown)

    def dump(self, value: Any) -> str:
        return show(str(value))

    def argparse(self) -> dict[str, Any]:
        return {"metavar": "CIDR"}


def _int_auto(text: str) -> int:
    """``29`` or ``0x1d`` (argparse names the function in its message: "invalid int value")."""
    return int(text, 0)


_int_auto.__name__ = "int"


class Mark(Kind):
    """SO_MARK: an integer, or a string in any base Python reads (``"0x1d"``)."""

    doc, expected = "integer 1-4294967295 or hex string", 'an integer or a string like "0x1d"'

    def convert(self, raw: object, where: str, base: Path | None) -> Any:
        if isinstance(raw, str):
            try:
                return int(raw, 0)
            except ValueError:
                raise self.wrong(where, show(raw)) from None
        return raw

    def check(self, value: Any, where: str, shown: str) -> None:
        if not _is_int(value):
            raise self.wrong(where, shown)
        if not 0 < value < 2**32:
            raise ConfigError(f"{where}: must be between 1 and 4294967295, got {shown}")

    def dump(self, value: Any) -> str:
        return show(hex(value))

    def argparse(self) -> dict[str, Any]:
        return {"type": _int_auto, "metavar": "MARK"}


class IfName(Kind):
    """A Linux interface name: 1-15 bytes, no "/", ":" or whitespace."""

    doc, expected = "interface name", "an interface name (1-15 characters)"

    def check(self, value: Any, where: str, shown: str) -> None:
        if not isinstance(value, str) or not is_interface_name(value):
            raise self.wrong(where, shown)

    def argparse(self) -> dict[str, Any]:
        return {"metavar": "IF"}


class FilePath(Kind):
    """A path; relative ones are resolved against the config file's directory (or, given as a
    flag, the working directory), so the printed configuration works from anywhere."""

    doc, expected = "path", "a path"

    def __init__(self, *, readable: bool) -> None:
        self.readable = readable

    def convert(self, raw: object, where: str, base: Path | None) -> Any:
        if not isinstance(raw, str) or not raw:
            raise self.wrong(where, show(raw))
        path = os.path.abspath(base / raw if base is not None else raw)
        if self.readable:
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                raise ConfigError(f"{where}: cannot read {path}: {exc.strerror}") from None
        return path

    def check(self, value: Any, where: str, shown: str) -> None:
        if not isinstance(value, str | os.PathLike) or not os.fspath(value):
            raise self.wrong(where, shown)

    def argparse(self) -> dict[str, Any]:
        return {"metavar": "FILE"}


class CaBundle(FilePath):
    """A PEM file of CA certificates (loaded once here, so a bad one is a config error)."""

    def __init__(self) -> None:
        super().__init__(readable=True)

    def convert(self, raw: object, where: str, base: Path | None) -> Any:
        path = super().convert(raw, where, base)
        try:
            ssl.create_default_context(cafile=path)
        except ssl.SSLError as exc:
            raise ConfigError(f"{where}: not a PEM CA bundle: {path} ({exc.reason})") from None
        return path


_VALIDATING_DIALER = Dialer()


class UpstreamUrl(Kind):
    doc, expected = "upstream URL", "an upstream URL"

    def convert(self, raw: object, where: str, base: Path | None) -> Any:
        if not isinstance(raw, str):
            raise self.wrong(where, show(raw))
        try:
            parse_upstream(raw, _VALIDATING_DIALER)  # builds nothing that needs closing
        except ConfigError as exc:
            raise ConfigError(f"{where}: not a valid upstream URL: {_reason(exc)}") from None
        return raw.strip()

    def check(self, value: Any, where: str, shown: str) -> None:
        if not isinstance(value, str):
            raise self.wrong(where, shown)

    def argparse(self) -> dict[str, Any]:
        return {"metavar": "URL"}


class LogLevel(Kind):
    doc = "one of " + ", ".join(f'"{v}"' for v in LOG_LEVELS) + " or 0-5"
    expected = doc

    def convert(self, raw: object, where: str, base: Path | None) -> Any:
        if isinstance(raw, str) and raw.lower() in LOG_LEVELS:
            return raw.lower()
        value = int(raw) if isinstance(raw, str) and raw.isdigit() else raw
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 5:
            return NUMERIC_LOG_LEVELS[value]
        raise self.wrong(where, show(value))

    def check(self, value: Any, where: str, shown: str) -> None:
        if value not in LOG_LEVELS:
            raise self.wrong(where, shown)

    def argparse(self) -> dict[str, Any]:
        return {"type": str.lower, "choices": [*LOG_LEVELS, *map(str, range(6))]}


def parse_listen(text: str) -> tuple[str, int]:
    """``ADDR:PORT`` (``[V6ADDR]:PORT`` for IPv6) as (address, port); ValueError if not."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise ValueError(f"expected ADDR:PORT (port 1-65535), got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ipaddress.ip_address(host).version != 6:
            raise ValueError(f"brackets are for IPv6 addresses, got {text!r}")
    elif ipaddress.ip_address(host).version != 4:
        raise ValueError(f"an IPv6 address goes in brackets ([::1]:9100), got {text!r}")
    return host, int(port_text)


class Listen(Kind):
    """``ADDR:PORT`` to listen on (IPv6 in brackets), checked with ``parse_listen``."""

    doc, expected = '"ADDR:PORT"', 'an address and port such as "127.0.0.1:9100"'

    def check(self, value: Any, where: str, shown: str) -> None:
        if not isinstance(value, str):
            raise self.wrong(where, shown)
        try:
            _, port = parse_listen(value)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if port == 0:  # a port picked at random is no use to a scraper
            raise ConfigError(f"{where}: expected ADDR:PORT (port 1-65535), got {shown}")

    def argparse(self) -> dict[str, Any]:
        return {"metavar": "ADDR:PORT"}


class ListOf(Kind):
    """A TOML array; as a flag either repeated (``append``) or comma-separated (``comma``)."""

    expected = "a list"

    def __init__(self, item: Kind, *, max_items: int | None = None, cli: str = "append") -> None:
        self.item, self.max_items, self.cli = item, max_items, cli
        self.doc = f"list of {item.doc}" + (f" (at most {max_items})" if max_items else "")

    def parse(self, raw: object, where: str, base: Path | None) -> tuple[Any, ...]:
        self._check_list(raw, where, show(raw))
        assert isinstance(raw, list | tuple)
        return tuple(self.item.parse(v, f"{where}[{i}]", base) for i, v in enumerate(raw))

    def check(self, value: Any, where: str, shown: str) -> None:
        self._check_list(value, where, shown)
        for i, item in enumerate(value):
            self.item.check(item, f"{where}[{i}]", show(item))

    def _check_list(self, value: object, where: str, shown: str) -> None:
        if not isinstance(value, list | tuple):
            raise self.wrong(where, shown)
        if self.max_items is not None and len(value) > self.max_items:
            raise ConfigError(f"{where}: at most {self.max_items} entries, got {len(value)}")

    def dump(self, value: Any) -> str:
        return "[" + ", ".join(self.item.dump(v) for v in value) + "]"

    def argparse(self) -> dict[str, Any]:
        item = self.item.argparse()
        if self.cli == "append":
            return {**item, "action": "append"}
        convert: Callable[[str], object] = item.get("type", str)

        def comma_list(text: str) -> list[object]:
            return [convert(part.strip()) for part in text.split(",") if part.strip()]

        comma_list.__name__ = "comma-separated list"
        return {"type": comma_list, "metavar": item.get("metavar", "LIST") + ",..."}


class Overrides(Kind):
    """A table: DNS name -> address or list of addresses."""

    doc, expected = "table: name = list of addresses", "a table of name = [addresses]"

    def convert(self, raw: object, where: str, base: Path | None) -> Any:
        if not isinstance(raw, dict):
            raise self.wrong(where, show(raw))
        result: dict[str, tuple[str, ...]] = {}
        for name, addresses in raw.items():
            here = f"{where}.{show(name)}"
            items = [addresses] if isinstance(addresses, str) else addresses
            if not isinstance(items, list) or not all(isinstance(a, str) for a in items):
                raise ConfigError(f"{here}: expected an address or a list of addresses, got "
                                  f"{show(addresses)}")  # fmt: skip
            try:
                DnsPolicy(overrides={name: items})
            except ConfigError as exc:
                raise ConfigError(f"{here}: {_reason(exc)}") from None
            result[name] = tuple(str(ipaddress.ip_address(a)) for a in items)
        return result

    def check(self, value: Any, where: str, shown: str) -> None:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise self.wrong(where, shown)

    def dump(self, value: Any) -> str:
        return show({name: list(addresses) for name, addresses in value.items()})
