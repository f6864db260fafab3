"""Arrays of tables in the configuration file (``[[route]]``, ``[[dns.route]]``): each table's
keys parsed by their kinds into one record, every problem named by its key path with the
table's index (``route[2].ports[1]: ...``), so one bad table never hides another's errors."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ..errors import ConfigError
from .fields import InvalidFields, Setting
from .kinds import close_match, show

__all__ = ["Specs", "duplicate_names", "parse_tables"]

T = TypeVar("T")
#: A table's keys: key -> (the record's field name, its setting).
Specs = Mapping[str, tuple[str, Setting]]


def parse_tables(raw: object, path: str, specs: Specs, make: Callable[..., T],
                 base: Path | None) -> tuple[list[T], list[int], list[str]]:  # fmt: skip
    """The tables of ``path`` (``raw``: the file's value) as records made by ``make``, each
    record's table index in the file (a bad table leaves a gap), and every problem found."""
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        return [], [], [f"{path}: expected [[{path}]] tables, got {show(raw)}"]
    records: list[T] = []
    indexes: list[int] = []
    problems: list[str] = []
    for index, table in enumerate(raw):
        here = f"{path}[{index}]"
        values: dict[str, Any] = {}
        bad = False
        for key, value in table.items():
            found = specs.get(key)
            if found is None:
                close = close_match(key, specs)
                problems.append(f"unknown key {here}.{key}"
                                + (f" (did you mean {close}?)" if close else ""))  # fmt: skip
                bad = True
                continue
            field, spec = found
            try:
                values[field] = spec.kind.parse(value, f"{here}.{key}", base)
            except ConfigError as exc:
                problems.append(str(exc))
                bad = True
        if bad:
            continue
        try:
            records.append(make(**values))
            indexes.append(index)
        except InvalidFields as exc:  # a rule between keys: its path gets the index
            problems += [p.replace(f"{path}.", f"{here}.", 1) for p in exc.problems]
    return records, indexes, problems


def duplicate_names(path: str, names: Sequence[str | None],
                    indexes: Sequence[int] | None = None) -> list[str]:  # fmt: skip
    """Two tables of ``path`` with one ``name`` (their counters and records would be one).
    ``indexes``: each name's table index in the file (default: its position), when some tables
    were left out for errors of their own."""
    first: dict[str, int] = {}
    problems = []
    for index, name in zip(indexes if indexes is not None else range(len(names)), names,
                           strict=True):  # fmt: skip
        if name is None:
            continue
        if name in first:
            problems.append(f"{path}[{index}].name: {show(name)} is already "
                            f"{path}[{first[name]}]'s name")  # fmt: skip
        first.setdefault(name, index)
    return problems
