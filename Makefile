# Quickstart targets. Both create/update a local venv (.venv) and install the package into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= workdirs/demo
DEMO_CONFIG ?= configs/halonet.py:smoke
PYTEST_ARGS ?=

.PHONY: install demo test notebooks clean

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[test]"
	touch $@

install: $(VENV)/.installed

# Train a zoo model on the embedded generated data, then evaluate it from its checkpoint.
demo: install
	$(PY) train.py --config $(DEMO_CONFIG) --workdir $(DEMO_DIR)
	$(PY) eval.py --config $(DEMO_CONFIG) --workdir $(DEMO_DIR)

# The full suite; pytest's exit status is make's, so any failure fails the target.
test: install
	$(PY) -m pytest -n 2 $(PYTEST_ARGS) tests

# Open the notebooks (notebooks/*.ipynb) in JupyterLab, with the notebook extra installed.
notebooks: install
	$(PY) -m pip install -e ".[notebook]"
	$(VENV)/bin/jupyter lab notebooks/

clean:
	rm -rf $(VENV) workdirs *.egg-info
