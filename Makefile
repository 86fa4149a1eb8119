# Two entry points (see README): `make demo` runs the main job, `make test` runs the suite.
# Both start with the same idempotent set-up: the virtual environment in .venv/ and the offline data.
PY := .venv/bin/python
PIP := .venv/bin/pip
PYTHON ?= python3

.PHONY: setup env data demo test lint bench clean-runs

setup: env data

# Re-installs only when pyproject.toml changed since the last install.
env: .venv/.installed
.venv/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[dev,ray]'
	@touch $@

data:
	bash scripts/setup_data.sh
	bash scripts/setup_browser.sh

demo: setup
	.venv/bin/vitrina demo

test: setup
	$(PY) -m pytest -q

lint: env
	.venv/bin/ruff check .

bench: setup
	for b in bench/[a-z]*.py; do $(PY) $$b || exit 1; done

clean-runs:
	rm -rf runs/demo
