# make demo / make test each do the whole set-up on a fresh machine, then run.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test docs bench gpu-check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test,eval,docs]'
	$(BIN)/pip install --quiet --no-deps --target $(VENV)/simuleval-pkgs simuleval==1.1.4 TextGrid==1.6.1
	touch $(STAMP)

install: $(STAMP)

# Ends with the report's path and a three-line summary, then checks the report in headless Chromium.
demo: $(STAMP)
	$(BIN)/brisk demo
	BRISK_REPORT=report/index.html $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_report_browser.py

# The documentation site (MkDocs Material + mkdocstrings); warnings are errors, so a renamed function fails it.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

# Prints the set-up time (venv + install; ~0 s when done) and the test time (zoo training on first use included).
test:
	@start=$$(date +%s); $(MAKE) --no-print-directory install || exit $$?; setup=$$(date +%s); \
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=15 tests; rc=$$?; end=$$(date +%s); \
	echo "make test: setup $$((setup - start)) s, tests $$((end - setup)) s"; exit $$rc

# Every area at its full size; results go to benchmarks/results/*.json and BENCHMARKS.md (hours on a CPU).
bench: $(STAMP)
	$(BIN)/brisk bench all

# On a CUDA machine: own venv (.venv-gpu, reusing a preinstalled CUDA torch), `pytest -m gpu`, real-shape bench.
gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) report build site src/*.egg-info
