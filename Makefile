# The two commands: `make run` and `make test`. Both bootstrap .venv from nothing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= configs/default.yaml
TEST_WORKERS ?= 2
export TF_CPP_MIN_LOG_LEVEL ?= 3

.PHONY: run test bootstrap bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

bootstrap: $(STAMP)

run: $(STAMP)
	$(BIN)/hessdiag run $(CONFIG)

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python scripts/bench_engines.py

clean:
	rm -rf $(VENV) results
