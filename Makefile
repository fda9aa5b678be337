# The two set-up commands: `make demo` and `make test`. Both create .venv and install what they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test lint bench clean system-deps browser-deps test-deps install

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

# What only the tests need: nftables (packet loss inside a private network namespace) and libfaketime (a gateway
# process whose wall clock jumps).
test-deps:
	@{ command -v nft >/dev/null 2>&1 && [ -e /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 -o -e \
	  /usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1 ]; } || { \
	  echo "installing nftables and faketime with apt"; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nftables faketime; }

test: system-deps browser-deps test-deps $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Install the services on this Debian / Raspberry Pi OS machine (see docs/install.md), e.g.
# `make install INSTALL_ARGS="--portal --broker"`; INSTALL_ARGS=--dry-run shows the steps only.
install:
	$(SUDO) scripts/install.sh $(INSTALL_ARGS)

lint: $(TEST_STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
