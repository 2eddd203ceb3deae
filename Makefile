# Two commands (see README): `make demo` runs the main job, `make test` runs every test.
# Both set up from a fresh clone: a virtualenv from requirements-dev.txt and Azurite from npm.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test unit lint setup clean

setup: $(VENV)/.installed node_modules/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	# the `pkictl` command (pyproject.toml's console script), editable: .venv/bin/pkictl runs this checkout
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

node_modules/.installed: package.json package-lock.json $(wildcard patches/*.patch)
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

demo: setup
	$(PY) -m pkictl demo

# Two pytest-xdist workers, each with its own emulators and Azurite on free ports: most integration time is
# spent waiting (queue polls, leases, Retry-After), so two overlap well even on 2 cores.
test: setup lint
	$(PY) -m pytest -n 2

# The fast loop: everything that needs neither Azurite nor the emulators' processes.
unit: setup lint
	$(PY) -m pytest -m "not integration and not slow"

# ruff with the project's configuration (pyproject.toml); CI runs it first, through `make test`.
lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) node_modules .pytest_cache .hypothesis
