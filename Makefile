# Two entry points (README): `make serve` runs the main job (the game server with the default model on
# http://127.0.0.1:8000), `make test` runs the test suite.
# Both create or reuse .venv and install what is missing first (scripts/setup_env.sh).
VENV ?= .venv
STAMP := $(VENV)/.worldserve-installed

.PHONY: setup serve rollout test lint

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup_env.sh
	VENV=$(VENV) scripts/setup_env.sh
	touch $@

serve: $(STAMP)
	$(VENV)/bin/worldserve serve --config configs/default.yaml

rollout: $(STAMP)
	$(VENV)/bin/worldserve rollout --config configs/default.yaml --frames 64 --seed 0 --actions random --out out/

test: $(STAMP)
	$(VENV)/bin/ruff check engine server client tests scripts
	$(VENV)/bin/ruff format --check engine server client tests scripts
	$(VENV)/bin/python -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check engine server client tests scripts
	$(VENV)/bin/ruff format --check engine server client tests scripts
