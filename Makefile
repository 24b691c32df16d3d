# Set-up and the two main commands. Everything runs in a local virtual environment (.venv);
# the first call creates it, installs torch and the dependencies, and builds tbg.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.14.1
BIN := $(VENV)/bin
export CUDA_HOME ?= /usr/local/cuda

.PHONY: setup build demo test bench clean
setup: $(VENV)/.setup-done
$(VENV)/.setup-done: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)" scikit-build-core ninja cmake
	$(MAKE) build
	touch $@

# --no-build-isolation: build against the torch installed above (see pyproject.toml).
build:
	$(BIN)/pip install -q --no-build-isolation -e ".[test]"

demo: setup
	$(BIN)/tbg demo

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/tbg bench

clean:
	rm -rf build $(VENV)
