# llmpipe developer entry points. Everything runs from the checkout through a cached venv
# (scripts/bootstrap); nothing is installed into the system Python.
SHELL := /bin/bash
VENV = $(shell scripts/bootstrap)
PY = PYTHONPATH=$(CURDIR):$(CURDIR)/operator:$(CURDIR)/stage_image $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install fetch-model lint typecheck test test-nodes test-unit test-cluster test-dataplane serve bench control-plane proto

install:            ## create the cached venv (torch, transformers, kopf, ...)
	@scripts/bootstrap >/dev/null

fetch-model:        ## fetch (once, cached) the default model: SmolLM2-135M-Instruct as GGUF
	@scripts/fetch-model

proto:              ## regenerate the stage gRPC code from the .proto
	@$(PY) -m llmpipe_stage.proto.build

lint: install       ## ruff + import-linter layer contracts
	$(VENV)/bin/ruff check llmpipe_cli llmpipe_common operator stage_image tests bench scripts
	$(VENV)/bin/ruff format --check llmpipe_cli llmpipe_common operator stage_image tests bench
	cd $(CURDIR) && PYTHONPATH=operator:stage_image $(VENV)/bin/lint-imports

typecheck: install  ## mypy (strict on the pure packages)
	MYPYPATH=operator:stage_image $(VENV)/bin/mypy -p llmpipe_cli -p llmpipe_common -p llmpipe_operator -p llmpipe_stage

control-plane:      ## build (cached) the Kubernetes binaries used by cluster tests
	@scripts/build-k8s-tools

test: install       ## the whole suite: lint, types, unit, cluster (builds the control plane once), dataplane
	@scripts/test $(PYTEST_ARGS)

test-nodes: install ## the opt-in nodes tier as root: real kubelets, images built with buildah (~30 min cold, minutes warm; docs/real-nodes.md)
	LLMPIPE_NODES=1 scripts/test -m nodes -s $(PYTEST_ARGS)

test-unit: install
	$(PY) -m pytest -m unit $(PYTEST_ARGS)

serve: install      ## a 2-stage pipeline of SmolLM2-135M-Instruct on this machine (OpenAI API on :8000; ARGS="--model demo" for the offline random model)
	$(PY) -m llmpipe_cli serve $(ARGS)

bench: install      ## benchmarks (print figures; see docs/benchmarks.md)
	$(PY) bench/planner.py
	$(PY) bench/dataplane.py
	$(PY) bench/replan.py
