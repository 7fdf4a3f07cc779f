# Two commands set everything up: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0

.PHONY: run test test-all bench lint install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/mixtral-lite generate --prompt "ROMEO:" --max-new-tokens 200 --temperature 0.8 --top-k 40 --seed 0

test: $(STAMP)
	$(PY) -m pytest

test-all: $(STAMP)
	$(PY) -m pytest -m ''

bench: $(STAMP)
	$(PY) scripts/bench.py

lint: $(STAMP)
	$(VENV)/bin/ruff check mixtral_lite tests scripts
	$(VENV)/bin/ruff format --check mixtral_lite tests scripts

clean:
	rm -rf $(VENV) build *.egg-info
