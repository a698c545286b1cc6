# make demo : set up .venv and run the main job (bundled checkpoint -> export -> simulated SO-101)
# make test : set up .venv and run the test suite
# The CPU torch wheel is installed first (pip takes it from local disk); a bare `torch`
# requirement resolved on its own would pull a multi-GB CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev]'
	touch $(STAMP)

demo: setup
	MUJOCO_GL=egl $(VENV)/bin/molmo-edge demo

test: setup
	MUJOCO_GL=egl $(PY) -m pytest -q --timeout=900

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
