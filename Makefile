# healthgate: `make run` starts the agent with config/healthgate.toml, `make test` runs the tests,
# `make soak` the 10-minute soak (HEALTHGATE_SOAK_SECONDS to change it), `make test-systemd` the shipped
# unit under a real systemd in a container (root; about 3 minutes), `make fuzz` the differential fuzz of the
# fast responder with fresh inputs (HEALTHGATE_FUZZ_EXAMPLES per property, default 2000). All create .venv when missing.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= config/healthgate.toml
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: run test soak test-systemd fuzz lint bench venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,fast]'
	touch $@

run: venv
	$(BIN)/healthgate run -c $(CONFIG)

test: venv
	$(BIN)/python -m pytest -m 'not slow and not systemd_boot' $(PYTEST_ARGS)

soak: venv
	$(BIN)/python -m pytest -m slow -p no:cacheprovider -s $(PYTEST_ARGS)

test-systemd: venv
	$(BIN)/python -m pytest -m systemd_boot -p no:cacheprovider -s tests/test_systemd_boot.py $(PYTEST_ARGS)

fuzz: venv
	HEALTHGATE_FUZZ_EXAMPLES=$${HEALTHGATE_FUZZ_EXAMPLES:-2000} $(BIN)/python -m pytest -p no:cacheprovider \
		--hypothesis-show-statistics tests/test_fasthealth_fuzz.py $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check agent tests bench

bench: venv $(VENV)/.bench-installed
	$(BIN)/python -m bench.run $(BENCH_ARGS)

$(VENV)/.bench-installed: pyproject.toml
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,fast,bench]'
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
