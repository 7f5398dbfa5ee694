# kubetune developer commands. `make test` is what CI runs (.ci/run).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Extras installed by `make setup`: everything, so that `make test` runs every suite (the trainer brings torch).
EXTRAS ?= operator,local,dev,trainer
CRD    := crds/kubetune.io_finetunejobs.yaml
comma  := ,
SOURCES := operator/kubetune_operator trainer/kubetune_trainer local/kubetune_local cli/kubetune_cli

.PHONY: setup lint test unit binaries integration crds lock clean

## setup: create .venv and install kubetune with its pinned dependencies (quick when done already)
setup: $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

$(VENV)/.installed-%: pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --constraint constraints.txt --editable '.[$(EXTRAS)]'
	@touch $@

## lint: ruff, mypy --strict and the import-layer contracts
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy $(SOURCES) tests
	$(BIN)/lint-imports
	$(BIN)/hadolint Dockerfile

## unit: the unit tests (no cluster; the chart's use the helm binary built with the others)
unit: binaries
	$(BIN)/pytest -m unit

## binaries: build the control-plane binaries once (cached in ~/.cache/kubetune; ~11 min the first time)
binaries: setup
	$(BIN)/kubetune local build

## integration: the tests against the local runtime's real control plane
integration: binaries
	$(BIN)/pytest -m integration

## test: everything CI runs: lint, unit and integration tests
test: lint binaries
	$(BIN)/pytest

## crds: regenerate the committed CRD from the models
crds: setup
	$(BIN)/kubetune crd --output $(CRD)
	cp $(CRD) charts/kubetune/crds/

## lock: rewrite constraints.txt from the current environment
lock: setup
	{ head -n 2 constraints.txt; $(BIN)/pip freeze --exclude-editable | grep -v '^kubetune'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
