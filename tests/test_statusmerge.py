"""Merging the status documents of ``--workers N`` (statusmerge.py) and rendering the merged
document (stats.py, metrics.py, control.py).

Why: the supervisor's ``status``, metrics and stop log must be the sums of what the workers
say, per the one schema: counters and gauges summed, an ended worker's counters kept and its
gauges not, flows listed most bytes first with their worker; and one gateway's reports must
not change at all. The namespace test (tests/integration/test_workers_netns.py) checks the
same against real workers.
"""

from __future__ import annotations

import copy
import json
import logging
from typing import Any

from tunlwip import control, metrics, service
from tunlwip.stats import gauge_paths, metric_families, status_lines, stop_lines
from tunlwip.statusmerge import RetiredTotals, add_numbers, flows_live, merge_documents


def worker_document(tcp: int, live: int, rss: int, flows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "version": "x",
        "iface": "t0",
        "pid": 100 + tcp,
        "uptime": 5.0,
        "totals": {
            "uptime": 5.0,
            "active_flows": live,
            "dials_ok": tcp,
            "udp_sessions": 1,
            "dns": None,
            "flows": {"live_tcp": live, "live_udp": 0, "tcp": tcp, "udp": 2, "subscribers": 0},
            "stack": {
                "tcp_connections": live,
                "lwip_tcp_pcbs": live,
                "counters": {"packets_in": 10 * tcp, "listeners": 3, "drop_not_client": 1},
            },
            "udp": {"opened": 2, "datagrams_in": 7},
        },
        "drops": {"not_client": 1},
        "process": {"rss_bytes": rss, "open_files": 10, "open_files_limit": 1024},
        "flows": flows,
        "flows_live": live,
        "flows_omitted": max(0, live - len(flows)),
    }


def flow(up: int, port: int) -> dict[str, Any]:
    return {"protocol": "tcp", "client": f"198.18.0.2:{port}", "target": "198.18.1.2:80",
            "name": None, "bytes_up": up, "bytes_down": 0, "age": 1.0}  # fmt: skip


def test_counters_and_gauges_are_summed_flows_sorted_and_marked() -> None:
    a = worker_document(5, 2, 1000, [flow(10, 1), flow(500, 2)])
    b = worker_document(7, 1, 2000, [flow(100, 3)])
    merged = merge_documents([(0, a), (1, b)], RetiredTotals(), max_flows=2,
                             own_process={"rss_bytes": 5, "open_files": 4,
                                          "open_files_limit": 512})  # fmt: skip
    totals = merged["totals"]
    assert totals["dials_ok"] == 12
    assert totals["flows"] == {"live_tcp": 3, "live_udp": 0, "tcp": 12, "udp": 4,
                               "subscribers": 0}  # fmt: skip
    assert totals["stack"]["counters"] == {"packets_in": 120, "listeners": 6,
                                           "drop_not_client": 2}  # fmt: skip
    assert totals["dns"] is None
    assert "uptime" not in totals  # the supervisor's own, set by it
    assert merged["drops"] == {"not_client": 2}
    assert merged["process"] == {"rss_bytes": 3005, "open_files": 24, "open_files_limit": 512}
    assert [(f["bytes_up"], f["worker"]) for f in merged["flows"]] == [(500, 0), (100, 1)]
    assert merged["flows_live"] == 3 and merged["flows_omitted"] == 1


def test_an_ended_worker_keeps_its_counters_not_its_gauges() -> None:
    a = worker_document(5, 2, 1000, [])
    gone = worker_document(7, 4, 2000, [])
    retired = RetiredTotals()
    retired.retire(gone)
    retired.retire(None)  # a worker that never reported adds nothing
    merged = merge_documents([(0, a)], retired, own_process={}, max_flows=10)
    totals = merged["totals"]
    assert totals["flows"]["tcp"] == 12 and totals["dials_ok"] == 12  # counters kept
    assert totals["flows"]["live_tcp"] == 2  # gauges: only the live worker's
    assert totals["udp_sessions"] == 1 and totals["active_flows"] == 2
    assert totals["stack"]["counters"]["listeners"] == 3
    assert totals["stack"]["tcp_connections"] == 2
    assert totals["stack"]["counters"]["packets_in"] == 120
    assert merged["drops"] == {"not_client": 2}
    assert merged["flows_live"] == 2


