# The verbs people use. `make help` lists them.
PYTHON ?= python3.11
VENV   ?= .venv
EXTRAS ?= preprocess,train,pipelines,serve,dev
DATA   ?=
CONFIG ?= pipelines/configs/ml1m_hstu.yaml
RECML  := $(VENV)/bin/recml
PYTEST_ARGS ?=
# The test tiers (pytest markers) are selected in infra/test.sh only; PYTEST_ARGS go to pytest.
TEST   := PYTEST=$(VENV)/bin/pytest bash infra/test.sh

.PHONY: help setup test test-unit test-integration test-container run compile build bench \
        clean clean-runs docker-stop

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

setup: $(VENV)/.installed  ## create .venv with every extra, pinned by requirements/constraints.txt
$(VENV)/.installed: pyproject.toml requirements/constraints.txt
	bash infra/setup.sh $(VENV) $(EXTRAS)
	touch $@

test: setup  ## run every test tier this machine can run, one after another (CI=true: container too)
	$(TEST) $(PYTEST_ARGS)

test-unit: setup  ## unit tier only: no marker, no network, no Docker (PYTEST_ARGS="-x -k ..." go to pytest)
	$(TEST) unit $(PYTEST_ARGS)

test-integration: setup  ## integration tier only: end-to-end runs on small real data
	$(TEST) integration $(PYTEST_ARGS)

test-container: setup  ## container tier only: starts a Docker engine, fails if it can't
	$(TEST) container $(PYTEST_ARGS)

run: setup  ## the main job: the full local pipeline (DATA=local copy, else ML-1M is downloaded)
	$(RECML) run --config $(CONFIG) $(if $(DATA),--data $(DATA),)

compile: setup  ## compile the pipeline for Vertex AI to recml_pipeline.yaml
	$(RECML) compile --config $(CONFIG) --target vertex --output recml_pipeline.yaml

build: setup  ## build every container image with the local Docker engine
	bash infra/build_images.sh

docker-stop:  ## stop the Docker engine that make test / make build started (and its containers)
	bash infra/bootstrap_docker.sh stop

bench: setup  ## run the benchmarks and rewrite their results tables
	bash benchmarks/run_all.sh

clean:  ## remove build outputs and caches (keeps .venv and runs/)
	rm -rf build dist *.egg-info .pytest_cache workdirs

clean-runs:  ## delete run history, the metrics store and the local model registry (runs/)
	rm -rf runs
