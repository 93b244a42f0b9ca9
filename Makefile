# Convenience targets; the README's commands work without make.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install run test compile debug bench lint clean

$(BIN)/mqstore: pyproject.toml setup.py $(wildcard ext/*.pyx ext/*.h)
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -e '.[test]'
	touch $@

install: $(BIN)/mqstore

run: install
	$(BIN)/mqstore demo

test: install
	$(BIN)/python -m pytest

compile: install
	$(BIN)/python setup.py build_ext --inplace

debug:
	MQSTORE_DEBUG=1 $(BIN)/python setup.py build_ext --inplace --force

bench: install
	$(BIN)/python benchmarks/bench_log.py

lint: install
	$(BIN)/ruff check mqstore tests benchmarks
	$(BIN)/mypy

clean:
	rm -rf build *.egg-info ext/*.c mqstore/*.so
