# kubetune developer commands. `make test` is what CI runs (.ci/run).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Extras installed by `make setup`: everything, so that `make test` runs every suite (the trainer brings torch).
EXTRAS ?= operator,local,dev,trainer
CRD    := crds/kubetune.io_finetunejobs.yaml
MS_CRD := crds/kubetune.io_modelservers.yaml
comma  := ,
SOURCES := api/kubetune_api operator/kubetune_operator trainer/kubetune_trainer local/kubetune_local cli/kubetune_cli

.PHONY: setup lint test unit binaries kueue registry prometheus integration crds lock clean demo demo-down

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
unit: binaries prometheus
	$(BIN)/pytest -m unit

## binaries: build the control-plane binaries and Karpenter (KWOK) once (cached in ~/.cache/kubetune; ~11 + ~7 min the first time)
binaries: setup
	$(BIN)/kubetune local build

## kueue: real Kueue (v0.17.0) for the local runtime (`kubetune local up --kueue`), built once (~13 min)
kueue: binaries
	$(BIN)/kubetune local build --kueue

## registry: Debian's docker-registry, the real OCI registry of the publish tests (apt-get; sudo unless root)
registry:
	@test -x /usr/bin/docker-registry || { \
		SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
		$$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-registry; }

## prometheus: Debian's Prometheus and promtool, the real Prometheus of the alert and dashboard tests (apt-get; sudo unless root)
prometheus:
	@test -x /usr/bin/prometheus -a -x /usr/bin/promtool || { \
		SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
		$$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; }

## integration: the tests against the local runtime's real control plane
integration: binaries kueue registry prometheus
	$(BIN)/pytest -m integration

## test: everything CI runs: lint, unit and integration tests
test: lint binaries kueue registry prometheus
	$(BIN)/pytest

## demo: start the local runtime and the operator, train and serve examples/local.yaml, ask the adapter
demo: binaries
	$(BIN)/kubetune demo

## demo-down: stop the demo's cluster, operator and pods
demo-down: setup
	$(BIN)/kubetune local down

## crds: regenerate the committed CRD from the models
crds: setup
	$(BIN)/kubetune crd --output $(CRD)
	cp $(CRD) charts/kubetune/crds/
	$(BIN)/kubetune crd --reference --output docs/reference.md
	$(BIN)/kubetune crd --kind ModelServer --output $(MS_CRD)
	cp $(MS_CRD) charts/kubetune/crds/
	$(BIN)/kubetune crd --kind ModelServer --reference --output docs/modelserver-reference.md

## lock: rewrite constraints.txt from the current environment
lock: setup
	{ head -n 2 constraints.txt; $(BIN)/pip freeze --exclude-editable | grep -v '^kubetune'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
