#!/usr/bin/env bash
# make dist-check: prove that what `make dist` wrote to dist/ installs and forwards.
#
#   1. the wheel into fresh venvs of Python 3.11, 3.12 and 3.13: `tunlwip --version` and the
#      namespace demo (scripts/demo.sh) with that venv's tunlwip;
#   2. the sdist into a fresh 3.13 venv, built offline (no network at all: `unshare --net`,
#      `pip --no-index --no-build-isolation`, the build requirements preinstalled) from a folder
#      with nothing beside it; then the same two checks;
#   3. a second distribution: a Debian 13 (trixie) root made with debootstrap (minbase), Python
#      3.13 and gcc 14 installed in it with apt-get, the sdist built offline and installed there,
#      and the gateway run from that root (`chroot ROOT .../tunlwip up`) in the demo's namespaces,
#      which are made from the host (`ip netns add` does not work inside a chroot).
#
# Needs root. Bounded in time (DIST_CHECK_TIMEOUT seconds, default 1800); the namespaces (the
# demo's trap) and the root's mounts are removed on every path. The debootstrap mirror is read at
# run time from this machine's own apt sources. Options (environment):
#   DIST_CHECK_PYTHONS   the interpreters for (1), default the pyenv 3.11.7, 3.12.1 and 3.13.0
#   DIST_CHECK_ROOT      where the trixie root goes (default /var/tmp/tunlwip-dist-check/trixie)
#   DIST_CHECK_KEEP_ROOT=1  keep the root afterwards and reuse a complete one next time
#   DIST_CHECK_SKIP_ROOT=1  skip (3)
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
timeout_s=${DIST_CHECK_TIMEOUT:-1800}
if [[ -z ${_TUNLWIP_DIST_CHECK_BOUNDED:-} ]]; then
    # timeout signals its whole process group: the check and everything it started.
    exec env _TUNLWIP_DIST_CHECK_BOUNDED=1 timeout --kill-after=30 "$timeout_s" bash "$0" "$@"
fi

[[ $(id -u) == 0 ]] || { echo "dist-check: needs root (namespaces, a TUN, chroot)" >&2; exit 77; }

