"""Microbenchmark of ``RouteTable.decide``: time per decision for tables of 10 and 1,000 routes.

``decide`` runs once per new flow (each SYN, each first datagram), in the gateway's one event
loop, so its cost is a ceiling on the connection rate. The tables mix every key (networks of
both families, ports and ranges, protocols, clients, domains); the flows are drawn so that most
routes are passed over and about a third of them reach the implicit last route, the worst case
of a first-match scan. No root, no network: ``python bench/routes_micro.py``.

Printed per table: ns per decision (best of ``--repeat`` runs, wall clock: run it on a quiet
machine, or read ``--instructions``), and the same for a plain first-match scan over the
routes (what the bitset index replaces), so the two are compared in the same run; the cost of
the same loop calling an empty method is subtracted from both. With
``--instructions`` each figure is an instruction count from ``valgrind --tool=callgrind``
instead (slow, but it resists load on a shared machine; use fewer ``--flows``).
"""

from __future__ import annotations

import argparse
import functools
import ipaddress
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

from tunlwip.config.routes import Route
from tunlwip.egress.routes import RouteTable
from tunlwip.egress.via import Direct, Drop, Reject, Socks5Proxy
from tunlwip.endpoint import Endpoint

Flow = tuple[str, Endpoint, Endpoint, "str | None"]
VIAS = (Direct(), Reject(), Drop(), Socks5Proxy("198.18.1.1", 1080), Direct(fwmark=7))


def make_routes(count: int, rng: random.Random) -> list[Route]:
    routes = []
    for i in range(count):
        kind = i % 5
        if kind == 0:  # split tunnel by network
            nets = tuple(ipaddress.ip_network(f"10.{rng.randrange(256)}.{rng.randrange(256)}.0/24")
                         for _ in range(3))  # fmt: skip
            routes.append(Route(networks=nets, via=rng.choice(VIAS)))
        elif kind == 1:  # by name
            routes.append(Route(domains=(f"*.d{i}.example", f"host{i}.example.org"),
                                via=rng.choice(VIAS)))  # fmt: skip
        elif kind == 2:  # by port and protocol
            low = rng.randrange(1024, 60000)
            routes.append(Route(ports=((low, low + 50), (low + 100, low + 100)),
                                protocols=("udp",), via=Reject()))  # fmt: skip
        elif kind == 3:  # by client and IPv6 network
            routes.append(Route(clients=(ipaddress.ip_network(f"198.18.{i % 200}.0/24"),),
                                networks=(ipaddress.ip_network(f"fd00:{i:x}::/48"),)))  # fmt: skip
        else:  # names and ports together
            routes.append(Route(domains=(f"*.svc{i}.example",), ports=((443, 443),),
                                protocols=("tcp",), via=rng.choice(VIAS)))  # fmt: skip
    return routes


def make_flows(routes: Sequence[Route], count: int, rng: random.Random) -> list[Flow]:
    flows: list[Flow] = []
    for _ in range(count):
        protocol = rng.choice(["tcp", "udp"])
        client = Endpoint.parse(f"198.18.{rng.randrange(256)}.{rng.randrange(1, 255)}", 40000)
        route = rng.choice(routes)
        name: str | None = None
        if rng.random() < 0.33:  # nothing matches: the implicit route
            target = Endpoint.parse(f"203.0.113.{rng.randrange(256)}", 443)
            name = rng.choice([None, "www.nothing.example"])
        elif route.networks is not None:
            net = rng.choice(route.networks)
            target = Endpoint(net.network_address + rng.randrange(net.num_addresses), 443)
        else:
            target = Endpoint.parse("198.18.100.1", route.ports[0][0] if route.ports else 443)
        if route.domains is not None and name is None and rng.random() < 0.8:
            name = "a." + route.domains[0].removeprefix("*.")
        flows.append((protocol, client, target, name))
    return flows


