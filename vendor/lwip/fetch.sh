#!/usr/bin/env bash
# Provide lwIP 2.1.3 for the build, verified by the sha256 of its orig tarball.
#
# Three ways, tried in this order:
#   1. TUNLWIP_LWIP_DIR=/path/to/lwip      an unpacked lwIP tree (its src/core/tcp.c must exist);
#                                           used as is by build_ffi.py, nothing is copied or checked
#   2. TUNLWIP_LWIP_TARBALL=/path/to/lwip_2.1.3+dfsg1.orig.tar.xz
#                                           a local file: verified, then unpacked into upstream/
#   3. neither: the Debian package client downloads the `lwip` source package. Any Debian or
#      Ubuntu release whose `lwip` carries this orig tarball works (Debian's 2.1.3+dfsg1-2,
#      Ubuntu's 2.1.3+dfsg1-1, ...): the revision is chosen from the source index by the
#      tarball's hash, and the downloaded tarball is verified again before it is unpacked.
#
# No lwIP file is ever committed. For (3) a deb-src entry is derived from this machine's own apt
# sources into a private apt state folder, so the system's apt configuration is never changed.
# A tarball whose hash differs is refused before anything is unpacked. Idempotent: a verified
# tree that is already unpacked is left alone.
set -euo pipefail

PACKAGE=lwip
UPSTREAM_VERSION=2.1.3
ORIG_TARBALL=lwip_2.1.3+dfsg1.orig.tar.xz
ORIG_SHA256=0a8276d09fc4e97bbba2f953d74af2388fc2195ea156be9d7589e297a68fde24

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
dest="$here/upstream"
stamp="$dest/.tunlwip-verified"
cache="$here/.cache"

die() { echo "vendor/lwip/fetch.sh: error: $*" >&2; exit 1; }

# 1. An unpacked tree given by the user.
if [[ -n ${TUNLWIP_LWIP_DIR:-} ]]; then
    [[ -f "$TUNLWIP_LWIP_DIR/src/core/tcp.c" ]] \
        || die "TUNLWIP_LWIP_DIR=$TUNLWIP_LWIP_DIR is not an unpacked lwIP $UPSTREAM_VERSION tree (src/core/tcp.c missing)"
    echo "lwIP: using the tree in TUNLWIP_LWIP_DIR=$TUNLWIP_LWIP_DIR as is (not verified)"
    exit 0
fi

present() { [[ -f "$stamp" && "$(cat "$stamp")" == "$ORIG_SHA256" && -f "$dest/src/core/tcp.c" ]]; }
already() { echo "lwIP $UPSTREAM_VERSION already present in vendor/lwip/upstream (sha256 verified)"; }

command -v sha256sum >/dev/null || die "sha256sum is missing (coreutils)"
command -v tar >/dev/null || die "tar is missing"
command -v xz >/dev/null || die "xz is missing (apt-get install xz-utils)"

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

# Refuse a file whose hash is not the pinned one, naming the file and both hashes.
check_hash() {
    local file=$1 got
    got=$(sha256_of "$file")
    [[ $got == "$ORIG_SHA256" ]] && return 0
    echo "vendor/lwip/fetch.sh: error: sha256 mismatch for $file" >&2
    echo "  expected $ORIG_SHA256 ($ORIG_TARBALL)" >&2
    echo "  got      $got" >&2
    echo "  nothing was unpacked" >&2
    return 1
}

unpack() {
    local tarball=$1
    rm -rf "$dest" "$dest.tmp"
    mkdir -p "$dest.tmp"
    tar -xJf "$tarball" -C "$dest.tmp" --strip-components=1
    [[ -f "$dest.tmp/src/core/tcp.c" ]] || { rm -rf "$dest.tmp"; die "unexpected tarball layout: src/core/tcp.c missing"; }
    echo "$ORIG_SHA256" > "$dest.tmp/.tunlwip-verified"
    mv "$dest.tmp" "$dest"
    echo "lwIP $UPSTREAM_VERSION unpacked into vendor/lwip/upstream"
}

