# `make run` and `make test` are the whole set-up: they create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# pinned and installed first: a bare `torch` requirement would pull a multi-GB CUDA build
TORCH := torch==2.13.0
# re-install only when the project's requirements change
STAMP := $(VENV)/.selfspec-installed

.PHONY: env run test soak lint clean

env: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

run: env
	$(BIN)/selfspec tune smollm2-135m

test: env
	$(BIN)/python -m pytest -q

soak: env
	$(BIN)/python -m pytest -q -s -m soak

lint: env
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
