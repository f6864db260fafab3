"""What ``LwipStack.statistics()`` returns: a frozen snapshot of the stack's counters.

Why its own module: the snapshot is a value embedders keep, compare, copy and pickle, with no
tie to the running stack; ``stats.py`` renders it and ``stack.py`` makes it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import NoReturn

__all__ = ["FrozenCounters", "StackStatistics"]


class FrozenCounters(dict[str, int]):
    """A counters mapping that refuses every change: a snapshot's ``counters``. A dict (not a
    ``MappingProxyType``), so ``dataclasses.asdict``, ``copy.deepcopy`` and ``pickle`` of a
    statistics snapshot work as they did with the plain dict."""

    def _refuse(self, *args: object, **kwargs: object) -> NoReturn:
        raise TypeError("a statistics snapshot's counters cannot be changed")

    __setitem__ = __delitem__ = _refuse
    clear = pop = popitem = setdefault = update = _refuse
    __ior__ = _refuse

    def __reduce__(self) -> tuple[type[FrozenCounters], tuple[dict[str, int]]]:
        return FrozenCounters, (dict(self),)


@dataclasses.dataclass(frozen=True)
class StackStatistics:
    """A snapshot of the stack's counters (C counters plus Python-side state). ``counters`` is
    read-only: a copy of the mapping given, so nothing can change the snapshot afterwards."""

    tcp_connections: int
    lwip_tcp_pcbs: int
    counters: Mapping[str, int]

    def __post_init__(self) -> None:
        object.__setattr__(self, "counters", FrozenCounters(self.counters))

    @property
    def dropped(self) -> dict[str, int]:
        """The nonzero ``drop_*`` counters, by reason (the name without ``drop_``)."""
        return {k[5:]: v for k, v in self.counters.items() if k.startswith("drop_") and v}