# 2. A local tarball given by the user.
if [[ -n ${TUNLWIP_LWIP_TARBALL:-} ]]; then
    [[ -f "$TUNLWIP_LWIP_TARBALL" ]] || die "TUNLWIP_LWIP_TARBALL=$TUNLWIP_LWIP_TARBALL: no such file"
    check_hash "$TUNLWIP_LWIP_TARBALL" || exit 1
    echo "sha256 ok: $TUNLWIP_LWIP_TARBALL"
    if present; then already; else unpack "$TUNLWIP_LWIP_TARBALL"; fi
    exit 0
fi

if present; then already; exit 0; fi

# 3. The Debian package client.
mkdir -p "$cache"
tarball="$cache/$ORIG_TARBALL"
if [[ -f "$tarball" ]] && ! check_hash "$tarball" 2>/dev/null; then
    rm -f "$tarball"   # a stale or broken download: fetch it again
fi

if [[ ! -f "$tarball" ]]; then
    command -v apt-get >/dev/null || die "apt-get (the Debian package client) is missing; set TUNLWIP_LWIP_TARBALL to a local $ORIG_TARBALL (sha256 $ORIG_SHA256) or TUNLWIP_LWIP_DIR to an unpacked lwIP $UPSTREAM_VERSION tree"
    state=$(mktemp -d)
    trap 'rm -rf "$state"' EXIT
    mkdir -p "$state/lists/partial" "$state/archives/partial" "$state/sources.list.d"
    : > "$state/sources.list"
    # Derive deb-src entries from the machine's enabled apt sources (deb822 and one-line formats).
    found=0
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f "$f" ]] || continue
        sed -E 's/^Types:.*/Types: deb-src/' "$f" > "$state/sources.list.d/$(basename "$f")"
        found=1
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f "$f" ]] || continue
        grep -E '^\s*deb\s' "$f" | sed -E 's/^\s*deb\s/deb-src /' >> "$state/sources.list" || true
        found=1
    done
    [[ $found == 1 ]] || die "no apt sources found under /etc/apt to derive a deb-src entry from"
    apt_opts=(
        -o "Dir::Etc::SourceList=$state/sources.list"
        -o "Dir::Etc::SourceParts=$state/sources.list.d"
        -o "Dir::State::Lists=$state/lists"
        -o "Dir::Cache::Archives=$state/archives"
        -o "APT::Sandbox::User=root"
        -o "Acquire::Languages=none"
        -o "Debug::NoLocking=1"
    )
    apt-get "${apt_opts[@]}" -qq update || die "apt-get update of the derived deb-src lists failed"
    # Every revision of the source package the index knows, newest first, whose orig tarball is
    # the pinned one (the index lists each file with its sha256).
    versions=$(apt-cache "${apt_opts[@]}" showsrc "$PACKAGE" 2>/dev/null | awk -v h="$ORIG_SHA256" -v t="$ORIG_TARBALL" '
        /^Package:/ { v = "" }
        /^Version:/ { v = $2 }
        $1 == h && $3 == t && v != "" { print v }' | sort -u -r -V)
    [[ -n $versions ]] || die "no $PACKAGE source package in this machine's apt sources carries $ORIG_TARBALL with sha256 $ORIG_SHA256; set TUNLWIP_LWIP_TARBALL or TUNLWIP_LWIP_DIR instead"
    got=""
    for v in $versions; do
        echo "fetching Debian source package $PACKAGE=$v with apt-get"
        if (cd "$state" && apt-get "${apt_opts[@]}" -qq source --download-only "$PACKAGE=$v") \
            && [[ -f "$state/$ORIG_TARBALL" ]]; then
            got=$v; break
        fi
    done
    [[ -n $got ]] || die "apt-get source could not download $ORIG_TARBALL (tried: $(echo $versions))"
    check_hash "$state/$ORIG_TARBALL" || exit 1
    mv "$state/$ORIG_TARBALL" "$tarball"
fi

check_hash "$tarball" || exit 1
echo "sha256 ok: $ORIG_TARBALL"
unpack "$tarball"
