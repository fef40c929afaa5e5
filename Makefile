# vidpipe: `make test` on a fresh machine installs what it needs, then runs the tests.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: install test demo readme-figures bench clean

install: $(VENV)/.installed $(VENV)/.linked

# torch and torchvision are installed together, first, so that pip resolves a matching pair
# from the registry (the standard build runs on CPU). 2.13.0 is excluded because some build
# machines carry a lone CPU-only torch 2.13.0 file that no torchvision release matches.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install "torch>=2.2,!=2.13.0" "torchvision>=0.17"
	$(BIN)/pip install -e ".[dev]" $(EDITABLE)
	touch $@

# The editable install is strict: build/__editable__.vidpipe-*/vidpipe/ holds a link to each
# source file under its import name (vidpipe/malt/model.py -> malt/model.py), a folder that
# editors and static analysers (pyright/Pylance, jedi, mypy) follow; the default mode maps
# the folders through an import hook, which they do not run. Edits show at once; a module
# added or removed needs the links made again, which this rule does whenever a package
# folder changes (`make install`, `make test`).
EDITABLE := --config-settings editable_mode=strict
PACKAGE_DIRS := vidpipe core store extractors malt pipeline configs

$(VENV)/.linked: $(VENV)/.installed $(PACKAGE_DIRS)
	$(BIN)/pip install -q --no-deps --no-build-isolation -e . $(EDITABLE)
	touch $@

# Test-only reference implementations (tests/test_feature_recipes.py compares vidpipe's features with
# them), installed into their own folder, never into the venv: mmaction2 1.1.0 (1.2.0's wheel
# lacks localizers/drn) with the dependencies it imports, and pretrainedmodels (BN-Inception).
REFIMPL := .refimpl
REFIMPL_PACKAGES := mmaction2==1.1.0 mmengine==0.10.7 mmcv-lite==2.0.1 pretrainedmodels==0.7.4 \
	addict==2.4.0 yapf==0.43.0 termcolor==3.3.0 rich==15.0.0 platformdirs==4.14.8 einops==0.8.2 munch==4.0.0 six==1.17.0

$(REFIMPL)/.installed: Makefile | $(VENV)/.installed
	rm -rf $(REFIMPL)
	$(BIN)/pip install --no-deps --target $(REFIMPL) $(REFIMPL_PACKAGES)
	touch $@

test: install $(REFIMPL)/.installed
	$(BIN)/python -m pytest

demo: install
	$(BIN)/vidpipe demo --out demo_out

# The README's demo figures, its two pictures and docs/demo_figures.json (which
# tests/test_demo.py checks them against), from one run of the demo and of its live detection.
readme-figures: install
	$(BIN)/python scripts/readme_figures.py

bench: install
	$(BIN)/python bench/model.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/extract.py
	$(BIN)/python bench/detect.py
	$(BIN)/python bench/streams.py

clean:
	rm -rf $(VENV) $(REFIMPL) build demo_out .pytest_cache
