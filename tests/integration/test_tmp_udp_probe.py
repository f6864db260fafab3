import json, os
import pytest
from gatewayproc import StartGateway
from netns import SRV_ADDR4, SplitTopology
from test_udp_relay_netns import counters, iperf3_udp, IPERF_PORT

pytestmark = pytest.mark.netns

@pytest.mark.parametrize("reverse", [False, True], ids=["up", "down"])
def test_probe(split: SplitTopology, split_gateway: StartGateway, reverse: bool) -> None:
    split.srv.popen(["iperf3", "-s", "-p", str(IPERF_PORT)])
    split.srv.wait_port(IPERF_PORT)
    gw = split_gateway(*os.environ.get("GWARGS", "").split())
    before = counters(gw)
    doc = iperf3_udp(split, os.environ.get("RATE", "200M"), int(os.environ.get("SECS", "2")), reverse)
    after = counters(gw)
    rec = doc["end"]["sum_received"] if "sum_received" in doc["end"] else doc["end"]["sum"]
    print("\nRESULT", "down" if reverse else "up", round(rec["bits_per_second"]/1e6), "Mbit/s lost%", rec["lost_percent"], "packets", rec["packets"])
    print("DIFF", {k: after[k]-before[k] for k in after if isinstance(after[k], int) and after[k]!=before[k]})
    print(split.cli.ip("-s", "link", "show", "dev", gw.iface).stdout)
    print(split.gw.run("ss", "-uamn").stdout[-800:])
    print(gw.stop())
