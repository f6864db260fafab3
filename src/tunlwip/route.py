"""``tunlwip route up|down``: the host's policy routing into a TUN, for pip users.

One implementation: the command runs ``setup_tun.sh``, shipped inside the package, with bash.
Why the script and not Python: it is the reviewed, tested recipe that operators already run as
``scripts/setup_tun.sh`` (now a wrapper around the same file), every step it takes is an
``ip`` command it prints first (``[#] ip rule add ...``), and ``down`` replays the undo records
``up`` wrote to ``/run/tunlwip/setup-IFACE.state``, so it removes exactly what was added. A
Python copy would be a second implementation to keep in step; the command only gives it a
name on ``$PATH`` and ``--help`` next to ``tunlwip up``.

The flags are declared here for ``--help`` and passed through unchanged (only those given);
the script checks every value, so its messages and exit status are the command's.
"""

from __future__ import annotations

import argparse
import importlib.resources
import os
import shutil
import subprocess
import sys

__all__ = ["SCRIPT", "add_route_parser", "run_route"]

#: The script inside the package (package data, next to this module).
SCRIPT = "setup_tun.sh"

#: (flag, metavar, help): the script's options that take a value, in its order.
_VALUED = (
    ("--iface", "IF", "TUN interface (default dmesh1)"),
    ("--fwmark", "MARK", "fwmark of the gateway's protected sockets, as `up --fwmark` (0x1d)"),
    ("--table", "N", "routing table for the TUN's default routes (1234)"),
    ("--mtu", "N", "TUN MTU (1500)"),
    ("--client4", "A/P", 'kernel-side IPv4 address of the TUN (198.18.0.2/15; "" = none)'),
    ("--client6", "A/P", 'kernel-side IPv6 address of the TUN (fd00:18::2/64; "" = none)'),
    ("--rule-pref", "N", "priority of the main-table rule; the fwmark rule gets N+1 (32000)"),
    ("--user", "USER", "let USER open the persistent TUN"),
)


def add_route_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``route up|down [options]`` to the ``tunlwip`` command."""
    parser = subparsers.add_parser(
        "route",
        help="set up (or remove) the TUN and policy routing for a single host",
        description="up: create the TUN with the client addresses and route everything not "
        "carrying the gateway's fwmark into it (the wg-quick recipe); idempotent. down: remove "
        "exactly what up added (recorded in /run/tunlwip/setup-IFACE.state, or "
        "$TUNLWIP_STATE_DIR). Every command is printed as '[#] cmd' before it runs.",
    )
    parser.add_argument("action", choices=("up", "down"))
    for flag, metavar, text in _VALUED:
        parser.add_argument(flag, metavar=metavar, help=text)
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument(
        "--multi-queue",
        action="store_true",
        help="create the TUN with multi_queue, for `up --workers N` (N > 1)",
    )
    parser.set_defaults(handler=run_route, needs_config=False)


def script_arguments(args: argparse.Namespace) -> list[str]:
    """The script's command line for the parsed ``args`` (only the flags given)."""
    argv = [args.action]
    for flag, _, _ in _VALUED:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            argv += [flag, value]
    if args.dry_run:
        argv.append("--dry-run")
    if getattr(args, "multi_queue", False):
        argv.append("--multi-queue")
    return argv


def run_route(args: argparse.Namespace) -> int:
    """Run the packaged script; its exit status (1 with a message if bash is missing)."""
    bash = shutil.which("bash")
    if bash is None:
        print("tunlwip route: bash not found (the routing recipe is a bash script)",
              file=sys.stderr)  # fmt: skip
        return 1
    env = {**os.environ, "TUNLWIP_PROG": "tunlwip route"}
    resource = importlib.resources.files("tunlwip").joinpath(SCRIPT)
    with importlib.resources.as_file(resource) as path:
        return subprocess.run([bash, str(path), *script_arguments(args)], env=env,
                              check=False).returncode  # fmt: skip
