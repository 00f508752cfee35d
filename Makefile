# Two commands for a newcomer: `make demo` and `make test`. Both build .venv themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test demo bench bench-gpu gpu-check gpu-wheels clean

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

# CPU suite: pytest-benchmark timings, then the measured run (time and peak memory per provider and
# shape, each in a fresh process), the demo model's grounding benchmark, and the RESULTS.md tables.
bench: $(STAMP)
	$(VENV)/bin/pytest -q benchmarks --benchmark-only --benchmark-json=benchmarks/pytest-benchmark-cpu.json
	$(PY) -m pip install -q --no-deps attention-map-diffusers==1.0.0  # the peer provider; needs only torch
	$(PY) benchmarks/run.py --device cpu
	$(PY) benchmarks/grounding.py --write-results
	$(PY) benchmarks/report.py

# GPU suite, on a CUDA machine whose python has a CUDA torch, triton and diffusers (not the CPU .venv).
bench-gpu:
	$(PYTHON) -m pip install -q --no-deps -e .
	$(PYTHON) benchmarks/run.py --device cuda
	$(PYTHON) benchmarks/e2e_wan.py --device cuda --write-results
	$(PYTHON) benchmarks/report.py

# Everything that needs a GPU in one call of <= 8 minutes on an H100/H200 (tools/gpu_check.sh): GPU tests,
# the kernel benchmark against SDPA-flash and cuDNN, the hybrid path, the WAN step at 4 layers; RESULTS.md
# sections ($$OUT/RESULTS.md when $$OUT is set). Uses the machine's python, not the CPU .venv.
gpu-check:
	PYTHON=$(PYTHON) bash tools/gpu_check.sh

# Wheels a GPU machine without diffusers needs for gpu-check's WAN step: carry .whl/ there (pure Python).
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: -d .whl diffusers==0.42.1

clean:
	rm -rf $(VENV) build *.egg-info
