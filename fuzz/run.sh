#!/usr/bin/env bash
# Run one fuzzer from the committed corpus; fail loudly on any finding.
#   fuzz/run.sh packet|dns|socks5|http_connect [libFuzzer options...]   (from the repository root)
#   fuzz/run.sh merge KIND                              minimise build corpus into fuzz/corpus
# The committed corpus (fuzz/corpus/KIND) is copied to fuzz/build/corpus/KIND, where new inputs
# go; findings (crash-*, leak-*, timeout-*, oom-*) go to fuzz/build/artifacts/KIND/.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=fuzz/build
# libFuzzer's -merge re-runs argv[0]: the Python fuzzers are then started by their #! line, which
# must find the venv's python (atheris, tunlwip).
export PATH="$PWD/.venv/bin:$PATH"

fuzzer() { # the command line of harness $1
    case "$1" in
        packet) echo "$BUILD/packet_fuzzer -max_len=66000 -timeout=25" ;;
        dns) echo "fuzz/dns_fuzzer.py -max_len=4096 -timeout=25" ;;
        socks5) echo "fuzz/socks5_fuzzer.py -max_len=600 -timeout=25" ;;
        http_connect) echo "fuzz/http_connect_fuzzer.py -max_len=1024 -timeout=25" ;;
        *) echo "unknown fuzzer: $1 (packet, dns, socks5 or http_connect)" >&2; exit 2 ;;
    esac
}

if [ "${1:-}" = merge ]; then
    kind=$2
    new=$(mktemp -d "$BUILD/merge-$kind.XXXX")
    # shellcheck disable=SC2046
    # inputs cut to 4 KiB keep almost every edge at a third of the size (fuzz/README.md)
    $(fuzzer "$kind") -max_len=4096 -merge=1 "$new" "fuzz/corpus/$kind" "$BUILD/corpus/$kind" \
        >"$BUILD/merge-$kind.log" 2>&1
    if [ -z "$(ls "$new")" ]; then
        echo "merge of the $kind corpus produced nothing; fuzz/corpus/$kind left alone (log: $BUILD/merge-$kind.log)" >&2
        exit 1
    fi
    rm -rf "fuzz/corpus/$kind" && mv "$new" "fuzz/corpus/$kind"
    echo "fuzz/corpus/$kind: $(ls "fuzz/corpus/$kind" | wc -l) files, $(du -sh "fuzz/corpus/$kind" | cut -f1)"
    exit 0
fi

kind=$1
shift
artifacts="$BUILD/artifacts/$kind"
corpus="$BUILD/corpus/$kind"
mkdir -p "$artifacts" "$corpus"
cp -n "fuzz/corpus/$kind"/* "$corpus"/ 2>/dev/null || true
log="$BUILD/$kind.log"

fail() {
    echo "FUZZ FINDING ($kind): $*" >&2
    echo "  reproduce: $(fuzzer "$kind") FILE   (see fuzz/README.md)" >&2
    exit 1
}

# Known regressions first: each must run clean.
regressions=(fuzz/regressions/"$kind"-*)
if [ -e "${regressions[0]}" ]; then
    # shellcheck disable=SC2046
    $(fuzzer "$kind") -runs=1 "${regressions[@]}" >"$BUILD/$kind-regressions.log" 2>&1 ||
        fail "a regression input fails again; log: $BUILD/$kind-regressions.log"
fi

before=$(ls "$artifacts" | grep -cE '^(crash|leak|timeout|oom)-' || true)
echo "[fuzz] $kind: $(fuzzer "$kind") $* $corpus  (log: $log)"
rc=0
# shellcheck disable=SC2046
$(fuzzer "$kind") -artifact_prefix="$artifacts/" -print_final_stats=1 "$@" "$corpus" >"$log" 2>&1 || rc=$?
grep -E '^(#[0-9]+ +DONE|Done [0-9]+ runs|stat::number_of_executed_units|stat::average_exec_per_sec)' "$log" || true
after=$(ls "$artifacts" | grep -cE '^(crash|leak|timeout|oom)-' || true)
if [ "$rc" -ne 0 ] || [ "$after" -gt "$before" ]; then
    grep -E 'ERROR|SUMMARY|runtime error|Uncaught|Traceback' "$log" | head -20 >&2 || true
    fail "exit $rc; new artifacts in $artifacts: $(ls -t "$artifacts" | head -3 | tr '\n' ' '); log: $log"
fi
echo "[fuzz] $kind: no findings"
