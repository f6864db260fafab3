"""Fixtures for integration tests in network namespaces (see tests/netns.py), including the
``tunlwip up`` process factories (plain helpers in gatewayproc.py).

Why: these tests need root; locally they skip with a reason, but in CI (CI=true) a skip would
hide a broken environment, so it fails instead.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/netns.py as `netns`

from gatewayproc import RunningGateway, StartGateway, launch_gateway
from netns import (
    Namespace,
    SplitTopology,
    Topology,
    have_netns,
    move_link,
    setup_client_tun,
    split_topology,
)


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
    """The split topology (docs/architecture.md#test-topology): gw <-veth-> srv, plus cli for
    the TUN."""
    return split_topology(topology)


@pytest.fixture
def start_gateway(topology: Topology, tmp_path: Path) -> Iterator[StartGateway]:
    """Factory: ``tunlwip up --iface <fresh name> *args`` in a namespace, returned once serving.

    At teardown every gateway must stop on SIGTERM with status 0 within 10 s.
    """
    started: list[RunningGateway] = []

    def start(ns: Namespace, *args: str, wrapper: Sequence[str] = ()) -> RunningGateway:
        iface = topology.ifname("t")
        gw = launch_gateway(ns, iface, tmp_path / f"gateway-{iface}.log", *args, wrapper=wrapper)
        started.append(gw)
        gw.wait_serving()
        return gw

    yield start
    problems = []
    for gw in started:
        try:
            gw.stop()
        except AssertionError as exc:
            problems.append(str(exc))
    assert not problems, "\n\n".join(problems)


@pytest.fixture
def split_gateway(split: SplitTopology, start_gateway: StartGateway) -> StartGateway:
    """Factory: a gateway in gw whose TUN is moved to cli and made cli's uplink."""

    def start(*args: str, wrapper: Sequence[str] = ()) -> RunningGateway:
        gw = start_gateway(split.gw, *args, wrapper=wrapper)
        move_link(gw.iface, split.gw, split.cli)
        setup_client_tun(split.cli, gw.iface)
        return gw

    return start
