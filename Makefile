# vidpipe: `make test` on a fresh machine installs what it needs, then runs the tests.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: install test demo bench clean

install: $(VENV)/.installed

# torch and torchvision are installed together, first, so that pip resolves a matching pair
# from the registry (the standard build runs on CPU). 2.13.0 is excluded because some build
# machines carry a lone CPU-only torch 2.13.0 file that no torchvision release matches.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install "torch>=2.2,!=2.13.0" "torchvision>=0.17"
	$(BIN)/pip install -e ".[dev]"
	touch $@

test: install
	$(BIN)/python -m pytest

demo: install
	$(BIN)/vidpipe demo --out demo_out

bench: install
	$(BIN)/python bench/model.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/extract.py
	$(BIN)/python bench/detect.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
