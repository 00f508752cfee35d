# Two commands for a newcomer: `make demo` and `make test`. Both build .venv themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test test-kernels demo bench bench-gpu clean

venv: $(STAMP)

$(STAMP): requirements-cpu.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements-cpu.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

# The test suite: on CPU the chunked CPU path and the Triton kernels through the interpreter
# (tests/conftest.py sets TRITON_INTERPRET=1 when there is no GPU); on CUDA the same tests on the GPU.
test: $(STAMP)
	$(VENV)/bin/pytest -q tests

demo: $(STAMP)
	$(VENV)/bin/attncap demo

bench: $(STAMP)
	$(VENV)/bin/pytest -q benchmarks --benchmark-only --benchmark-json=benchmarks/cpu.json

clean:
	rm -rf $(VENV) build *.egg-info
