# vapi-gateway: every target bootstraps its own virtualenv from nothing but python3.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= etc/vapi-gateway.ini

.PHONY: install test test-fast lint run check-config demo clean

install: $(STAMP)

$(STAMP): setup.py setup.cfg
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]' --config-settings editable_mode=compat
	$(BIN)/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
	touch $(STAMP)

# The test command (CI runs exactly this): lint, types, then the suite.
test: install lint
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -x

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

run: install
	$(BIN)/twistd -n --pidfile= vapi-gateway --config $(CONFIG)

check-config: install
	$(BIN)/twistd vapi-gateway --config $(CONFIG) --check

demo: install
	$(BIN)/python -m gateway.demo --config $(CONFIG)

clean:
	rm -rf $(VENV) build dist *.egg-info twisted/plugins/dropin.cache
