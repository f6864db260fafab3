"""Settings declared on dataclass fields: the key path, the rule and the help, next to the field.

Theory of operation
-------------------
A field of a section struct is declared with ``setting(...)``: its default, plus, in the
field's metadata, a ``Setting`` that says which configuration key it is (``"device.mtu"``),
its ``Kind`` (the rule, see ``kinds``), the help text of the flag and the docs, the flag
itself and what "not set" means. Everything else reads that: the struct's ``__post_init__``
(``check_fields``), the TOML loader and ``--print`` (``schema.collect``), the flags
(``cli.add_arguments``) and the check that docs/configuration.md documents every key.

``check_fields`` reports every bad field at once, each message starting with its key path,
as ``InvalidFields``: a ``ConfigError`` and, as the structs always raised, a ``ValueError``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ..errors import ConfigError
from .kinds import Kind, show

__all__ = ["ConfigProblems", "InvalidFields", "Setting", "check_fields", "nested_struct", "setting",
           "spec_of"]  # fmt: skip

#: The metadata key under which a field's ``Setting`` is stored.
SETTING = "tunlwip.setting"


class _StructDefault:
    """``Setting.file_default`` when the file's default is the struct's (None is a default)."""

    def __repr__(self) -> str:
        return "STRUCT_DEFAULT"


STRUCT_DEFAULT: Any = _StructDefault()


class ConfigProblems(ConfigError):
    """Several problems at once (each names its key path); ``str`` joins them with "; "."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class InvalidFields(ConfigProblems, ValueError):
    """A section struct was given bad values. ``problems`` name key paths (what the loader
    reports); the message adds the struct field each came from, for embedders."""

    def __init__(self, problems: Sequence[tuple[str, str]]) -> None:
        self.fields = [field for _, field in problems]
        super().__init__([problem for problem, _ in problems])

    def __str__(self) -> str:
        return "; ".join(f"{p} ({f})" for p, f in zip(self.problems, self.fields, strict=True))


@dataclasses.dataclass(frozen=True)
class Setting:
    """What a field is as a configuration key (see the module docstring)."""

    path: str
    kind: Kind
    help: str
    #: The flag of ``tunlwip up`` and ``check-config`` (None: file only).
    cli: str | None = None
    #: What an unset value (None) means, for the docs and ``--print``.
    unset: str = ""
    #: The configuration file's default where it differs from the struct's (the command
    #: serves the client networks of its docs; the UDP sweep follows the idle timeout).
    file_default: Any = STRUCT_DEFAULT
    #: A change only takes effect when ``up`` starts again (the command's own settings; the
    #: gateway says which of its own need a restart).
    restart: bool = False

    @property
    def section(self) -> str:
        return self.path.split(".", 1)[0]

    @property
    def key(self) -> str:
        return self.path.split(".", 1)[1]


def setting(path: str, kind: Kind, default: Any = dataclasses.MISSING, *, help: str,
            cli: str | None = None, unset: str = "", file_default: Any = STRUCT_DEFAULT,
            restart: bool = False, factory: Callable[[], Any] | None = None) -> Any:  # fmt: skip
    """A dataclass field that is the configuration key ``path``, with ``default`` (or, for a
    mutable one, ``factory``)."""
    spec = Setting(path, kind, help, cli, unset, file_default, restart)
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={SETTING: spec})
    return dataclasses.field(default=default, metadata={SETTING: spec})


def spec_of(field: dataclasses.Field[Any]) -> Setting | None:
    """The field's ``Setting``, None for a field that is not a key (a nested struct)."""
    spec = field.metadata.get(SETTING)
    return spec if isinstance(spec, Setting) else None


def nested_struct(field: dataclasses.Field[Any]) -> type[Any] | None:
    """The struct class of a field that holds a nested struct (``GatewayConfig.stack``: its
    default is the class's own), else None."""
    factory = field.default_factory
    if isinstance(factory, type) and dataclasses.is_dataclass(factory):
        return factory
    return None


def field_problems(instance: object) -> list[tuple[str, str]]:
    """(message, "Struct.field") for every field of ``instance`` that breaks its rule. None
    passes where the field's default is None (the setting's "not set")."""
    problems = []
    owner = type(instance).__name__
    for field in dataclasses.fields(instance):  # type: ignore[arg-type]
        spec = spec_of(field)
        if spec is None:
            continue
        value = getattr(instance, field.name)
        if value is None and field.default is None:
            continue
        try:
            spec.kind.check(value, spec.path, show(value))
        except ConfigError as exc:
            problems.append((str(exc), f"{owner}.{field.name}"))
    return problems


Problems = Iterable[tuple[str, str]]


def check_fields(instance: object, across: Callable[[], Problems] | None = None) -> None:
    """Raise InvalidFields naming every bad field of ``instance``; when each field is fine,
    ``across`` gives the problems of rules between fields (``dns.min_ttl <= dns.max_ttl``)."""
    problems = field_problems(instance)
    if not problems and across is not None:
        problems.extend(across())
    if problems:
        raise InvalidFields(problems)
