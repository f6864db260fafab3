"""Fixtures for integration tests in network namespaces (see tests/netns.py).

Why: these tests need root; locally they skip with a reason, but in CI (CI=true) a skip would
hide a broken environment, so it fails instead.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/netns.py as `netns`

from netns import SplitTopology, Topology, have_netns, split_topology


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "netns: needs root and network namespaces (runs in CI, as root)"
    )


def skip_or_fail(reason: str) -> None:
    """Skip locally; fail in CI, where every integration test must really run."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"required in CI but unavailable: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def netns_available() -> None:
    ok, reason = have_netns()
    if not ok:
        skip_or_fail(reason)


@pytest.fixture
def require_tool() -> Callable[[str], str]:
    """Returns a function giving a tool's path, skipping (or failing in CI) if it is missing."""

    def require(name: str) -> str:
        path = shutil.which(name)
        if path is None:
            skip_or_fail(f"{name!r} not installed")
            raise AssertionError("unreachable")
        return path

    return require


@pytest.fixture
def topology(netns_available: None) -> Iterator[Topology]:
    with Topology() as topo:
        yield topo


@pytest.fixture
def split(topology: Topology) -> SplitTopology:
    """DESIGN.md §5 split topology: gw <-veth-> srv, plus cli for the TUN."""
    return split_topology(topology)
