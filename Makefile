# vltrain: the two commands a user types on a fresh machine.
#   make demo   synthetic data -> training -> checkpoint (vltrain.demo)
#   make test   the whole test suite (what .ci/run runs)
# Both install first: Debian packages the tests need (when root with apt-get), then a
# virtualenv in .venv with `pip install -e ".[dev]"`. A second run skips what is done.

PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.installed
PYTEST_ARGS ?=
DEMO_ARGS   ?=
# Java: pycocoevalcap's METEOR and PTB tokenizer. slurm-wlm + munge: the local Slurm
# cluster of the Slurm tests (slurm/local_cluster.sh).
APT_PACKAGES := default-jre-headless slurm-wlm munge

.DEFAULT_GOAL := help
.PHONY: help install system-deps test demo clean distclean

help:
	@echo "make install   Debian packages (if root) + $(VENV) with pip install -e '.[dev]'"
	@echo "make test      install, then run the test suite (PYTEST_ARGS='-k foo' to select)"
	@echo "make demo      install, then run the end-to-end demo (python -m vltrain.demo)"
	@echo "make clean     remove caches and build outputs (distclean: also $(VENV))"

install: system-deps $(STAMP)

# Debian packages: checked every time (a few ms), installed only when missing, and only
# where we can (root with apt-get); elsewhere a note says what the tests will skip.
system-deps:
	@set -e; need=""; \
	if ! java -version >/dev/null 2>&1; then need="$$need default-jre-headless"; fi; \
	for p in slurm-wlm munge; do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || need="$$need $$p"; \
	done; \
	if ! $(PYTHON) -c 'import ensurepip, venv' >/dev/null 2>&1 && [ ! -x $(PY) ]; then need="$$need python3-venv"; fi; \
	if [ -z "$$need" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
	  echo "NOTE: not root or no apt-get: not installing$$need (tests that need them skip or fail)"; exit 0; \
	fi; \
	echo "apt-get install$$need"; \
	export DEBIAN_FRONTEND=noninteractive; \
	apt-get update -qq; \
	apt-get install -y -qq --no-install-recommends $$need

# The virtualenv: redone when setup.py changes (its dependencies live there).
$(STAMP): setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --progress-bar off --upgrade pip
	$(PY) -m pip install --progress-bar off -e ".[dev]"
	@touch $@

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: install
	$(PY) -m vltrain.demo $(DEMO_ARGS)

clean:
	rm -rf .pytest_cache build dist
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) *.egg-info
