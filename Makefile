# Two commands on a fresh machine: `make demo` and `make test`. Each builds .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The dev set-up pins what this machine installs from its own disk; pyproject.toml states ranges.
TORCH_PIN ?= torch==2.13.0
TRITON_PIN ?= triton==3.9.0
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)" "$(TRITON_PIN)"
	$(PY) -m pip install --quiet -e ".[dev,peft]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m lora_kernels.demo

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: $(STAMP) lint
	$(PY) -m pytest -q

# The CPU benchmark (a few minutes; writes benchmarks/results/) and the GPU roofline predictions.
bench: $(STAMP)
	$(PY) benchmarks/bench_fused.py
	$(PY) benchmarks/bench_fused.py --predict

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
