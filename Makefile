# `make run`: set up .venv and run the whole pipeline (Prefect flow over dvc.yaml's stages).
# `make test`: set up .venv and run the test suite.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 90
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
VENV := .venv/bin

.PHONY: setup run test
setup:
	@bash scripts/setup.sh

run: setup
	PATH="$(CURDIR)/$(VENV):$$PATH" $(VENV)/python -m flows.pipeline .

test: setup
	PATH="$(CURDIR)/$(VENV):$$PATH" $(VENV)/python -m pytest
