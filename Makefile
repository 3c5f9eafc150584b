# circuits: `make demo` and `make test` are the whole Quickstart (see README.md).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# What a fresh Debian machine lacks to build the C core and the venv; what
# guests in network namespaces need (libnftables1 is what pip-nftables wraps;
# the nft command is for tests that play an admin, and for people); and the
# unmodified programs the preload library's tests and `circuits bench apps` run.
APT_PACKAGES := build-essential python3-dev python3-venv libffi-dev nftables libnftables1 curl \
                redis-server redis-tools nginx-light wrk iperf3 socat netcat-openbsd dnsmasq-base
STAMP := $(VENV)/.installed

.PHONY: setup deps demo test ctest bench clean

setup: $(STAMP)

deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ] && command -v apt-get >/dev/null; then \
	  sudo=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  echo "installing: $$missing"; \
	  rc=/usr/sbin/policy-rc.d; made=; \
	  if [ ! -e $$rc ]; then printf '#!/bin/sh\nexit 101\n' | $$sudo tee $$rc >/dev/null && $$sudo chmod +x $$rc && made=1; fi; \
	  $$sudo apt-get update -q && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -q $$missing; \
	  status=$$?; [ -z "$$made" ] || $$sudo rm -f $$rc; \
	  for svc in nginx redis-server; do $$sudo service $$svc stop >/dev/null 2>&1 || true; done; \
	  exit $$status; \
	fi

$(STAMP): pyproject.toml setup.py circuits/ring/_build.py $(wildcard circuits/ring/csrc/*) \
          $(wildcard circuits/preload/*.c circuits/preload/*.h)
	$(MAKE) deps
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: setup
	$(VENV)/bin/circuits bench ring --quick --rounds 3 --size 65536 --size 1024
	$(PY) examples/demo.py

test: setup
	$(PY) -m pytest -q

ctest:
	$(MAKE) -C tests/c check

bench: setup
	$(MAKE) -s -C tests/c bench
	$(VENV)/bin/circuits bench ring

clean:
	rm -rf $(VENV) build *.egg-info circuits/ring/_ring*.so circuits/ring/_ring.c \
	      circuits/preload/*.so tests/c/build
