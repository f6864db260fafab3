"""The Prometheus endpoint of a real ``tunlwip up``, scraped with curl while traffic runs, and
its log as JSON lines.

Why: the unit tests (tests/test_metrics.py) drive the responder in-process; here the gateway
serves ``--metrics-listen`` from its own event loop while it relays a byte-verified upload,
``curl`` inside the gateway's namespace must get 200 with ``tunlwip_`` lines that count the
running flow (and 404 elsewhere), and with ``--log-format json`` every line the gateway logs
must be one JSON object.

Split topology (docs/architecture.md#test-topology)::

    [cli]                          [gw]                                [srv]
    ParallelUpload (8 MiB, IPv4)   tunlwip up --iface T                digest server :7500
    T: 198.18.0.2/32               --metrics-listen 127.0.0.1:9464
    default dev T ===== fd =====>  sockets -- veth 198.18.1.1 ------- 198.18.1.2
                                   curl http://127.0.0.1:9464/metrics
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gatewayproc import StartGateway
from netns import SRV_ADDR4, SplitTopology
from transfers import ParallelUpload, start_script_server

pytestmark = pytest.mark.netns

DIGEST_PORT, METRICS_PORT = 7500, 9464
URL = f"http://127.0.0.1:{METRICS_PORT}"


def scrape(split: SplitTopology, path: str, out: Path) -> int:
    """curl inside gw (where the endpoint listens): the HTTP status; the body goes to out."""
    result = split.gw.run("curl", "-sS", "--max-time", "10", "-o", str(out), "-w",
                          "%{http_code}", URL + path, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return int(result.stdout)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_metrics_while_traffic_runs_and_json_logs(
    split: SplitTopology, split_gateway: StartGateway, require_tool: Any, tmp_path: Path
) -> None:
    require_tool("curl")
    start_script_server(split.srv, "digest", DIGEST_PORT)
    gw = split_gateway("--metrics-listen", f"127.0.0.1:{METRICS_PORT}", "--log-format", "json")
    upload = ParallelUpload(split.cli, socket.AF_INET, SRV_ADDR4, DIGEST_PORT,
                            size=8 * 1024 * 1024, seconds=4)  # fmt: skip

    body = tmp_path / "metrics.txt"
    seen_open, scrapes, during = 0.0, 0, ""
    while upload.running() or scrapes == 0:
        assert scrape(split, "/metrics", body) == 200
        text = body.read_text()
        assert "# TYPE tunlwip_open_flows gauge" in text
        values = samples(text)
        scrapes += 1
        if upload.running():
            seen_open = max(seen_open, values[("tunlwip_open_flows", (("protocol", "tcp"),))])
            during = text
    upload.check()
    assert scrapes >= 2 and seen_open >= 1, (scrapes, seen_open)
    lines = [line for line in text.splitlines() if line.startswith("tunlwip_")]
    assert len(lines) > 50, text
    assert values[("tunlwip_stack_bytes_in_total", ())] > 0
    assert values[("tunlwip_flows_total", (("protocol", "tcp"),))] >= 1
    assert values[("tunlwip_resident_memory_bytes", ())] > 1 << 20
    assert scrape(split, "/", tmp_path / "other.txt") == 404
    print(f"{scrapes} scrapes during the upload; excerpt:\n" + "\n".join(
        line for line in during.splitlines()
        if line.startswith(("tunlwip_open_flows", "tunlwip_flows_total", "tunlwip_dials_total",
                            "tunlwip_resident_memory", "tunlwip_open_files"))))  # fmt: skip

    gw.stop()
    records = [json.loads(line) for line in gw.log().splitlines()]  # each line one object
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    messages = [r["message"] for r in records]
    assert f"metrics on {URL}/metrics" in messages
    assert any(m.startswith("stopped") for m in messages)
