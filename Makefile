# vapi-gateway: every target bootstraps its own virtualenv from nothing but python3.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= etc/vapi-gateway.ini
# Development secrets for the shipped config's env: references, made once per checkout
# (random, git-ignored).  Values already in your environment win.
DEV_SECRETS := .dev-secrets.env
WITH_SECRETS := set -a && . ./$(DEV_SECRETS) && set +a &&

.PHONY: install test test-fast lint run check-config demo bench bench-cluster soak fuzz clean

install: $(STAMP)

$(STAMP): setup.py setup.cfg
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]' --config-settings editable_mode=compat
	$(BIN)/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
	touch $(STAMP)

# The test command (CI runs exactly this): lint, types, then the suite.  Two Debian
# packages are used when present (.ci/run installs them; elsewhere their tests skip):
# systemd (systemd-analyze checks the units) and redis-server (the cluster tests run a
# throw-away Redis: apt-get install redis-server).
test: install lint
	$(BIN)/python -m pytest -q

# The unit suite only (about a minute): everything but the real-daemon tests.
test-fast: install
	$(BIN)/python -m pytest -q -x -m "not e2e"

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

$(DEV_SECRETS):
	@for name in TWILIO_AUTH_TOKEN STREAM_TOKEN_SECRET VAPI_API_KEY VAPI_WEBHOOK_SECRET; do \
	  echo "$$name=\"\$${$$name:-dev-$$($(PYTHON) -c 'import secrets; print(secrets.token_hex(20))')}\""; \
	done > $@
	@echo "wrote $@ (development secrets; export real values to override)"

run: install $(DEV_SECRETS)
	$(WITH_SECRETS) $(BIN)/twistd -n --pidfile= vapi-gateway --config $(CONFIG)

check-config: install $(DEV_SECRETS)
	$(WITH_SECRETS) $(BIN)/twistd vapi-gateway --config $(CONFIG) --check

demo: install $(DEV_SECRETS)
	$(WITH_SECRETS) $(BIN)/python -m gateway.demo --config $(CONFIG)

# Capacity under load on loopback (about 5 minutes): one table on stdout and
# bench/results/capacity.json.  RUNS="speak:200,echo:250x1" WINDOW=20 choose the runs.
bench: install
	$(BIN)/python bench/load.py $(if $(RUNS),--runs $(RUNS)) $(if $(WINDOW),--window $(WINDOW))

# The cluster over Redis (about 4 minutes; needs redis-server): the time from a status
# callback on instance A to the call's media socket closing on instance B (p50/p99 over
# 100 calls) and the CPU of registry upkeep per call; a table and bench/results/cluster.json.
# BENCH_CLUSTER_ARGS="--calls 20 --rounds 1" for a quick run.
bench-cluster: install
	$(BIN)/python bench/bench_cluster.py $(BENCH_CLUSTER_ARGS)

# The leak soak: 5,000 short calls through the real daemon (about 10 minutes); a table
# and soak.json.  A 200-call version runs in `make test`.
soak: install
	$(BIN)/python bench/soak.py --json soak.json $(SOAK_ARGS)

# Coverage-guided (atheris, else hypothesis) fuzzing of every parser of outside input,
# FUZZ_SECONDS per target; exits 1 on any crash.
FUZZ_SECONDS ?= 60
fuzz: install
	$(BIN)/python -m pip install --quiet atheris || echo "atheris unavailable: using hypothesis"
	$(BIN)/python bench/fuzz.py --seconds $(FUZZ_SECONDS)

clean:
	rm -rf $(VENV) build dist *.egg-info twisted/plugins/dropin.cache
