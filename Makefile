# `make run` and `make test` work on a fresh machine: each creates .venv and installs what it needs.
VENV ?= .venv
BIN := $(VENV)/bin
PKI ?= ./pki
LISTEN ?= 127.0.0.1:8883

.PHONY: setup sysdeps run broker test lint unit clean

$(BIN)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[server,dev]'
	touch $@

# The [server] extra (controller, broker, `fleet` CLI) and the test tools; the agent alone needs
# neither (deploy/install-agent.sh installs the wheel without extras).
setup: $(BIN)/.installed

# System packages the tests use (mosquitto, docker-compose, nftables, ...; the list is in the
# script): installed when run as root, otherwise one line says which are missing and how to install them.
sysdeps:
	@sh .ci/sysdeps.sh

# The main job: the whole system on one machine (PKI, embedded broker, controller, real agents,
# three staged rollouts including a bad release that is rolled back), then a summary; exit 0 = all good.
run: setup
	$(BIN)/fleet demo

# A mutual-TLS broker with freshly generated certificates, ready for agents.
broker: setup
	@test -f $(PKI)/ca.pem || $(BIN)/fleet certs init $(PKI)
	@test -f $(PKI)/devices/gw-0001/cert.pem || $(BIN)/fleet certs device $(PKI) gw-0001
	$(BIN)/fleet broker --certs $(PKI) --listen $(LISTEN)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

unit: setup
	$(BIN)/pytest -q

# Everything CI runs: system packages, style, types, layering, then the tests against real brokers.
test: sysdeps lint unit

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
