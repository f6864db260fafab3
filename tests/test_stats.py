"""The statistics record and its one schema (``tunlwip.stats``).

Why: ``statistics()`` promises a snapshot nobody can change (embedders hand it around), and
the stop log, ``status`` and the Prometheus metrics promise to be renderings of the same
numbers; here a real gateway's snapshot is checked for both.
"""

from __future__ import annotations

import copy as copy_module
import dataclasses
import json
import pickle
import string
from typing import Any

import pytest
import trio

from test_control import start_gateway
from test_metrics import busy_gateway, parse
from tunlwip import metrics
from tunlwip.control import status
from tunlwip.stats import (
    DNS_STATUS_LINE,
    DNS_STOP_LINE,
    METRICS,
    STATUS_LINES,
    STOP_LINE,
    Fields,
    Stat,
    frozen_copy,
    stop_lines,
    totals_document,
)
from tunlwip.udp import UdpCounters

from packets import udp_packet

CLIENT = "198.18.0.2"


async def test_statistics_cannot_be_changed(nursery: trio.Nursery) -> None:
    gateway, device, _ = await start_gateway(nursery)
    before = gateway.statistics()
    with pytest.raises(dataclasses.FrozenInstanceError):
        before.udp.opened = 99
    with pytest.raises(dataclasses.FrozenInstanceError):
        before.refused.loops += 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        before.icmp_echo.requests = 1
    with pytest.raises(TypeError):
        before.stack.counters["packets_in"] = 0  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        before.active_flows = 1  # type: ignore[misc]

    device.inject_packet(udp_packet(CLIENT, "203.0.113.53", 6000, 9999, b"hello"))
    await trio.testing.wait_all_tasks_blocked()
    after = gateway.statistics()
    assert (before.udp.opened, after.udp.opened) == (0, 1)  # the old snapshot kept its value
    assert gateway.udp.counters.opened == 1  # the live counters still count
    assert isinstance(after.udp, UdpCounters) and repr(after.udp).startswith("UdpCounters(")


def test_a_frozen_copy_is_equal_to_itself_and_replace_makes_another() -> None:
    live = UdpCounters(opened=3)
    copy = frozen_copy(live)
    assert copy == frozen_copy(live) and copy.opened == 3
    changed = dataclasses.replace(copy, expired=2)
    assert (changed.opened, changed.expired) == (3, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        changed.expired = 4
    live.opened += 1  # the copy is detached from the live counters
    assert copy.opened == 3


def test_a_frozen_copy_compares_and_pickles_like_the_live_record() -> None:
    live = UdpCounters(opened=3)
    copy = frozen_copy(live)
    assert copy == live and live == copy and copy != UdpCounters(opened=4)
    for clone in (pickle.loads(pickle.dumps(copy)), copy_module.deepcopy(copy)):
        assert clone == live
        with pytest.raises(dataclasses.FrozenInstanceError):
            clone.opened = 5


async def test_a_snapshot_survives_asdict_deepcopy_and_pickle(nursery: trio.Nursery) -> None:
    """What embedders did with a snapshot before it was frozen still works."""
    gateway, _, _ = await start_gateway(nursery)
    stats = gateway.statistics()
    document = dataclasses.asdict(stats)
    assert document["udp"]["opened"] == 0
    assert document["stack"]["counters"]["packets_in"] == stats.stack.counters["packets_in"]
    assert copy_module.deepcopy(stats) == stats
    restored = pickle.loads(pickle.dumps(stats))
    assert restored == stats
    with pytest.raises(TypeError):
        restored.stack.counters.clear()


async def test_totals_are_the_record_field_by_field(nursery: trio.Nursery) -> None:
    gateway = await busy_gateway(nursery)
    stats = gateway.statistics()
    totals = totals_document(stats)
    assert list(totals) == [field.name for field in dataclasses.fields(stats)]
    assert list(totals["udp"]) == [field.name for field in dataclasses.fields(UdpCounters)]
    assert totals["udp"]["opened"] == stats.udp.opened == 1
    assert totals["stack"]["counters"] == dict(stats.stack.counters)
    assert json.loads(json.dumps(totals)) == totals  # plain JSON all the way down


async def test_every_declared_metric_is_exposed(nursery: trio.Nursery) -> None:
    gateway = await busy_gateway(nursery)
    document = status(gateway, iface="tun9", max_flows=0)
    families = parse(metrics.render(document).decode())
    for entry in METRICS:
        if isinstance(entry, Stat) or entry.label is not None:
            assert f"tunlwip_{entry.metric}" in families, entry
            assert families[f"tunlwip_{entry.metric}"].type == entry.kind, entry
    udp = next(e for e in METRICS if isinstance(e, Fields) and e.metric == "udp")
    for field in dataclasses.fields(UdpCounters):  # a record's fields: one family each
        assert f"tunlwip_{udp.metric}_{field.name}" in families


async def test_stop_lines_name_what_the_gateway_did(nursery: trio.Nursery) -> None:
    gateway = await busy_gateway(nursery)
    totals: dict[str, Any] = totals_document(gateway.statistics())
    assert totals["dns"] is not None  # the proxy runs: a second line for it
    stopped, _ = stop_lines(totals, drained=True)
    assert stopped.startswith("stopped: dials ok 0 refused 0 failed 0; udp sessions 1 expired 0")
    assert "(grace period over, flows reset)" in stop_lines(totals, drained=False)[0]
    assert len(stop_lines({**totals, "dns": None}, drained=True)) == 1
    counted = ("queries", "blocked", "overridden", "cache_hits", "replayed", "forwarded",
               "upstream_failures", "timeouts", "truncated", "malformed", "formerr",
               "blocked_cname", "tcp_timeouts")  # fmt: skip
    totals["dns"] = totals["dns"] | dict.fromkeys(counted, 1)
    dns = stop_lines(totals, drained=True)[1]
    assert dns.startswith("dns: queries 1 blocked 1 overridden 1 cached 2 (replayed 1)")
    assert "malformed 2;" in dns and dns.endswith("encrypted dns refused 0")


async def test_every_path_the_reports_name_is_in_the_document(nursery: trio.Nursery) -> None:
    """A misspelt path would print 0 (or NaN) forever: each one must name a number."""
    gateway = await busy_gateway(nursery)
    document = status(gateway, iface="tun9", max_flows=0)
    given = {"grace", "drops", "echo_details"}
    for template in (STOP_LINE, DNS_STOP_LINE, *STATUS_LINES, DNS_STATUS_LINE):
        for _, field, _, _ in string.Formatter().parse(template):
            if field is None or field in given:
                continue
            for path in field.split("+"):
                value: Any = document["totals"]
                for key in path.split("."):
                    value = value[key]
                assert isinstance(value, int), (template, path)
    for entry in METRICS:
        if isinstance(entry, Stat):
            value = document
            for key in entry.path.split("."):
                value = value[key]
            assert isinstance(value, (int, float)), entry
