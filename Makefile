# Every target creates .venv when missing; torch is installed from constraints.txt in the same pip
# command as monai so pip never picks a multi-GB CUDA build.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DEMO_OUT ?= runs/demo

.PHONY: demo test test-slow lint bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/neuromoe demo --out $(DEMO_OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts

bench: $(STAMP)
	mkdir -p bench_out
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b | tee bench_out/$$(basename $$b .py).json; done

clean:
	rm -rf $(VENV) runs bench_out .pytest_cache .ruff_cache
