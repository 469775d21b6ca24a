# Coinlytics: `make run` starts the platform, `make test` runs the tests. See README.md.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# Two workers match this 2-core machine; each gets its own database and Redis namespace.
TEST_WORKERS ?= 2

.PHONY: help install run demo test lint format bench reliability postman clean

help:
	@echo "make run          start everything (embedded PostgreSQL/Redis unless COINLYTICS_DATABASE_URL/REDIS_URL are set)"
	@echo "make demo         the same on the offline 'sim' source (simulated prices)"
	@echo "make test         the test suite"
	@echo "make lint         ruff and mypy"
	@echo "make bench        benchmarks (figures beside their baselines)"
	@echo "make reliability  long fault scenarios"
	@echo "make postman      export the API as a Postman collection"

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is needed")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing Coinlytics and its dependencies into $(VENV) ..."
	@$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	@$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	@$(VENV)/bin/coinlytics run

demo: $(STAMP)
	@COINLYTICS_SOURCES=sim COINLYTICS_DATA_DIR=$${COINLYTICS_DATA_DIR:-./.coinlytics-demo} $(VENV)/bin/coinlytics run

test: $(STAMP)
	@$(PY) -m pytest -n $(TEST_WORKERS) --basetemp=.pytest-tmp $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check coinlytics shared services tests bench
	$(VENV)/bin/ruff format --check coinlytics shared services tests bench
	$(VENV)/bin/mypy coinlytics shared services

format: $(STAMP)
	$(VENV)/bin/ruff format coinlytics shared services tests bench
	$(VENV)/bin/ruff check --fix coinlytics shared services tests bench

bench: $(STAMP)
	@$(PY) -m bench

reliability: $(STAMP)
	@$(PY) -m pytest -m reliability -p no:randomly --basetemp=.pytest-tmp-reliability $(PYTEST_ARGS)

postman: $(STAMP)
	@$(PY) -m services.gateway.postman

clean:
	rm -rf $(VENV) .pytest_cache .pytest-tmp .pytest-tmp-reliability .mypy_cache .ruff_cache *.egg-info
