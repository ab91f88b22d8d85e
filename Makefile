# One entry point for people and CI.  `make demo` trains, `make test` tests; both install first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# Extra pytest arguments, e.g. `make test PYTEST_ARGS="-k subspace"`.
PYTEST_ARGS ?=

.PHONY: install test test-fast lint demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[train,test,notebooks]"
	touch $(STAMP)

# `test` lints first (the rules in pyproject.toml), then runs the whole suite; `.ci/run` calls it.
test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# ruff with the rule set in pyproject.toml ([tool.ruff.lint]); `make lint LINT_ARGS=--fix` fixes
# what it can.
LINT_ARGS ?=
lint: install
	$(PY) -m ruff check $(LINT_ARGS) .

# A short Online Subspace Descent pretraining of the tiny LLaMA on the embedded corpus (about three
# minutes on 2 CPU cores; the first run also trains and caches the tokenizer). Extra flags:
# `make demo DEMO_ARGS="--optimizer adamw"`.
DEMO_ARGS ?=
demo: install
	$(PY) -m train --preset tiny --optimizer osd_adamw --steps 300 --batch-size 16 --seq-len 128 \
		--lr 3e-3 --rank 32 --projector-lr-ratio 2 --dtype float32 --eval-every 100 \
		--eval-batches 4 --log-every 10 $(DEMO_ARGS)

# The CPU benchmark suite (benchmarks/RESULTS.md): optimizer update, projector and train-step costs,
# then the quality comparison (about 25 minutes in all on 2 CPU cores). JSON and PNG go to
# benchmarks/out/ (or $OUT). One script: `make bench BENCH=update BENCH_ARGS="--preset 130m"`.
BENCH ?= update projector step quality
BENCH_ARGS ?=
bench: install
	for b in $(BENCH); do $(PY) -m benchmarks.$$b $(BENCH_ARGS) || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
