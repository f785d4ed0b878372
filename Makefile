# Every target installs into ./.venv first if needed, so each works on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROFILE ?= quick
WORKDIR ?= runs
# Extra flags of experiments/reproduce.py, e.g. ARGS=--parts=images.
ARGS ?=

.PHONY: install test demo check-data bench reproduce-figures clean

install: $(STAMP)

$(STAMP): setup.py constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "biasdiff needs Python 3.11; set PYTHON=/path/to/python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

test: install
	$(PY) -m pytest -q tests

demo: install
	$(PY) experiments/demo.py --workdir $(WORKDIR)/demo

check-data: install
	$(PY) experiments/check_hierarchical.py --workdir $(WORKDIR)/check

reproduce-figures: install
	$(PY) experiments/reproduce.py --config=configs/reproduce.py:$(PROFILE) --workdir=$(WORKDIR)/$(PROFILE) $(ARGS)

bench: install
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,bench]'
	$(PY) benchmarks/run.py --output docs/benchmarks.md

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
