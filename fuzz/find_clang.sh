#!/usr/bin/env bash
# Print the first clang on PATH that can link a libFuzzer target: $CLANG if set, then `clang`,
# then clang-NN, newest first. The package build does not need clang (it uses the default cc);
# only the fuzz targets do. Exit 1 with a message naming the packages when none works.
set -uo pipefail
probe=$(mktemp -d)
trap 'rm -rf "$probe"' EXIT
echo 'int LLVMFuzzerTestOneInput(const unsigned char *d, unsigned long n) { return 0; }' >"$probe/t.c"
found=""
for c in ${CLANG:-} clang $(seq -f 'clang-%g' 30 -1 11); do
    command -v "$c" >/dev/null 2>&1 || continue
    found="$found $c"
    if "$c" -fsanitize=fuzzer,address,undefined -o "$probe/t" "$probe/t.c" >/dev/null 2>&1; then
        command -v "$c"
        exit 0
    fi
done
if [[ -n $found ]]; then
    echo "fuzz: no clang here can link libFuzzer targets (tried:$found); install the matching" \
         "runtime, e.g. \`apt-get install libclang-rt-dev\` (or libclang-rt-NN-dev for clang-NN)" >&2
else
    echo "fuzz: no clang found (clang, clang-NN); install one, e.g. \`apt-get install clang" \
         "libclang-rt-dev\`, or set CLANG=/path/to/clang" >&2
fi
exit 1
