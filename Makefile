# tunlwip developer entry points. Everything installs itself: `make test` on a fresh machine works.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tunlwip-installed
APT_PACKAGES := iproute2 iputils-ping curl iperf3 nginx-light dnsutils unbound openssl systemd xz-utils gcc \
                python3-dev
# Only `make bench` needs these (the peers it measures and the DNS load generator).
BENCH_APT_PACKAGES := slirp4netns passt dnsperf
BENCH_ARGS ?=
SOAK_ARGS ?=
SRC := $(shell find src/tunlwip -name '*.c' -o -name '*.h') build_ffi.py pyproject.toml setup.py \
       $(wildcard vendor/lwip/port/*.h vendor/lwip/port/arch/*.h)

.PHONY: install test unit lint demo clean distclean sysdeps lwip bench benchdeps soak

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
	$(PY) -m ruff check src tests examples bench
	$(PY) -m mypy
	$(PY) -m pytest -q -ra

unit: install
	$(PY) -m pytest -q -ra --ignore=tests/integration

lint: install
	$(PY) -m ruff check src tests examples bench
	$(PY) -m ruff format --check src tests examples bench
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
	rm -rf build dist src/*.egg-info src/tunlwip/_lwip*.so src/tunlwip/_lwip.c

distclean: clean
	rm -rf $(VENV) vendor/lwip/upstream vendor/lwip/.cache