def scan(routes: Sequence[Route], protocol: str, client: Endpoint, target: Endpoint,
         name: str | None) -> int:  # fmt: skip
    """The definition, route by route: what a table without an index would do."""
    for i, route in enumerate(routes):
        if route.protocols is not None and protocol not in route.protocols:
            continue
        if route.ports is not None and not any(lo <= target.port <= hi for lo, hi in route.ports):
            continue
        if route.networks is not None and not any(target.address in n for n in route.networks):
            continue
        if route.clients is not None and not any(client.address in n for n in route.clients):
            continue
        if route.domains is not None:
            if name is None:
                continue
            if not any(name == d or (d.startswith("*.") and (name == d[2:] or
                       name.endswith(d[1:]))) for d in route.domains):  # fmt: skip
                continue
        return i
    return len(routes)


def ns_per_call(run: Callable[[], None], calls: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter_ns()
        run()
        best = min(best, time.perf_counter_ns() - started)
    return best / calls


class _Noop:
    def decide(self, *flow: object) -> None:
        return None


def run_table(table: RouteTable | _Noop, flows: Sequence[Flow]) -> None:
    for flow in flows:
        table.decide(*flow)  # type: ignore[arg-type]


def run_scan(routes: Sequence[Route], flows: Sequence[Flow]) -> None:
    for flow in flows:
        scan(routes, *flow)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,1000", help="route counts (default 10,1000)")
    parser.add_argument("--flows", type=int, default=20_000, help="decisions per run")
    parser.add_argument("--repeat", type=int, default=5, help="runs; the best is shown")
    parser.add_argument("--instructions", action="store_true",
                        help="count instructions under callgrind (a child per figure)")  # fmt: skip
    parser.add_argument("--no-scan", action="store_true", help="skip the plain scan (slow)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # "SIZE:WHAT", for --instructions
    args = parser.parse_args(argv)
    if args.one:
        size, what = args.one.split(":")
        rng = random.Random(16)
        routes = make_routes(int(size), rng)
        flows = make_flows(routes, args.flows, rng)
        table = RouteTable(routes)
        if what in ("table", "noop"):
            run_table(table if what == "table" else _Noop(), flows)
        elif what == "scan":
            run_scan(routes, flows)
        return 0
    how = "instructions" if args.instructions else f"best of {args.repeat}, wall clock"
    unit = "ins" if args.instructions else "ns"
    print(f"RouteTable.decide, {args.flows} decisions per run ({how}; an empty method call's "
          "cost subtracted)")  # fmt: skip
    print(f"{'routes':>7} {'decide':>12} {'plain scan':>14} {'build':>10}")
    for size in map(int, args.sizes.split(",")):
        rng = random.Random(16)
        routes = make_routes(size, rng)
        flows = make_flows(routes, args.flows, rng)
        started = time.perf_counter()
        table = RouteTable(routes)
        build = time.perf_counter() - started
        for flow in flows[:2000]:  # the index is the definition
            assert table.decide(*flow).index == scan(routes, *flow), flow  # type: ignore[arg-type]
        if args.instructions:
            base = instructions(size, "noop", args.flows)
            decide = (instructions(size, "table", args.flows) - base) / args.flows
            plain = float("nan") if args.no_scan else \
                (instructions(size, "scan", args.flows) - base) / args.flows  # fmt: skip
        else:
            repeat = args.repeat
            base = ns_per_call(functools.partial(run_table, _Noop(), flows), len(flows), repeat)
            decide = ns_per_call(functools.partial(run_table, table, flows), len(flows), repeat)
            decide -= base
            plain = float("nan") if args.no_scan else ns_per_call(
                functools.partial(run_scan, routes, flows), len(flows),
                max(1, repeat // 2 if size > 100 else repeat)) - base  # fmt: skip
        print(f"{size:>7} {decide:>8.0f} {unit:<3} {plain:>10.0f} {unit:<3} {build * 1e3:>7.1f} ms")
    return 0


def instructions(size: int, what: str, flows: int) -> int:
    """Instructions of a child (under callgrind) that builds the table and runs ``what``
    (``noop``: the same loop calling an empty method, subtracted from the others)."""
    if shutil.which("valgrind") is None:
        raise SystemExit("--instructions needs valgrind")
    command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
               __file__, "--one", f"{size}:{what}", "--flows", str(flows)]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, check=True).stderr
    for line in out.splitlines():
        if "Collected :" in line:
            return int(line.rsplit(":", 1)[1])
    raise SystemExit(f"callgrind gave no instruction count: {out}")


if __name__ == "__main__":
    sys.exit(main())
