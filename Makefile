# Quick start: `make run` (the default local experiment) and `make test` (the whole suite).
# Both create .venv with the pinned dependencies first if it is missing or stale.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed
ARGS ?=
PYTEST_ARGS ?=

.PHONY: run test test-fast test-fresh proto benchmark clean

$(STAMP): requirements.txt requirements-test.txt constraints.txt setup.py
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -c constraints.txt setuptools
	$(VENV)/bin/pip install --quiet -c constraints.txt -r requirements.txt -r requirements-test.txt
	$(VENV)/bin/pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/chorus run --config text_vtrace $(ARGS)

# The whole suite, slow end-to-end tests included (what .ci/run runs).
test: $(STAMP)
	$(VENV)/bin/python -m pytest tests $(PYTEST_ARGS)

# Everything but the tests marked slow.
test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest tests -m "not slow" $(PYTEST_ARGS)

# The whole suite as a machine that never ran it sees it: a clone of what is committed, a new
# venv, and new empty TMPDIR and RAY_TMPDIR (nothing left behind by earlier runs is found).
test-fresh:
	set -e; fresh=$$(mktemp -d); git clone --quiet . $$fresh/chorus; \
	cd $$fresh/chorus && TMPDIR=$$(mktemp -d) RAY_TMPDIR=$$(mktemp -d) $(MAKE) test PYTHON=$(PYTHON)

# Regenerates the committed gRPC stubs after editing inference_server/inference.proto.
# The stubs import `chorus.inference_server`, so protoc sees the root through a `chorus` link.
proto: $(STAMP)
	rm -rf build/proto && mkdir -p build/proto && ln -s $(CURDIR) build/proto/chorus
	$(VENV)/bin/python -m grpc_tools.protoc -Ibuild/proto --python_out=build/proto \
	  --grpc_python_out=build/proto chorus/inference_server/inference.proto

# Regenerates every table and plot of benchmarks/RESULTS.md (each script rewrites its own
# section); about an hour on 2 cores, most of it the three default runs.
benchmark: $(STAMP)
	$(VENV)/bin/python benchmarks/reverb_rates.py
	$(VENV)/bin/python benchmarks/actor_cost.py
	$(VENV)/bin/python benchmarks/run_cost.py
	$(VENV)/bin/python benchmarks/inference_batching.py

clean:
	rm -rf $(VENV) build *.egg-info
