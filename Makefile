# deepdelta — run `make help` for the list of targets.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
SWEEP   ?= grid
ARGS    ?=
WORKERS ?= 2
export PYTHONUNBUFFERED := 1

.PHONY: help install train sweep test lint format bench bench-ddp bench-eval data report results eval clean
help:  ## list targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0 || $(BIN)/pip install -q 'torch>=2.5'  # CPU wheel where one is on disk
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/.installed  ## create .venv and install deepdelta with its dependencies

train: install  ## train the default (tiny DDL on the embedded corpus, CPU); ARGS="key=value ..."
	$(BIN)/python src/train.py $(ARGS)

sweep: install  ## run the named sweep in sweeps/ (SWEEP=grid by default); ARGS adds overrides; GPUS=N: one job per GPU
	$(if $(GPUS),$(BIN)/python -m deepdelta.gpusweep --gpus $(GPUS),$(BIN)/python src/train.py -m) sweep=$(SWEEP) $(ARGS)

test: install  ## run the test suite (CPU; GPU tests skip themselves) on WORKERS=2 processes; show its 15 slowest tests
	$(BIN)/python -m pytest -q -n $(WORKERS) --durations=15 $(ARGS)

lint: install  ## ruff
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

format: install  ## ruff format + autofix
	$(BIN)/ruff format src tests
	$(BIN)/ruff check --fix src tests

bench: install  ## time every variant (GPU: paper small shape; CPU: tiny); ARGS passes flags
	$(BIN)/python -m deepdelta.bench $(ARGS)

bench-ddp: install  ## DDP scaling on this node: the small model on 1 GPU vs GPUS (default 2) at the same per-GPU batch
	$(BIN)/python -m deepdelta.scaling --gpus $(or $(GPUS),2) $(ARGS)

bench-eval: install  ## eval examples/s and sampling tok/s with and without caches (GPU: small; CPU: tiny); RUN=dir, ARGS
	$(BIN)/python -m deepdelta.bench_eval $(if $(RUN),--run $(RUN)) $(ARGS)

data: install  ## tokenise a corpus into the shared cache ahead of training; ARGS="data=text data.paths=[corpus/*.txt]"
	$(BIN)/python -m deepdelta.data prepare $(ARGS)

report: install  ## report of a run (RUN=dir) or a sweep (SWEEP_DIR=dir): report.md, report.html, figures/*.png
	$(BIN)/python -m deepdelta.analysis.report $(if $(RUN),--run $(RUN)) $(if $(SWEEP_DIR),--sweep $(SWEEP_DIR))

eval: install  ## downstream tasks of a run (RUN=dir) or a sweep (SWEEP_DIR=dir) with lm-evaluation-harness; TASKS=paper_1shot
	$(BIN)/python -m deepdelta.eval $(RUN) $(if $(SWEEP_DIR),--sweep $(SWEEP_DIR)) $(if $(GPUS),--gpus $(GPUS)) tasks=$(or $(TASKS),paper_1shot) $(ARGS)

results: install  ## regenerate docs/results.md (+ .html, .csv, img/results/) from the raw results in results/replication
	$(BIN)/python -m deepdelta.analysis.report --sweep results/replication --out docs/results.md

.PHONY: sample
sample: install  ## continue PROMPT="..." with a run (RUN=dir, default the newest outputs/runs/*); ARGS="--top-k 50 ..."
	$(BIN)/python -m deepdelta.sample "$(or $(RUN),$(lastword $(sort $(wildcard outputs/runs/*))),$(error no run yet: make train, or RUN=<run dir>))" --prompt "$$PROMPT" $(ARGS)

clean:  ## remove outputs (not the data cache)
	rm -rf outputs multirun
