# The two set-up commands: `make demo` and `make test`. Both create .venv and install what they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test check lint format bench clean system-deps browser-deps test-deps install

$(VENV)/bin/python:
	@$(PY) -c "import ensurepip, venv" 2>/dev/null || { \
	  echo "installing python3-venv with apt"; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv; }
	$(PY) -m venv $(VENV)

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install -q -e .
	touch $@

$(TEST_STAMP): pyproject.toml $(STAMP)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

# Mosquitto from apt when it is missing (the demo and the tests start their own broker process).
system-deps:
	@command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || { \
	  echo "installing mosquitto with apt"; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto; }

# Debian's Chromium for the browser tests (Playwright drives /usr/bin/chromium; its own download is not used).
browser-deps:
	@{ [ -x /usr/bin/chromium ] && dpkg -s fonts-noto-cjk >/dev/null 2>&1; } || { \
	  echo "installing chromium and CJK fonts with apt"; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-noto-cjk; }

demo: system-deps $(STAMP)
	$(BIN)/gatehouse demo $(DEMO_ARGS)

# What only the tests need: nftables (packet loss inside a private network namespace), libfaketime (a gateway
# process whose wall clock jumps) and PostgreSQL (the tests start their own server from its initdb and pg_ctl, under
# /usr/lib/postgresql/<version>/bin, to run the portal's store on it).
test-deps:
	@{ { command -v nft || [ -x /usr/sbin/nft ]; } >/dev/null 2>&1 && [ -e /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 -o -e \
	  /usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1 ]; } || { \
	  echo "installing nftables and faketime with apt"; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nftables faketime; }
	@ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || { \
	  echo "installing postgresql with apt"; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; }

# The static checks: lint, types, the architecture's import contracts. (`ruff format --check .` joins them once the
# tree has been formatted: `make format`.)
STATIC = $(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/lint-imports --no-logo && $(BIN)/mypy

# The whole suite, in two phases: first every test but the `realtime` ones in TEST_WORKERS processes (pytest-xdist;
# a worker that finishes early takes queued tests from the others; most tests wait on brokers, gateways, portals and
# browsers), then the `realtime` ones (rates, latencies and timers held to the wall clock) alone, one at a time, so
# that the first phase's load cannot fail them. Both phases run whatever the first gave; either failing fails the
# command. TEST_WORKERS=0 runs the first phase in one process too. A few tests need root outside any namespace (a
# tmpfs, a port given to dialout, a command run as `nobody`: tests/privileged.py): a normal user is asked for the
# sudo password once, here, and they use `sudo -n`. PYTEST_ARGS go to both phases (exit 5, nothing selected, is fine).
TEST_WORKERS ?= 3

test: system-deps browser-deps test-deps $(TEST_STAMP)
	$(STATIC)
	@[ "$$(id -u)" = 0 ] || sudo -v
	@rc=0; \
	$(BIN)/python -m pytest -m "not realtime" -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS) || [ $$? = 5 ] || rc=1; \
	$(BIN)/python -m pytest -m realtime -n 0 $(PYTEST_ARGS) || [ $$? = 5 ] || rc=1; \
	exit $$rc

# The edit-test loop: the static checks and the tests that start no process (tests/tiers.py finds which), less the
# long ones (slow: bounded fuzzing, bulk rows).
check: $(TEST_STAMP)
	$(STATIC)
	$(BIN)/python -m pytest -q -m "not process and not slow" $(PYTEST_ARGS)

format: $(TEST_STAMP)
	$(BIN)/ruff format .

# Install the services on this Debian / Raspberry Pi OS machine (see docs/install.md), e.g.
# `make install INSTALL_ARGS="--portal --broker"`; INSTALL_ARGS=--dry-run shows the steps only.
install:
	$(SUDO) scripts/install.sh $(INSTALL_ARGS)

lint: $(TEST_STAMP)
	$(STATIC)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
