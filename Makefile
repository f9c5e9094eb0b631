# healthgate: `make run` starts the agent with config/healthgate.toml, `make test` runs the tests,
# `make soak` the 10-minute soak (HEALTHGATE_SOAK_SECONDS to change it), `make test-systemd` the shipped
# unit under a real systemd in a container (root; about 3 minutes), `make fuzz` the differential fuzz of the
# fast responder with fresh inputs (HEALTHGATE_FUZZ_EXAMPLES per property, default 2000), `make mutate` the mutation
# testing of the trust core with mutmut (agent/serving/decision.py, access.py, text.py, verdict.py, admin.py,
# serving/admin_watch.py against the fast in-process tests; about a minute, not in CI; docs/mutation.md). All
# create .venv when missing.
#
# Other interpreters and loops (see CONTRIBUTING.md):
#   make test PY=3.13                      the suite on Python 3.13, in its own .venv-3.13
#   make test HEALTHGATE_LOOP=asyncio      in-process tests and every agent the tests start on that loop
#   make serving                           only the engine and serving tests (the `serving` marker)
#   make test-plain                        the serving tests against `pip install .` (no uvloop), asyncio
#   make pythons                           the serving tests on every supported Python with both loops

PY ?=
ifneq ($(PY),)
# python$(PY) from PATH when it runs (a pyenv shim of a version that is not selected does not), else the one
# pyenv has installed. No machine path is written here: PATH and pyenv are the machine's own business.
find_python = $(firstword $(foreach p,python$(1) $(shell pyenv prefix $(1) 2>/dev/null)/bin/python$(1),\
  $(shell $(p) -c 'import ssl, venv' >/dev/null 2>&1 && command -v $(p))))
PYTHON := $(call find_python,$(PY))
ifeq ($(PYTHON),)
$(error Python $(PY) not found: neither python$(PY) on PATH nor `pyenv prefix $(PY)` runs)
endif
VENV ?= .venv-$(PY)
endif
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= config/healthgate.toml
PYTEST_ARGS ?=
BENCH_ARGS ?=
# auto: the loop `healthgate run --loop auto` picks (uvloop when installed); asyncio or uvloop to force one.
HEALTHGATE_LOOP ?= auto
export HEALTHGATE_LOOP
SUPPORTED := 3.11 3.12 3.13

.PHONY: run test test-venv serving soak test-systemd fuzz mutate lint bench venv clean test-plain pythons python-path

# `venv` is what the agent needs (the fast extra: uvloop); `test-venv` adds the test tools.
venv: $(VENV)/.installed
test-venv: $(VENV)/.test-installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[fast]'
	touch $@

$(VENV)/.test-installed: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,fast]'
	touch $@

# The agent refuses root unless the config allows it: say so, and how to go on, before installing anything.
run:
	@if [ "$$(id -u)" = 0 ] && ! grep -Eq '^[[:space:]]*allow_root[[:space:]]*=[[:space:]]*true' '$(CONFIG)' 2>/dev/null; then \
	  echo "healthgate refuses to run as root. Either run make as an ordinary user who may write this checkout:" >&2; \
	  user=$${SUDO_USER:-$$(stat -c %U . 2>/dev/null)}; [ -n "$$user" ] && [ "$$user" != root ] || user=USER; \
	  echo "  sudo -u $$user make run" >&2; \
	  echo "or allow root in a local copy of the config (not recommended):" >&2; \
	  echo "  (echo '[agent]'; echo 'allow_root = true'; cat $(CONFIG)) > config/healthgate.local.toml" >&2; \
	  echo "  make run CONFIG=config/healthgate.local.toml" >&2; \
	  exit 1; fi
	@$(MAKE) --no-print-directory venv
	$(BIN)/healthgate run -c $(CONFIG)

test: test-venv
	$(BIN)/python -m pytest -m 'not slow and not systemd_boot' $(PYTEST_ARGS)

serving: test-venv
	$(BIN)/python -m pytest -m 'serving and not slow' $(PYTEST_ARGS)

soak: test-venv
	$(BIN)/python -m pytest -m slow -p no:cacheprovider -s $(PYTEST_ARGS)

test-systemd: test-venv
	$(BIN)/python -m pytest -m systemd_boot -p no:cacheprovider -s tests/test_systemd_boot.py $(PYTEST_ARGS)

fuzz: test-venv
	HEALTHGATE_FUZZ_EXAMPLES=$${HEALTHGATE_FUZZ_EXAMPLES:-2000} $(BIN)/python -m pytest -p no:cacheprovider \
		--hypothesis-show-statistics tests/test_fasthealth_fuzz.py $(PYTEST_ARGS)

# Mutation testing: mutmut mutates the modules [tool.mutmut] in pyproject.toml names and runs the tests it
# lists against every mutant, then lists the survivors. A fresh run each time: the report in docs/mutation.md
# is of a whole run. MUTATE_ARGS passes mutant names (globs) to run only those, e.g. 'agent.text.*'.
MUTATE_ARGS ?=
mutate: venv $(VENV)/.mutate-installed
	rm -rf mutants
	$(BIN)/mutmut run $(MUTATE_ARGS)
	$(BIN)/mutmut results

$(VENV)/.mutate-installed: pyproject.toml
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,fast,mutate]'
	touch $@

# A plain install as a node gets it: `pip install .`, not editable and without the fast extra (no uvloop),
# plus the test tools. The tests import the installed package, not the checkout: PYTHONSAFEPATH keeps the
# current directory off sys.path (in the agents the tests start, too) and --import-mode=append puts the
# checkout, for `tests`, after site-packages. Reinstalled whenever a file of the package changes.
PLAIN := $(VENV)-plain
test-plain: $(PLAIN)/.installed
	PYTHONSAFEPATH=1 HEALTHGATE_INSTALLED=1 HEALTHGATE_LOOP=asyncio \
	  $(PLAIN)/bin/python -m pytest --import-mode=append -p no:cacheprovider -m 'serving and not slow' $(PYTEST_ARGS)

$(PLAIN)/.installed: pyproject.toml $(shell find agent -type f -not -name '*.pyc' 2>/dev/null)
	test -x $(PLAIN)/bin/python || $(PYTHON) -m venv $(PLAIN)
	$(PLAIN)/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PLAIN)/bin/python -m pip install --quiet --disable-pip-version-check '.[test]'
	rm -rf build
	touch $@

# The serving tests on every supported Python, with both loops. Outside CI a Python this machine lacks is
# skipped with a note; in CI (CI=true) it is a failure.
pythons:
	@status=0; for v in $(SUPPORTED); do \
	  if ! $(MAKE) -s --no-print-directory PY=$$v python-path >/dev/null 2>&1; then \
	    if [ "$${CI:-}" = true ]; then echo "Python $$v not found" >&2; status=1; \
	    else echo "Python $$v not found: skipped"; fi; continue; fi; \
	  for loop in asyncio uvloop; do \
	    $(MAKE) --no-print-directory PY=$$v HEALTHGATE_LOOP=$$loop serving || status=1; \
	  done; \
	done; exit $$status

python-path:
	@command -v $(PYTHON)

# ruff, then the type checker (its settings, strict on the pure core, are [tool.mypy] in pyproject.toml).
lint: test-venv
	$(BIN)/ruff check agent tests bench
	$(BIN)/mypy

bench: test-venv $(VENV)/.bench-installed
	$(BIN)/python -m bench.run $(BENCH_ARGS)

$(VENV)/.bench-installed: $(VENV)/.test-installed
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,fast,bench]'
	touch $@

clean:
	rm -rf .venv .venv-* .pytest_cache build *.egg-info mutants
