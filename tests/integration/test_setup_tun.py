"""scripts/setup_tun.sh inside a throwaway namespace: up is idempotent, down undoes exactly up.

Never run against the root namespace here: `up` reroutes every unmarked packet into the TUN.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from netns import Namespace, Topology

pytestmark = pytest.mark.netns
SCRIPT = str(Path(__file__).resolve().parents[2] / "scripts" / "setup_tun.sh")


def snapshot(ns: Namespace, iface: str) -> dict[str, str]:
    return {
        "rules4": ns.run("ip", "-4", "rule", "show").stdout,
        "rules6": ns.run("ip", "-6", "rule", "show").stdout,
        "table4": ns.run("ip", "-4", "route", "show", "table", "1234", check=False).stdout,
        "table6": ns.run("ip", "-6", "route", "show", "table", "1234", check=False).stdout,
        "link": ns.run("ip", "-o", "link", "show", iface, check=False).stdout,
    }


def test_up_twice_then_down_restores_everything(topology: Topology, tmp_path: Path) -> None:
    ns = topology.add("st")
    iface = topology.ifname("s")
    before = snapshot(ns, iface)
    args = ["--iface", iface, "--fwmark", "0x1d", "--table", "1234", "--client4", "198.18.0.2/32"]
    env = f"TUNLWIP_STATE_DIR={tmp_path}"

    first = ns.run("env", env, "bash", SCRIPT, "up", *args)
    assert "[#] ip" in first.stdout + first.stderr  # every command is echoed
    after_up = snapshot(ns, iface)
    assert "not from all fwmark 0x1d lookup 1234" in after_up["rules4"]
    assert "default dev " + iface in after_up["table4"]
    assert "default dev " + iface in after_up["table6"]
    assert iface in after_up["link"]
    route = ns.run("ip", "route", "get", "198.19.1.1").stdout
    assert f"dev {iface}" in route  # unmarked traffic goes into the TUN
    marked = ns.run("ip", "route", "get", "198.19.1.1", "mark", "0x1d", check=False)
    assert f"dev {iface}" not in marked.stdout  # the gateway's marked sockets do not

    ns.run("env", env, "bash", SCRIPT, "up", *args)  # idempotent
    assert snapshot(ns, iface) == after_up

    ns.run("env", env, "bash", SCRIPT, "down", "--iface", iface, "--table", "1234")
    assert snapshot(ns, iface) == before
