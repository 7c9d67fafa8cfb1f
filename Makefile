# make test      : create .venv if missing, install the pinned requirements and this project (editable), run the full suite
# make test-fast : the same without the tests marked slow (DDP, torch.compile, demos, end-to-end hw2 scripts, kill -9 + resume)
# make lint      : ruff (configured in pyproject.toml) on the whole tree
# make demo      : install, then run the demos into demo_out/ (P1, i-CLEVR and P4 on shipped weights; P2, P3, P5 when given their weights)
#                  and end with the page demo_out/index.html (scripts/demo_page.py, from the JSON the steps write)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export MPLCONFIGDIR := $(CURDIR)/.mplconfig

.PHONY: install test test-fast lint demo clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements.txt pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --editable .
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

demo: $(STAMP)
	bash scripts/demo.sh

clean:
	rm -rf demo_out .pytest_cache .mplconfig
