# make test : create .venv if missing, install the pinned requirements, run the test suite
# make demo : install, then run the demos into demo_out/ (P1 and P4 on shipped weights; P2, P3, P5 when given their weights)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export MPLCONFIGDIR := $(CURDIR)/.mplconfig

.PHONY: install test demo clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements.txt | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	bash scripts/demo.sh

clean:
	rm -rf demo_out .pytest_cache .mplconfig