pyenv=/root/.pyenv/versions
read -ra pythons <<<"${DIST_CHECK_PYTHONS:-$pyenv/3.11.7/bin/python3 $pyenv/3.12.1/bin/python3 $pyenv/3.13.0/bin/python3}"
root=${DIST_CHECK_ROOT:-/var/tmp/tunlwip-dist-check/trixie}
suite=trixie
root_packages=(python3 python3-venv python3-dev gcc libc6-dev)
# What an offline build needs preinstalled, read from pyproject.toml so the lists cannot drift.
read_reqs() { "${pythons[0]}" -c 'import sys, tomllib; d = tomllib.load(open("pyproject.toml", "rb"))
print("\n".join(d["build-system"]["requires"] if sys.argv[1] == "build" else d["project"]["dependencies"]))' "$1"; }
mapfile -t build_reqs < <(read_reqs build)
mapfile -t runtime_reqs < <(read_reqs runtime)

shopt -s nullglob
wheels=(dist/tunlwip-*.whl) sdists=(dist/tunlwip-*.tar.gz)
[[ ${#wheels[@]} == 1 && ${#sdists[@]} == 1 ]] \
    || { echo "dist-check: expected one wheel and one sdist in dist/ (run \`make dist\` first)" >&2; exit 1; }
wheel=$here/${wheels[0]} sdist=$here/${sdists[0]}
shopt -u nullglob

work=$(mktemp -d /var/tmp/tunlwip-dist-check.XXXXXX)
mounts=()
results=()

cleanup() {
    set +e
    local i
    for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do umount -R -l "${mounts[$i]}" 2>/dev/null; done
    if [[ -d $root && ${DIST_CHECK_KEEP_ROOT:-} != 1 ]]; then
        # never delete through a mount that is still there
        findmnt -rn -o TARGET | grep -q "^$root/" || rm -rf "$root"
        [[ -z ${DIST_CHECK_ROOT:-} ]] && rmdir "$(dirname "$root")" 2>/dev/null
    fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

say() { printf '\n==== %s\n' "$*"; }
pass() { results+=("PASS  $*"); echo "PASS: $*"; }

# The demo, its log kept; prints the lines that show it forwarded.
demo() {
    local name=$1 log=$work/demo-$1.log
    shift
    if env "$@" bash scripts/demo.sh >"$log" 2>&1; then
        grep -E '^(want|got) |hello from the server|gateway exit code|== demo ok' "$log" | sed 's/^/    /'
        pass "demo through $name"
    else
        tail -40 "$log" >&2
        echo "dist-check: the demo failed ($name)" >&2
        exit 1
    fi
}

# --- 1. the wheel on each Python ---------------------------------------------------------------
for py in "${pythons[@]}"; do
    ver=$("$py" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')
    say "wheel $(basename "$wheel") on Python $ver"
    venv=$work/wheel-$ver
    "$py" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "$wheel"
    (cd / && "$venv/bin/python" -c 'import tunlwip._lwip as m; print("    module:", m.__file__)')
    echo "    $("$venv/bin/tunlwip" --version)"
    pass "wheel installs on Python $ver: $("$venv/bin/tunlwip" --version)"
    demo "the wheel on Python $ver" PYTHON="$venv/bin/python"
done

# --- 2. the sdist, built offline, on Python 3.13 -----------------------------------------------
py313=${pythons[${#pythons[@]} - 1]}
say "sdist $(basename "$sdist"), built offline on $("$py313" --version)"
venv=$work/sdist-3.13
"$py313" -m venv "$venv"
# the build requirements and the dependencies, preinstalled while there is a network
"$venv/bin/python" -m pip install -q --disable-pip-version-check "${build_reqs[@]}" "${runtime_reqs[@]}"
mkdir "$work/alone" && cp "$sdist" "$work/alone/"
# no network, no index, no find-links (this machine's pip configuration is not read either)
(cd "$work/alone" && ls -A && unshare --net -- env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null \
    "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-index \
    --no-build-isolation "$work/alone/$(basename "$sdist")")
(cd / && "$venv/bin/python" -c 'import tunlwip._lwip as m; print("    module:", m.__file__)')
pass "sdist builds offline (no network, no index) on $("$py313" --version): $("$venv/bin/tunlwip" --version)"
demo "the sdist on Python 3.13" PYTHON="$venv/bin/python"

[[ ${DIST_CHECK_SKIP_ROOT:-} == 1 ]] && { printf '\n%s\n' "${results[@]}"; exit 0; }

# --- 3. a Debian 13 root -----------------------------------------------------------------------
# The mirror of this machine's main Debian source (deb822 *.sources first, then sources.list),
# read at run time; never written anywhere.
mirror() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] || continue
        awk 'BEGIN { RS = ""; FS = "\n" }
             { types = uris = suites = "" }
             { for (i = 1; i <= NF; i++) {
                   if ($i ~ /^Types:/) types = $i; if ($i ~ /^URIs:/) uris = $i
                   if ($i ~ /^Suites:/) suites = $i } }
             types ~ /[ \t]deb([ \t]|$)/ && suites !~ /-security/ && uris != "" {
                 split(uris, u, /[ \t]+/); print u[2]; exit }' "$f"
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f $f ]] || continue
        sed -nE '/-security/d; s/^\s*deb\s+(\[[^]]*\]\s+)?(\S+)\s.*/\2/p' "$f"
    done
}
mirror_uri=$(mirror | head -1)
[[ -n $mirror_uri ]] || { echo "dist-check: no Debian mirror in this machine's apt sources" >&2; exit 1; }

if ! command -v debootstrap >/dev/null; then
    echo "[#] apt-get install debootstrap"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
fi

ready=$root/.tunlwip-dist-check-ready
if [[ ${DIST_CHECK_KEEP_ROOT:-} == 1 && -f $ready ]]; then
    say "Debian 13 root: reusing $root (DIST_CHECK_KEEP_ROOT=1)"
else
    say "Debian 13 root: debootstrap --variant=minbase $suite $root (mirror from this machine's apt sources)"
    rm -rf "$root"
    mkdir -p "$(dirname "$root")"
    debootstrap --variant=minbase "$suite" "$root" "$mirror_uri" >"$work/debootstrap.log" 2>&1 \
        || { tail -30 "$work/debootstrap.log" >&2; exit 1; }
fi

for m in proc sys dev; do mkdir -p "$root/$m"; done
mount -t proc proc "$root/proc" && mounts+=("$root/proc")
mount --rbind /sys "$root/sys" && mounts+=("$root/sys")
mount --rbind /dev "$root/dev" && mounts+=("$root/dev")
# The package registries need a resolver, and TLS in the root the host's CA bundle (copied
# beside the root's own, which its ca-certificates package regenerates).
cp -L /etc/resolv.conf "$root/etc/resolv.conf"
root_env=(PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8)
host_ca=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
if [[ -f $host_ca ]]; then
    cp -L "$host_ca" "$root/etc/tunlwip-dist-check-host-ca.crt"
    bundle=/etc/tunlwip-dist-check-host-ca.crt
    root_env+=(SSL_CERT_FILE=$bundle PIP_CERT=$bundle REQUESTS_CA_BUNDLE=$bundle)
fi
in_root() { chroot "$root" /usr/bin/env -i "${root_env[@]}" "$@"; }
# apt in the root validates Release files as this machine's apt is configured to
apt_opts=()
for key in Acquire::Check-Valid-Until Acquire::Check-Date; do
    val=$(apt-config dump "$key" 2>/dev/null | sed -nE "s/^$key \"(.*)\";$/\1/p")
    [[ -n $val ]] && apt_opts+=(-o "$key=$val")
done

if [[ ! -f $ready ]]; then
    say "apt-get install ${root_packages[*]} (in the root)"
    in_root apt-get "${apt_opts[@]}" update -qq
    in_root env DEBIAN_FRONTEND=noninteractive apt-get "${apt_opts[@]}" install -y -qq --no-install-recommends \
        "${root_packages[@]}" >"$work/apt.log" 2>&1 || { tail -30 "$work/apt.log" >&2; exit 1; }
    touch "$ready"
fi
echo "    $(in_root sed -n 's/^PRETTY_NAME=//p' /etc/os-release | tr -d '"')"
echo "    $(in_root python3 --version)"
echo "    $(in_root gcc --version | head -1)"

say "sdist built offline and installed in the root"
rm -rf "$root/opt/tunlwip" "$root/tmp/tunlwip-sdist"
mkdir -p "$root/tmp/tunlwip-sdist" && cp "$sdist" "$root/tmp/tunlwip-sdist/"
in_root python3 -m venv /opt/tunlwip
in_root /opt/tunlwip/bin/python -m pip install -q --disable-pip-version-check "${build_reqs[@]}" "${runtime_reqs[@]}"
unshare --net -- chroot "$root" /usr/bin/env -i "${root_env[@]}" \
    sh -c "cd /tmp/tunlwip-sdist && /opt/tunlwip/bin/python -m pip install -q --disable-pip-version-check \
           --no-index --no-build-isolation /tmp/tunlwip-sdist/$(basename "$sdist")"
in_root sh -c 'cd / && /opt/tunlwip/bin/python -c "import tunlwip._lwip as m; print(\"    module:\", m.__file__)"'
pass "sdist builds offline in $(in_root sed -n 's/^PRETTY_NAME=//p' /etc/os-release | tr -d '"') ($(in_root python3 --version), gcc $(in_root gcc -dumpfullversion)): $(in_root /opt/tunlwip/bin/tunlwip --version)"
# the web server runs on the host (Python 3.13 venv of step 2); the gateway in the root
echo "    gateway: ip netns exec <gw> chroot $root /opt/tunlwip/bin/tunlwip up ..."
demo "the Debian 13 root's gateway" PYTHON="$venv/bin/python" TUNLWIP_CMD="chroot $root /opt/tunlwip/bin/tunlwip"

say "summary"
printf '%s\n' "${results[@]}"
echo "dist-check ok"
