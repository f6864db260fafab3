"""One status document from the documents of several workers (``tunlwip up --workers N``).

Theory of operation
-------------------
Each worker is a whole gateway and answers ``status`` with the document ``control.status``
builds. The supervisor merges them so that ``tunlwip status``, the Prometheus metrics and the
stop log read one document of the same shape as one gateway's, rendered by the same schema
(``stats.py``):

- every number of ``totals`` and ``drops`` is summed, counters and gauges alike (open flows,
  UDP sessions, lwIP's PCBs: the gateway holds the sum of what its workers hold);
- ``process``: resident memory and open files are summed over the workers and the supervisor;
  the open-files limit, a per-process limit, is the lowest;
- the live flows of all workers, most bytes first, each marked with its ``worker``;
- what is not a number (``dns`` off is None, strings) is taken from the first document.

A worker that ended (it crashed, or is being restarted) takes its counters with it. So that
merged totals never go backwards (a Prometheus counter must not), the supervisor keeps the
counters of every ended worker in ``RetiredTotals`` (its last report: counts since that report
are lost) and adds them; its gauges are not kept: what it held is gone.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .stats import gauge_paths

__all__ = ["GAUGES", "RetiredTotals", "add_numbers", "flows_live", "merge_documents"]

#: Document paths of the current values (not carried over from an ended worker).
GAUGES = gauge_paths()
#: Numbers that are no sums at all: the supervisor sets them.
_NOT_SUMMED = frozenset({"totals.uptime"})


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def add_numbers(into: dict[str, Any], document: Mapping[str, Any], prefix: str, *,
                counters_only: bool = False) -> None:  # fmt: skip
    """Add every number of ``document`` (a record at ``prefix``, e.g. "totals") into ``into``,
    recursively; other values are kept where ``into`` has none yet. ``counters_only`` skips
    the gauges (``GAUGES``)."""
    for key, value in document.items():
        path = f"{prefix}.{key}"
        if path in _NOT_SUMMED:
            continue
        current = into.get(key)
        if isinstance(value, Mapping):
            if not isinstance(current, dict):
                current = into[key] = {}
            add_numbers(current, value, path, counters_only=counters_only)
        elif _is_number(value):
            if counters_only and path in GAUGES:
                into.setdefault(key, 0)
                continue
            into[key] = (current if _is_number(current) else 0) + value
        elif key not in into:
            into[key] = value


def flows_live(document: Mapping[str, Any] | None) -> int:
    """The open flows a status document reports (TCP and UDP)."""
    flows = ((document or {}).get("totals") or {}).get("flows") or {}
    return int(flows.get("live_tcp") or 0) + int(flows.get("live_udp") or 0)


class RetiredTotals:
    """The counters of the workers that ended, summed (see the module's docstring)."""

    def __init__(self) -> None:
        self.totals: dict[str, Any] = {}
        self.drops: dict[str, Any] = {}

    def retire(self, document: Mapping[str, Any] | None) -> None:
        """Keep the counters of an ended worker's last ``document`` (None: it never reported)."""
        if document is None:
            return
        add_numbers(self.totals, document.get("totals") or {}, "totals", counters_only=True)
        add_numbers(self.drops, document.get("drops") or {}, "drops", counters_only=True)


def merge_documents(documents: Sequence[tuple[int, Mapping[str, Any]]],
                    retired: RetiredTotals, *, own_process: Mapping[str, Any],
                    max_flows: int) -> dict[str, Any]:  # fmt: skip
    """``totals``, ``drops``, ``process`` and the flows of the workers' ``documents`` (index,
    document) as one; the caller adds what names the gateway (version, iface, uptime ...)."""
    totals: dict[str, Any] = {}
    drops: dict[str, Any] = {}
    for _, document in documents:
        add_numbers(totals, document.get("totals") or {}, "totals")
        add_numbers(drops, document.get("drops") or {}, "drops")
    add_numbers(totals, retired.totals, "totals")
    add_numbers(drops, retired.drops, "drops")
    flows = sorted(
        _marked_flows(documents),
        reverse=True,
        key=lambda flow: (flow.get("bytes_up") or 0) + (flow.get("bytes_down") or 0),
    )
    live = sum(int(document.get("flows_live") or 0) for _, document in documents)
    listed = flows[:max_flows]
    return {
        "totals": totals,
        "drops": {key: value for key, value in sorted(drops.items()) if value},
        "process": merge_process([own_process, *(d.get("process") or {} for _, d in documents)]),
        "flows": listed,
        "flows_live": live,
        "flows_omitted": max(0, live - len(listed)),
    }


def _marked_flows(documents: Iterable[tuple[int, Mapping[str, Any]]]) -> Iterable[dict[str, Any]]:
    for index, document in documents:
        for flow in document.get("flows") or ():
            if isinstance(flow, Mapping):
                yield {**flow, "worker": index}


def merge_process(usages: Iterable[Mapping[str, Any]]) -> dict[str, int | None]:
    """Memory and open files summed (None if no process could tell), the lowest limit."""
    merged: dict[str, int | None] = {"rss_bytes": None, "open_files": None}
    limits = []
    for usage in usages:
        for key in ("rss_bytes", "open_files"):
            value = usage.get(key)
            if isinstance(value, int):
                merged[key] = (merged[key] or 0) + value
        limit = usage.get("open_files_limit")
        if isinstance(limit, int):
            limits.append(limit)
    merged["open_files_limit"] = min(limits) if limits else None
    return merged
