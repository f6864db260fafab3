"""Smoke run of the benchmark harness (bench/run.py): one short iperf3 download via tunlwip.

Why: `make bench` is too long for `make test`, and timing does not belong in tests, but the
harness must not rot: this runs its whole machinery (namespaces, ``tunlwip up``, a real iperf3,
the JSON lines and the markdown report) once, in a few seconds, and checks only that a positive
figure came out. No timing assertion.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / "bench" / "run.py"


def run_quick(workloads: str, out: Path) -> str:
    """``bench/run.py --quick`` of ``workloads`` through tunlwip, results in ``out``; returns
    the tail of its output for assertion messages (it must have exited 0)."""
    cmd = [sys.executable, str(RUN), "--quick", "--methods", "tunlwip", "--workloads",
           workloads, "--results-dir", str(out), "--max-time", "60"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    log = f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, log
    return log


def test_bench_quick_tunlwip_download(
    netns_available: None, require_tool: Callable[[str], str], tmp_path: Path
) -> None:
    """`bench/run.py --quick --methods tunlwip --workloads iperf3-download` exits 0 and
    records a positive TCP download throughput for tunlwip, in JSON lines and markdown."""
    require_tool("iperf3")
    out = tmp_path / "results"
    log = run_quick("iperf3-download", out)
    [jsonl] = out.glob("*.jsonl")
    [md] = out.glob("*.md")
    records = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    figures = [
        r
        for r in records
        if r["method"] == "tunlwip"
        and r["workload"] == "tcp-down-1-v4"
        and r.get("metric") == "throughput"
    ]
    assert len(figures) == 1, log + f"\nrecords: {records}"
    value = figures[0]["value"]
    assert isinstance(value, (int, float)) and value > 0, figures[0]
    assert figures[0]["unit"] == "Mbit/s" and figures[0]["mtu"] == 1500
    assert "TCP download, 1 stream, IPv4" in md.read_text(), md.read_text()


def test_bench_quick_tunlwip_plain(
    netns_available: None, require_tool: Callable[[str], str], tmp_path: Path
) -> None:
    """`--workloads plain` (the plain blocking client of issue 17) runs end to end through
    tunlwip: a positive request/response rate and connection rate, every connection
    answered. No timing assertion."""
    out = tmp_path / "results"
    log = run_quick("plain", out)
    [jsonl] = out.glob("*.jsonl")
    records = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    rates = {
        r["workload"]: r for r in records if r["method"] == "tunlwip" and r.get("metric") == "rate"
    }
    assert set(rates) == {"rr-plain", "conn-plain"}, log + f"\nrecords: {records}"
    for r in rates.values():
        assert isinstance(r["value"], (int, float)) and r["value"] > 0, r
        assert not r["error"], r
    assert rates["conn-plain"]["extra"]["ok"] == 200, rates["conn-plain"]
