"""The routing recipe inside a throwaway namespace, through both of its entry points
(``scripts/setup_tun.sh`` and ``tunlwip route``, which run the same packaged script): up is
idempotent, down undoes exactly up.

Never run against the root namespace here: `up` reroutes every unmarked packet into the TUN.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from netns import Namespace, Topology

pytestmark = pytest.mark.netns
SCRIPT = str(Path(__file__).resolve().parents[2] / "scripts" / "setup_tun.sh")
#: How each entry point is invoked (followed by up|down and the options).
ENTRY_POINTS = {
    "script": ["bash", SCRIPT],
    "command": [sys.executable, "-m", "tunlwip", "route"],
}


def snapshot(ns: Namespace, iface: str) -> dict[str, str]:
    return {
        "rules4": ns.run("ip", "-4", "rule", "show").stdout,
        "rules6": ns.run("ip", "-6", "rule", "show").stdout,
        "table4": ns.run("ip", "-4", "route", "show", "table", "1234", check=False).stdout,
        "table6": ns.run("ip", "-6", "route", "show", "table", "1234", check=False).stdout,
        # the qdisc is the kernel's: a link once up keeps pfifo_fast instead of noop
        "link": re.sub(
            r" qdisc \S+", "", ns.run("ip", "-o", "link", "show", iface, check=False).stdout
        ),
        "addrs": ns.run("ip", "-o", "addr", "show").stdout,
    }


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_up_twice_then_down_restores_everything(
    topology: Topology, tmp_path: Path, entry: str
) -> None:
    ns = topology.add("st")
    iface = topology.ifname("s")
    run = ["env", f"TUNLWIP_STATE_DIR={tmp_path}", *ENTRY_POINTS[entry]]
    before = snapshot(ns, iface)
    args = ["--iface", iface, "--fwmark", "0x1d", "--table", "1234", "--client4", "198.18.0.2/32"]

    first = ns.run(*run, "up", *args)
    assert "[#] ip" in first.stdout + first.stderr  # every command is echoed
    assert (tmp_path / f"setup-{iface}.state").is_file()  # the undo records
    after_up = snapshot(ns, iface)
    assert "not from all fwmark 0x1d lookup 1234" in after_up["rules4"]
    assert "not from all fwmark 0x1d lookup 1234" in after_up["rules6"]
    assert "from all lookup main suppress_prefixlength 0" in after_up["rules4"]
    assert "default dev " + iface in after_up["table4"]
    assert "default dev " + iface in after_up["table6"]
    assert iface in after_up["link"] and "198.18.0.2/32" in after_up["addrs"]
    route = ns.run("ip", "route", "get", "198.19.1.1").stdout
    assert f"dev {iface}" in route  # unmarked traffic goes into the TUN
    marked = ns.run("ip", "route", "get", "198.19.1.1", "mark", "0x1d", check=False)
    assert f"dev {iface}" not in marked.stdout  # the gateway's marked sockets do not

    again = ns.run(*run, "up", *args)  # idempotent: every step is found in place
    assert "[#]" not in again.stdout and "(already in place)" in again.stdout
    assert snapshot(ns, iface) == after_up

    ns.run(*run, "down", "--iface", iface, "--table", "1234")
    assert snapshot(ns, iface) == before
    assert not (tmp_path / f"setup-{iface}.state").exists()


def test_down_leaves_what_up_did_not_add(topology: Topology, tmp_path: Path) -> None:
    """A TUN and an address that existed before ``up`` survive ``down``: only the records of
    what ``up`` itself added are undone."""
    ns = topology.add("st")
    iface = topology.ifname("s")
    ns.ip("tuntap", "add", "dev", iface, "mode", "tun")
    ns.add_addrs(iface, ["198.18.0.2/32"])
    run = ["env", f"TUNLWIP_STATE_DIR={tmp_path}", *ENTRY_POINTS["command"]]
    before = snapshot(ns, iface)

    ns.run(*run, "up", "--iface", iface, "--client4", "198.18.0.2/32", "--client6", "")
    assert "default dev " + iface in snapshot(ns, iface)["table4"]
    ns.run(*run, "down", "--iface", iface)
    assert snapshot(ns, iface) == before  # the TUN and its address are still there


def test_command_reports_the_scripts_errors(topology: Topology, tmp_path: Path) -> None:
    """Bad values are refused by the script, with the command's name and exit status 1."""
    ns = topology.add("st")
    result = ns.run(*ENTRY_POINTS["command"], "up", "--iface", "bad/name", check=False)
    assert result.returncode == 1
    assert result.stderr.startswith("tunlwip route: bad interface name: bad/name")


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_multi_queue_tun_for_workers(topology: Topology, tmp_path: Path, entry: str) -> None:
    """``--multi-queue`` creates the TUN ``up --workers N`` needs and ``down`` deletes it; a
    TUN that exists without it is refused with a message saying what to do."""
    ns = topology.add("st")
    iface = topology.ifname("s")
    run = ["env", f"TUNLWIP_STATE_DIR={tmp_path}", *ENTRY_POINTS[entry]]
    args = ["--iface", iface, "--client4", "198.18.0.2/32", "--client6", "", "--multi-queue"]
    ns.run(*run, "up", *args)
    assert " multi_queue" in ns.run("ip", "-d", "-o", "link", "show", iface).stdout
    ns.run(*run, "down", "--iface", iface)
    assert ns.run("ip", "link", "show", iface, check=False).returncode != 0

    ns.run("ip", "tuntap", "add", "dev", iface, "mode", "tun")
    refused = ns.run(*run, "up", *args, check=False)
    assert refused.returncode != 0
    assert "exists without multi_queue" in refused.stderr