def test_gauge_paths_come_from_the_schema() -> None:
    gauges = gauge_paths()
    assert {"totals.flows.live_tcp", "totals.udp_sessions", "totals.pending_dials",
            "totals.stack.counters.listeners", "process.rss_bytes"} <= gauges  # fmt: skip
    assert "totals.flows.tcp" not in gauges and "totals.dials_ok" not in gauges


def test_add_numbers_keeps_the_first_non_number_and_fills_none_records() -> None:
    into: dict[str, Any] = {"dns": None, "name": "first"}
    add_numbers(into, {"dns": {"queries": 3}, "name": "second", "flag": True}, "totals")
    assert into == {"dns": {"queries": 3}, "name": "first", "flag": True}
    assert flows_live(None) == 0
    assert flows_live(worker_document(1, 3, 0, [])) == 3


def supervised(document: dict[str, Any]) -> dict[str, Any]:
    doc = copy.deepcopy(document)
    doc["supervisor"] = {"pid": 1, "workers": 2, "workers_running": 2, "worker_restarts": 1,
                         "flows_lost": 4}  # fmt: skip
    doc["workers"] = [{"index": 0, "flows_live": 2, "restarts": 0},
                      {"index": 1, "flows_live": 1, "restarts": 1}]  # fmt: skip
    return doc


def test_reports_of_one_gateway_are_unchanged_and_a_supervisors_add_workers() -> None:
    one = worker_document(5, 2, 1000, [])
    lines = status_lines(one)
    assert not any(line.startswith("workers:") for line in lines)
    names = {family.metric for family in metric_families(one)}
    assert not names & {"workers", "worker_restarts", "worker_open_flows"}
    many = supervised(one)
    assert status_lines(many)[0] == ("workers:   2 of 2 running (open flows 2, 1; restarts "
                                     "0, 1); 4 flows lost")  # fmt: skip
    assert status_lines(many)[1:] == lines
    text = metrics.render(many).decode()
    assert "tunlwip_workers 2.0" in text
    assert "tunlwip_worker_restarts_total 1.0" in text
    assert "tunlwip_worker_flows_lost_total 4.0" in text
    assert 'tunlwip_worker_open_flows{worker="1"} 1.0' in text
    assert text.startswith(metrics.render(one).decode())  # the workers' families come last
    assert stop_lines(one["totals"], drained=True) == stop_lines(many["totals"], drained=True)


def test_status_requests_may_ask_for_fewer_flows() -> None:
    assert control.parse_request(b'{"cmd": "status"}') == control.MAX_LISTED_FLOWS
    assert control.parse_request(b'{"cmd": "status", "max_flows": 0}') == 0
    assert control.parse_request(b'{"cmd": "status", "max_flows": 1000000000}') == 1000
    assert control.parse_request(b'{"cmd": "status", "max_flows": -5}') == 0
    for bad in (b'{"cmd": "status", "max_flows": "all"}', b'{"cmd": "status", "max_flows": true}',
                b'{"cmd": "flows"}', b"not json"):  # fmt: skip
        answer = control.parse_request(bad)
        assert isinstance(answer, dict) and "error" in answer


def test_a_worker_tags_its_log_lines(capsys: Any) -> None:
    try:
        service.set_log_tag("worker 1")
        service.configure_logging("info", fmt="json")
        logging.getLogger("tunlwip").info("serving: %s", "t0")
        record = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
        assert record["message"] == "[worker 1] serving: t0"
        assert record["worker"] == "worker 1"
    finally:
        service.set_log_tag(None)
        service.configure_logging("warning")
