# `make run`: set up .venv and run the whole pipeline (Prefect flow over dvc.yaml's stages).
# `make test`: set up .venv and run the test suite.
# `make docs`: set up .venv and build the documentation (mkdocs.yml, docs/) into site/; any warning fails it.
# `make lint`: what CI checks before the tests (ruff lint and format, mypy on ladd/, dvc.yaml's code deps).
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 90
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
VENV := .venv/bin

.PHONY: setup run test docs lint
setup:
	@bash scripts/setup.sh

run: setup
	PATH="$(CURDIR)/$(VENV):$$PATH" $(VENV)/python -m flows.pipeline .

test: setup
	PATH="$(CURDIR)/$(VENV):$$PATH" $(VENV)/python -m pytest

lint: setup
	$(VENV)/ruff check .
	$(VENV)/ruff format --check .
	$(VENV)/mypy
	$(VENV)/python scripts/stage_deps.py --check
	$(VENV)/pre-commit validate-config

docs: setup
	$(VENV)/mkdocs build --strict --site-dir site
