#!/usr/bin/env bash
# Route this host's traffic through a tunlwip TUN (the single-host setup; see
# docs/architecture.md#test-topology).
#
# Run as `tunlwip route up|down ...` (the package ships this file and runs it) or, from a source
# checkout, as scripts/setup_tun.sh (a wrapper that runs this file): one implementation.
#
# Why a script: the gateway itself never touches routing. The operator (root) creates a
# persistent TUN with the *client* addresses (the gateway's own 198.18.0.1 / fd00:18::1 live
# inside lwIP), a default route via it in a separate table, and the wg-quick policy rules, so
# everything except the gateway's own fwmark-ed ("protected") sockets enters the TUN.
# `down` undoes exactly what `up` recorded in /run/tunlwip/setup-IFACE.state.
set -eEuo pipefail

# How messages name us: "tunlwip route" when run by that command, else the file name.
PROG=${TUNLWIP_PROG:-${0##*/}}
IFACE=dmesh1
FWMARK=0x1d
TABLE=1234
MTU=1500
CLIENT4=198.18.0.2/15
CLIENT6=fd00:18::2/64
RULE_PREF=32000
TUN_USER=
MULTI_QUEUE=0
DRY_RUN=0
STATE_DIR=${TUNLWIP_STATE_DIR:-/run/tunlwip}

usage() {
    cat <<EOF
Usage: $PROG up|down [options]

  up    create/configure TUN IFACE and policy routing so that all traffic not carrying
        fwmark MARK goes into the TUN (wg-quick recipe); idempotent.
  down  remove exactly what 'up' added (recorded in $STATE_DIR/setup-IFACE.state).

Options:
  --iface NAME      TUN interface (default $IFACE)
  --fwmark MARK     fwmark of the gateway's protected sockets (default $FWMARK)
  --table N         routing table for the TUN default routes (default $TABLE)
  --mtu N           TUN MTU (default $MTU)
  --client4 A/P     kernel-side IPv4 address of the TUN (default $CLIENT4; "" = no IPv4)
  --client6 A/P     kernel-side IPv6 address of the TUN (default $CLIENT6; "" = no IPv6)
  --rule-pref N     priority of 'table main suppress_prefixlength 0'; the
                    'not fwmark MARK table N' rule gets N+1 (default $RULE_PREF)
  --user USER       let USER open the persistent TUN (ip tuntap ... user USER)
  --multi-queue     create the TUN with multi_queue, as \`tunlwip up --workers N\` (N > 1)
                    needs; a TUN that exists without it is refused
  --dry-run         print the commands without running them
  -h, --help        this help

Each command is printed as '[#] cmd' before it runs. The gateway's own addresses
(198.18.0.1, fd00:18::1) live inside lwIP and are not configured here.
Note: strict reverse-path filtering (net.ipv4.conf.*.rp_filter=1, firewalld IPv6_rpfilter)
can drop replies to the gateway's protected sockets; loose mode (2) works.
EOF
}

die() {
    echo "$PROG: $*" >&2
    exit 1
}

# --- argument parsing -------------------------------------------------------------------------

[[ $# -ge 1 ]] || {
    usage >&2
    exit 2
}
ACTION=$1
shift
case $ACTION in
up | down) ;;
-h | --help)
    usage
    exit 0
    ;;
*)
    usage >&2
    exit 2
    ;;
esac

while [[ $# -gt 0 ]]; do
    opt=$1
    case $opt in
    -h | --help)
        usage
        exit 0
        ;;
    --dry-run)
        DRY_RUN=1
        shift
        continue
        ;;
    --multi-queue)
        MULTI_QUEUE=1
        shift
        continue
        ;;
    --iface | --fwmark | --table | --mtu | --client4 | --client6 | --rule-pref | --user)
        [[ $# -ge 2 ]] || die "$opt needs a value"
        val=$2
        shift 2
        ;;
    --*=*)
        val=${opt#*=}
        opt=${opt%%=*}
        shift
        ;;
    *) die "unknown argument: $opt (see --help)" ;;
    esac
    case $opt in
    --iface) IFACE=$val ;;
    --fwmark) FWMARK=$val ;;
    --table) TABLE=$val ;;
    --mtu) MTU=$val ;;
    --client4) CLIENT4=$val ;;
    --client6) CLIENT6=$val ;;
    --rule-pref) RULE_PREF=$val ;;
    --user) TUN_USER=$val ;;
    *) die "unknown option: $opt (see --help)" ;;
    esac
done

[[ $IFACE =~ ^[A-Za-z0-9_.-]{1,15}$ ]] || die "bad interface name: $IFACE"
[[ $FWMARK =~ ^(0x[0-9A-Fa-f]{1,8}|[0-9]{1,10})$ ]] || die "bad fwmark: $FWMARK"
FWMARK=$(printf '0x%x' "$FWMARK") # the form `ip rule show` prints
[[ $FWMARK != 0x0 ]] || die "fwmark must not be 0"
# in_range VALUE MIN MAX: decimal VALUE within [MIN, MAX]?
in_range() {
    [[ $1 =~ ^[0-9]{1,10}$ ]] || return 1
    ((10#$1 >= $2 && 10#$1 <= $3))
}
in_range "$TABLE" 1 4294967295 || die "bad table (numeric, 1..4294967295): $TABLE"
TABLE=$((10#$TABLE))
case $TABLE in 253 | 254 | 255) die "table $TABLE is reserved (default/main/local)" ;; esac
in_range "$MTU" 576 65535 || die "bad mtu (576..65535): $MTU"
MTU=$((10#$MTU))
in_range "$RULE_PREF" 1 32764 || die "bad rule priority (1..32764): $RULE_PREF"
RULE_PREF=$((10#$RULE_PREF))
[[ -z $CLIENT4 || $CLIENT4 =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}/[0-9]{1,2}$ ]] ||
    die "bad --client4 (want A.B.C.D/P): $CLIENT4"
[[ -z $CLIENT6 || $CLIENT6 =~ ^[0-9A-Fa-f:]+/[0-9]{1,3}$ ]] ||
    die "bad --client6 (want ADDR/P): $CLIENT6"
[[ -z $TUN_USER || $TUN_USER =~ ^[A-Za-z0-9_.][A-Za-z0-9_.-]*$ ]] || die "bad user: $TUN_USER"

STATE=$STATE_DIR/setup-$IFACE.state
command -v ip >/dev/null || die "'ip' (iproute2) not found"
if [[ $DRY_RUN -eq 0 && $EUID -ne 0 ]]; then
    die "must run as root (or use --dry-run)"
fi

# --- helpers ----------------------------------------------------------------------------------

# Print and run a command (print only with --dry-run).
cmd() {
    echo "[#] $*"
    [[ $DRY_RUN -eq 1 ]] || "$@"
}

# Note a step that is already in place and therefore skipped.
skip() {
    echo "[=] $* (already in place)"
}

# Append an undo record for 'down' (written at once, so a failed 'up' can still be undone).
record() {
    [[ $DRY_RUN -eq 1 ]] && return 0
    printf '%s\n' "$*" >>"$STATE"
}

link_exists() { ip link show dev "$1" >/dev/null 2>&1; }

is_tun() { ip -d -o link show dev "$1" 2>/dev/null | grep -q ' tun type tun '; }

# The queue mode is fixed when a TUN is created: `ip -d link` says "multi_queue" if it has it.
is_multi_queue() { ip -d -o link show dev "$1" 2>/dev/null | grep -q ' multi_queue'; }

link_mtu() { ip -o link show dev "$1" | sed -n 's/.* mtu \([0-9]*\) .*/\1/p'; }

link_is_up() { ip -o link show dev "$1" 2>/dev/null | grep -q '<[^>]*\bUP\b[^>]*>'; }

# has_addr FAMILY DEV ADDR/PREFIX: exact address present on DEV?
has_addr() {
    ip "-$1" -o addr show dev "$2" 2>/dev/null |
        awk -v a="$3" '$4 == a { found = 1 } END { exit !found }'
}

# has_default_route FAMILY TABLE DEV
has_default_route() {
    [[ -n $(ip "-$1" route show table "$2" exact default dev "$3" 2>/dev/null) ]]
}

# has_rule FAMILY PREF TEXT: rule with exactly this text (as `ip rule show` prints it) at PREF?
has_rule() {
    ip "-$1" rule show pref "$2" 2>/dev/null |
        sed 's/^[0-9]*:[[:space:]]*//; s/[[:space:]]*$//' | grep -qxF "$3"
}

# rule_text SPEC...: how `ip rule show` prints a rule added as `ip rule add SPEC` (our two shapes:
# "not fwmark M table T" and "table main suppress_prefixlength 0").
rule_text() {
    local -a out=()
    if [[ ${1-} == not ]]; then
        out+=(not)
        shift
    fi
    out+=(from all)
    while [[ $# -gt 0 ]]; do
        if [[ $1 == table ]]; then out+=(lookup); else out+=("$1"); fi
        shift
    done
    echo "${out[*]}"
}

# --- up ---------------------------------------------------------------------------------------

do_up() {
    local fam addr old_mtu
    if [[ $DRY_RUN -eq 0 ]]; then
        mkdir -p "$STATE_DIR"
        touch "$STATE"
    fi
    trap 'echo "$PROG: up failed; \"$PROG down --iface $IFACE\" undoes what was done" >&2' ERR

    if link_exists "$IFACE"; then
        is_tun "$IFACE" || die "$IFACE exists and is not a TUN device"
        if [[ $MULTI_QUEUE -eq 1 ]] && ! is_multi_queue "$IFACE"; then
            die "$IFACE exists without multi_queue: delete it (ip tuntap del dev $IFACE mode tun)" \
                "and run again, or run the gateway with one worker"
        fi
        skip "ip tuntap add dev $IFACE mode tun"
    else
        local -a tuntap=(ip tuntap add dev "$IFACE" mode tun)
        [[ -z $TUN_USER ]] || tuntap+=(user "$TUN_USER")
        [[ $MULTI_QUEUE -eq 0 ]] || tuntap+=(multi_queue)
        cmd "${tuntap[@]}"
        record tun "$IFACE"
    fi

    old_mtu=$(link_mtu "$IFACE" 2>/dev/null || true)
    if [[ $old_mtu == "$MTU" ]]; then
        skip "ip link set dev $IFACE mtu $MTU"
    else
        cmd ip link set dev "$IFACE" mtu "$MTU"
        [[ -z $old_mtu ]] || record mtu "$IFACE" "$old_mtu"
    fi

    for fam in 4 6; do
        if [[ $fam == 4 ]]; then addr=$CLIENT4; else addr=$CLIENT6; fi
        [[ -n $addr ]] || continue
        if has_addr "$fam" "$IFACE" "$addr"; then
            skip "ip -$fam addr add $addr dev $IFACE"
        elif [[ $fam == 6 ]]; then
            cmd ip -6 addr add "$addr" dev "$IFACE" nodad
            record addr 6 "$IFACE" "$addr"
        else
            cmd ip -4 addr add "$addr" dev "$IFACE"
            record addr 4 "$IFACE" "$addr"
        fi
    done

    if link_is_up "$IFACE"; then
        skip "ip link set dev $IFACE up"
    else
        cmd ip link set dev "$IFACE" up
        record linkup "$IFACE"
    fi

    for fam in 4 6; do
        if [[ $fam == 4 ]]; then addr=$CLIENT4; else addr=$CLIENT6; fi
        [[ -n $addr ]] || continue
        if has_default_route "$fam" "$TABLE" "$IFACE"; then
            skip "ip -$fam route add default dev $IFACE table $TABLE"
        else
            cmd ip "-$fam" route add default dev "$IFACE" table "$TABLE"
            record route "$fam" "$TABLE" "$IFACE"
        fi
        # The wg-quick recipe: unmarked traffic uses table T, but main-table routes more
        # specific than a default (LAN, the gateway's upstream) still win.
        if has_rule "$fam" "$((RULE_PREF + 1))" "not from all fwmark $FWMARK lookup $TABLE"; then
            skip "ip -$fam rule add not fwmark $FWMARK table $TABLE"
        else
            cmd ip "-$fam" rule add pref "$((RULE_PREF + 1))" not fwmark "$FWMARK" table "$TABLE"
            record rule "$fam" "$((RULE_PREF + 1))" not fwmark "$FWMARK" table "$TABLE"
        fi
        if has_rule "$fam" "$RULE_PREF" "from all lookup main suppress_prefixlength 0"; then
            skip "ip -$fam rule add table main suppress_prefixlength 0"
        else
            cmd ip "-$fam" rule add pref "$RULE_PREF" table main suppress_prefixlength 0
            record rule "$fam" "$RULE_PREF" table main suppress_prefixlength 0
        fi
    done
    trap - ERR

    local rpf
    rpf=$(cat /proc/sys/net/ipv4/conf/all/rp_filter 2>/dev/null || echo 0)
    if [[ -n $CLIENT4 && $rpf == 1 ]]; then
        echo "$PROG: warning: net.ipv4.conf.all.rp_filter=1 (strict) may drop replies to" \
            "protected sockets; loose mode (2) is recommended" >&2
    fi
}

# --- down -------------------------------------------------------------------------------------

do_down() {
    local -a lines rec
    local i kind
    if [[ ! -f $STATE ]]; then
        echo "$PROG: nothing recorded for $IFACE ($STATE missing); nothing to do"
        return 0
    fi
    mapfile -t lines <"$STATE"
    # Undo in reverse order: rules, routes, link state, addresses, mtu, then the TUN itself.
    for ((i = ${#lines[@]} - 1; i >= 0; i--)); do
        read -r -a rec <<<"${lines[i]}"
        [[ ${#rec[@]} -gt 0 ]] || continue
        kind=${rec[0]}
        case $kind in
        rule) # rule FAM PREF SPEC...
            if has_rule "${rec[1]}" "${rec[2]}" "$(rule_text "${rec[@]:3}")"; then
                cmd ip "-${rec[1]}" rule del pref "${rec[2]}" "${rec[@]:3}"
            fi
            ;;
        route) # route FAM TABLE DEV
            if has_default_route "${rec[1]}" "${rec[2]}" "${rec[3]}"; then
                cmd ip "-${rec[1]}" route del default dev "${rec[3]}" table "${rec[2]}"
            fi
            ;;
        linkup) # linkup DEV
            if link_exists "${rec[1]}"; then cmd ip link set dev "${rec[1]}" down; fi
            ;;
        addr) # addr FAM DEV ADDR
            if has_addr "${rec[1]}" "${rec[2]}" "${rec[3]}"; then
                cmd ip "-${rec[1]}" addr del "${rec[3]}" dev "${rec[2]}"
            fi
            ;;
        mtu) # mtu DEV OLD
            if link_exists "${rec[1]}"; then cmd ip link set dev "${rec[1]}" mtu "${rec[2]}"; fi
            ;;
        tun) # tun DEV
            if ! link_exists "${rec[1]}"; then
                :
            elif is_multi_queue "${rec[1]}"; then # deleting needs the mode it was made with
                cmd ip tuntap del dev "${rec[1]}" mode tun multi_queue
            else
                cmd ip tuntap del dev "${rec[1]}" mode tun
            fi
            ;;
        *) die "unknown record in $STATE: ${lines[i]}" ;;
        esac
    done
    if [[ $DRY_RUN -eq 0 ]]; then
        rm -f "$STATE"
        rmdir "$STATE_DIR" 2>/dev/null || true
    fi
}

case $ACTION in
up) do_up ;;
down) do_down ;;
esac
