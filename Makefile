# Two commands set everything up on a fresh machine: `make run` and `make test`.
# torch is installed first and pinned (a plain `pip install torch` may pull a multi-GB CUDA build).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
RUN_STAMP := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test
PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: run test test-all wheel-check bench lint install clean

$(RUN_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==$(TORCH_VERSION)
	$(PIP) -e .
	touch $@

$(TEST_STAMP): $(RUN_STAMP)
	$(PIP) -e '.[test]'
	touch $@

install: $(TEST_STAMP)

run: $(RUN_STAMP)
	$(VENV)/bin/mixtral-lite generate --prompt "ROMEO:" --echo --max-new-tokens 200 --temperature 0.8 --top-k 40 --seed 0

test: $(TEST_STAMP)
	$(PY) -m pytest -q

test-all: $(TEST_STAMP)
	$(PY) -m pytest -m ''

wheel-check: $(TEST_STAMP)  # the wheel in a clean venv, run from another folder
	$(PY) -m pytest -q -m slow tests/test_wheel.py

bench: $(TEST_STAMP)
	$(PY) scripts/bench.py

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check mixtral_lite tests scripts
	$(VENV)/bin/ruff format --check mixtral_lite tests scripts

clean:
	rm -rf $(VENV) build *.egg-info
