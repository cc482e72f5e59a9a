# The two README commands (run, test) and the checks. Each sets up .venv itself.
VENV := .venv
PY := $(VENV)/bin/python
READY := $(VENV)/.ready
# The benchmarks' peer libraries too: mypy checks benchmarks/ against them.
BENCH_READY := $(VENV)/.bench-ready

.PHONY: run test check lint types bench

$(READY): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(READY)

$(BENCH_READY): $(READY)
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_READY)

run: $(READY)
	$(VENV)/bin/replica cluster --demo

test: $(READY)
	$(PY) -m pytest -q

lint: $(READY)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

types: $(BENCH_READY)
	$(VENV)/bin/mypy

check: lint types test

# Benchmarks (never part of `test`): installs the bench extra (and, as root on Debian, the wrk
# load generator), writes benchmarks/results.json and prints the table.
# `make bench BENCH_ARGS=--quick` for a fast pass.
bench: $(BENCH_READY)
	@command -v wrk >/dev/null || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || \
		apt-get install -y -q wrk >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null 2>&1 && apt-get install -y -q wrk >/dev/null 2>&1; } || true
	@command -v wrk >/dev/null || echo "wrk is not installed: HTTP load comes from aiohttp (named in the table)"
	$(PY) -m benchmarks.run $(BENCH_ARGS)
