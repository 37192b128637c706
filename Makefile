# Two commands on a fresh machine: `make quickstart` (set up, prepare the P1 assets, run the
# default recipe on a local Ray) and `make test` (set up if needed, run the default test tiers).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup install assets quickstart test test-slow bench clean

setup: install assets

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

assets: $(STAMP)
	$(BIN)/relayquant assets prepare

quickstart: setup
	$(BIN)/relayquant quantize --config jobs/configs/p1-rtn-w4.yaml

# two pytest workers, each taking whole test files (a file's module-scoped Ray is its own):
# the tests spend much of their time starting processes, which two workers overlap. A failed
# test runs once more and the summary names it (R): CI failed once (stop 37) where two runs
# of the same commit on fresh clones passed; a test that fails twice still fails the run
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile --reruns 1 --reruns-delay 5 -r fER

test-slow: setup
	$(BIN)/python -m pytest -m slow

bench: setup
	$(BIN)/python benchmarks/depth_memory.py
	$(BIN)/python benchmarks/p1_rtn.py
	$(BIN)/python benchmarks/p1_export.py

clean:
	rm -rf $(VENV) runs
