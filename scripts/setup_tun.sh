#!/usr/bin/env bash
# Policy routing for a tunlwip TUN, for source checkouts and setups that call this path.
#
# The implementation ships inside the package (src/tunlwip/setup_tun.sh) and runs as
# `tunlwip route up|down ...`; this wrapper runs that same file, or the installed command when
# this copy was moved away from the checkout. `scripts/setup_tun.sh --help` lists the options.
set -euo pipefail
here=$(dirname "$(readlink -f "$0")")
if [[ -f $here/../src/tunlwip/setup_tun.sh ]]; then
    TUNLWIP_PROG=${0##*/} exec bash "$here/../src/tunlwip/setup_tun.sh" "$@"
elif command -v tunlwip >/dev/null; then
    exec tunlwip route "$@"
else
    echo "${0##*/}: neither ../src/tunlwip/setup_tun.sh nor a 'tunlwip' command found" >&2
    exit 1
fi
