# One-command set-up: `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: help demo test install clean

help:
	@echo "make demo     create .venv, install aigc, train the quickstart preset, write runs/demo/grid.png"
	@echo "make test     run the test suite (CPU only, a few minutes)"
	@echo "make install  create .venv and install aigc (editable) with the test tools"
	@echo "make clean    remove .venv, runs/demo and build files (your other runs/ stay)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall when the dependency list changes. Editable, with the setuptools backend.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --upgrade --quiet pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	rm -rf runs/demo
	$(BIN)/aigc train --preset quickstart --out runs/demo
	$(BIN)/aigc sample runs/demo --n 64 --seed 0 --out runs/demo/grid.png
	@echo "sample grid: $(CURDIR)/runs/demo/grid.png"

# One pytest worker per core, at most 8 (pytest-xdist; more gain little and each holds torch in
# memory); each runs torch on one thread (tests/conftest.py). worksteal: an idle worker takes tests
# from a busy one, so the long end-to-end tests do not queue behind one worker at the end.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --maxprocesses 8 --dist worksteal

clean:
	rm -rf $(VENV) runs/demo .pytest_cache *.egg-info
