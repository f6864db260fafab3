#!/usr/bin/env bash
# tunlwip demo: a client namespace reaches a server namespace only through `tunlwip up`.
#
#   [cli]  curl ──► dmesh1 (TUN) ══fd══► [gw] tunlwip up ──veth──► [srv] python http.server
#          198.18.0.2                     lwIP 198.18.0.1           198.18.1.2 / fd00:1::2
#
# Split topology: the gateway creates the TUN in `gw`, then the interface moves to `cli` (the
# open fd keeps working). Everything lives in namespaces this script creates and removes; no
# route outside them is touched. Needs root.
#
#   PYTHON=/path/to/python   runs the web server and, by default, the gateway (`python -m tunlwip`)
#   TUNLWIP_CMD="chroot /srv/root /opt/tunlwip/bin/tunlwip"
#                            the command that runs the gateway instead (split on spaces), e.g. a
#                            tunlwip installed in another distribution's root (scripts/dist_check.sh)
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$here/.venv/bin/python}
if [[ -n ${TUNLWIP_CMD:-} ]]; then read -ra tunlwip <<<"$TUNLWIP_CMD"; else tunlwip=("$python" -m tunlwip); fi
id=tlwdemo$$
gw=$id-gw srv=$id-srv cli=$id-cli
tun=dmesh1
mtu=${MTU:-1500}   # e.g. MTU=65520 make demo
work=$(mktemp -d)
gw_pid="" srv_pid=""
scheme=http   # the test server in the srv namespace; nothing is downloaded from outside
web4="$scheme://198.18.1.2:8080" web6="$scheme://[fd00:1::2]:8080"

say() { printf '\n== %s\n' "$*"; }
run() { echo "[#] $*"; "$@"; }

cleanup() {
    set +e
    [[ -n $gw_pid ]] && kill "$gw_pid" 2>/dev/null && wait "$gw_pid" 2>/dev/null
    [[ -n $srv_pid ]] && kill "$srv_pid" 2>/dev/null && wait "$srv_pid" 2>/dev/null
    for ns in "$cli" "$srv" "$gw"; do ip netns del "$ns" 2>/dev/null; done
    rm -rf "$work"
}
trap cleanup EXIT

[[ $(id -u) == 0 ]] || { echo "demo: needs root (network namespaces and a TUN)" >&2; exit 77; }

say "namespaces and a veth between gateway and server"
for ns in "$gw" "$srv" "$cli"; do run ip netns add "$ns"; run ip -n "$ns" link set lo up; done
run ip -n "$gw" link add gw0 type veth peer name srv0 netns "$srv"
run ip -n "$gw" addr add 198.18.1.1/24 dev gw0
run ip -n "$gw" addr add fd00:1::1/64 dev gw0 nodad
run ip -n "$srv" addr add 198.18.1.2/24 dev srv0
run ip -n "$srv" addr add fd00:1::2/64 dev srv0 nodad
run ip -n "$gw" link set gw0 up
run ip -n "$srv" link set srv0 up

say "a web server in srv with a 50 MB file"
mkdir -p "$work/www"
echo "hello from the server namespace" > "$work/www/index.html"
head -c 50000000 /dev/urandom > "$work/www/big.bin"
want=$(sha256sum "$work/www/big.bin" | cut -d' ' -f1)
ip netns exec "$srv" "$python" -m http.server 8080 --bind :: --directory "$work/www" \
    >"$work/srv.log" 2>&1 &
srv_pid=$!

say "tunlwip up --iface $tun in gw"
ip netns exec "$gw" "${tunlwip[@]}" up --iface "$tun" --mtu "$mtu" >"$work/gw.log" 2>&1 &
gw_pid=$!
for _ in $(seq 100); do ip -n "$gw" link show "$tun" >/dev/null 2>&1 && break; sleep 0.1; done
ip -n "$gw" link show "$tun" >/dev/null || { cat "$work/gw.log"; exit 1; }
cat "$work/gw.log"

say "move the TUN into cli and route everything through it"
run ip -n "$gw" link set "$tun" netns "$cli"
run ip -n "$cli" addr add 198.18.0.2/32 dev "$tun"
run ip -n "$cli" addr add fd00:18::2/64 dev "$tun" nodad
run ip -n "$cli" link set "$tun" mtu "$mtu" up
run ip -n "$cli" route add default dev "$tun"
run ip -n "$cli" -6 route add default dev "$tun"
for _ in $(seq 100); do
    ip netns exec "$srv" ss -ltn | grep -q ':8080' && break; sleep 0.1
done

say "fetch a page over IPv4 and IPv6"
run ip netns exec "$cli" curl -sS --max-time 20 "$web4/index.html"
run ip netns exec "$cli" curl -sS --max-time 20 "$web6/index.html"

say "download 50 MB and check its sha256"
start=$(date +%s.%N)
got=$(ip netns exec "$cli" curl -sS --max-time 120 "$web4/big.bin" | sha256sum | cut -d' ' -f1)
secs=$(echo "$(date +%s.%N) - $start" | bc 2>/dev/null || echo "?")
echo "want $want"
echo "got  $got   (${secs}s)"
[[ $got == "$want" ]] || { echo "demo: checksum mismatch" >&2; exit 1; }

say "a closed port is refused at once (dial before accept)"
ip netns exec "$cli" curl -sS --max-time 10 "$scheme://198.18.1.2:9/" 2>&1 | sed 's/^/    /' || true

say "stop the gateway (SIGTERM) and show its counters"
kill -TERM "$gw_pid"; wait "$gw_pid" && rc=0 || rc=$?
gw_pid=""
cat "$work/gw.log"
echo "gateway exit code: $rc"
[[ $rc == 0 ]]
say "demo ok"
