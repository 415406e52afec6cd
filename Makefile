# Two entry points for a fresh machine: `make demo` (the main job) and `make test` (lint + the test suite).
# Both create the virtual environment in .venv and install the package on first use.
# `make monailabel-venv` creates MONAI Label's own environment (.venv-monailabel) for `serve_monailabel`; `make test`
# creates it too, so that the MONAI Label server test runs instead of being skipped.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MONAILABEL_VENV ?= .venv-monailabel
MONAILABEL_BIN := $(MONAILABEL_VENV)/bin

.PHONY: demo test lint format bench monailabel-venv

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

# monailabel 0.8.5 pins numpy 1.26, and its pydicom-seg imports a module that pydicom 3 removed: its environment takes
# custom_nets' dependencies except pydicom (custom_nets asks for >= 3 for the VinDr-CXR converter, not used there), then
# custom_nets itself without its dependency list.
$(MONAILABEL_BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(MONAILABEL_VENV)
	$(MONAILABEL_BIN)/python -m pip install --quiet --upgrade pip
	$(MONAILABEL_BIN)/python -c 'import tomllib; deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; print("\n".join(d for d in deps if not d.startswith("pydicom")))' > $(MONAILABEL_VENV)/requirements.txt
	$(MONAILABEL_BIN)/python -m pip install --quiet "monailabel==0.8.5" "pydicom>=2.4.4,<3" -r $(MONAILABEL_VENV)/requirements.txt
	$(MONAILABEL_BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

monailabel-venv: $(MONAILABEL_BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/python -m custom_nets.cli demo

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint $(MONAILABEL_BIN)/.installed
	CUSTOM_NETS_REQUIRE_MONAILABEL=1 $(BIN)/pytest -q -raR

format: $(BIN)/.installed
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(BIN)/.installed
	$(BIN)/python -m pip install --quiet -e ".[test,bench]"
	$(BIN)/python benchmarks/slice_attention.py
