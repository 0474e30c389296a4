# fisherdist: `make test` and `make demo` set everything up in a local virtual environment.
#
#   make install   create $(VENV) and install fisherdist with its test extras (once; again if pyproject.toml changes)
#   make test      run the test suite
#   make lint      ruff on the package, bench/ and tests/, mypy --strict on fisher/, distributed/, optim/, plan/ (pyproject.toml)
#   make demo      the main job on the built-in tiny world (2 local processes, CPU)   -> runs/demo
#   make world     rebuild the tiny world from the bundled texts                      -> runs/world
#
# CPU torch is installed only when $(VENV) has no working torch, so a GPU machine can point VENV at an
# environment with its own CUDA torch (or run `pip install -e .` there) and keep it.

VENV ?= .venv
PYTHON ?= python3
TORCH_CPU ?= torch==2.13.0+cpu
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PYTEST_ARGS ?=

PY := $(VENV)/bin/python
STAMP := $(VENV)/.fisherdist-installed

.PHONY: install test lint demo world

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# Local wheel caches first (pip's own configuration), then the PyTorch CPU index.
$(STAMP): pyproject.toml | $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --progress-bar off "$(TORCH_CPU)" \
		|| $(PY) -m pip install --progress-bar off "$(TORCH_CPU)" --index-url $(TORCH_CPU_INDEX)
	$(PY) -m pip install --progress-bar off -e '.[test]'
	touch $@

test: $(STAMP)
	$(PY) -m pytest -p no:cacheprovider $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check fisherdist bench tests
	$(VENV)/bin/mypy

# The main job: SUV copyright unlearning on the shipped tiny world (configs/suv/tiny.yaml, FSDP2 x 2).
demo: $(STAMP)
	$(VENV)/bin/fisherdist demo --out runs/demo

world: $(STAMP)
	$(VENV)/bin/fisherdist world build --out runs/world
