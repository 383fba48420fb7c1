# Two commands for users: `make run` (the default experiment) and `make test`.
# Both create .venv and install the pinned requirements on first use.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
CORES ?= all

.PHONY: install run test lint bench clean

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(INSTALLED)

install: $(INSTALLED)

run: $(INSTALLED)
	$(BIN)/snakemake --cores $(CORES)

test: $(INSTALLED)
	$(BIN)/python -m pytest -m "not slow"

lint: $(INSTALLED)
	$(BIN)/snakemake --lint --cores 1

# Benchmarks (BENCHMARKS.md): build the default outputs the scripts read, then time each stage
# against its reference way. Pass script options through BENCH_ARGS, e.g. BENCH_ARGS=--quick.
BENCH_MODEL ?= tiny-olmoe
BENCH_ARGS ?=
bench: $(INSTALLED)
	$(BIN)/snakemake --cores $(CORES) results/data/cause.parquet \
		results/experts/$(BENCH_MODEL)/arith.json results/categories/$(BENCH_MODEL)/arith.parquet
	$(BIN)/python bench/run_all.py --model $(BENCH_MODEL) $(BENCH_ARGS)

clean:
	rm -rf results .snakemake
