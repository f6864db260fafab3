#!/usr/bin/env bash
# Fetch lwIP 2.1.3 from Debian's package registry, verify it, unpack it into vendor/lwip/upstream/.
#
# Why this shape: no lwIP file is ever committed. The package client (apt-get) downloads the
# `lwip` source package; a deb-src entry is derived from this machine's own apt sources into a
# private apt state folder, so the system's apt configuration is never changed. The orig tarball
# is checked against a pinned sha256 before anything is unpacked. Idempotent: a verified tree
# that is already unpacked is left alone.
set -euo pipefail

PACKAGE=lwip
VERSION=2.1.3+dfsg1-2
ORIG_TARBALL=lwip_2.1.3+dfsg1.orig.tar.xz
ORIG_SHA256=0a8276d09fc4e97bbba2f953d74af2388fc2195ea156be9d7589e297a68fde24

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
dest="$here/upstream"
stamp="$dest/.tunlwip-verified"
cache="$here/.cache"

die() { echo "vendor/lwip/fetch.sh: error: $*" >&2; exit 1; }

if [[ -f "$stamp" && "$(cat "$stamp")" == "$ORIG_SHA256" && -f "$dest/src/core/tcp.c" ]]; then
    echo "lwIP $VERSION already present in vendor/lwip/upstream (sha256 verified)"
    exit 0
fi

command -v apt-get >/dev/null || die "apt-get (the Debian package client) is missing; install apt or unpack $ORIG_TARBALL (sha256 $ORIG_SHA256) into $dest yourself"
command -v sha256sum >/dev/null || die "sha256sum is missing (coreutils)"
command -v tar >/dev/null || die "tar is missing"
command -v xz >/dev/null || die "xz is missing (apt-get install xz-utils)"

mkdir -p "$cache"
tarball="$cache/$ORIG_TARBALL"

verify() { [[ -f "$tarball" ]] && echo "$ORIG_SHA256  $tarball" | sha256sum --check --status; }

if ! verify; then
    rm -f "$tarball"
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
    echo "fetching Debian source package $PACKAGE=$VERSION with apt-get"
    apt-get "${apt_opts[@]}" -qq update || die "apt-get update of the derived deb-src lists failed"
    (cd "$state" && apt-get "${apt_opts[@]}" -qq source --download-only "$PACKAGE=$VERSION") \
        || die "apt-get source could not download $PACKAGE=$VERSION"
    [[ -f "$state/$ORIG_TARBALL" ]] || die "apt-get source did not produce $ORIG_TARBALL"
    mv "$state/$ORIG_TARBALL" "$tarball"
    verify || { rm -f "$tarball"; die "sha256 mismatch for $ORIG_TARBALL (expected $ORIG_SHA256); refusing to unpack"; }
fi

echo "sha256 ok: $ORIG_TARBALL"
rm -rf "$dest" "$dest.tmp"
mkdir -p "$dest.tmp"
tar -xJf "$tarball" -C "$dest.tmp" --strip-components=1
[[ -f "$dest.tmp/src/core/tcp.c" ]] || die "unexpected tarball layout: src/core/tcp.c missing"
echo "$ORIG_SHA256" > "$dest.tmp/.tunlwip-verified"
mv "$dest.tmp" "$dest"
echo "lwIP $VERSION unpacked into vendor/lwip/upstream"
