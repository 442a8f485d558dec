# Two commands on a fresh machine: `make demo` and `make test`. Each builds .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The dev set-up pins what this machine installs from its own disk; pyproject.toml states ranges.
TORCH_PIN ?= torch==2.13.0
TRITON_PIN ?= triton==3.9.0
# DeepSpeed ships only as a source package whose build imports torch: installed after torch,
# without build isolation (tests/test_engines.py runs ZeRO-3 on CPU with it; on first use it
# JIT-builds a small CPU communication op, cached under ~/.cache/torch_extensions).
DEEPSPEED_PIN ?= deepspeed==0.19.8
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow lint bench gpu-check compat floor clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)" "$(TRITON_PIN)"
	$(PY) -m pip install --quiet -e ".[dev,peft,qlora]"
	$(PY) -m pip install --quiet --no-build-isolation "$(DEEPSPEED_PIN)"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m lora_kernels.demo

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: $(STAMP) lint
	$(PY) -m pytest -q

# The exhaustive runs left out of `make test` (tests marked slow: every tuning candidate on every
# dtype, rank group, dropout and table arch, in the interpreter: 1176 cases, 9 minutes here).
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# Everything a lent GPU should measure, in one command (lora_kernels/gpu_check.py). It runs with
# the machine's own Python and packages (no venv, no network there), from this checkout.
OUT ?= benchmarks/results/gpu
gpu-check:
	PYTHONPATH=$(CURDIR) PYTHONUNBUFFERED=1 $(PYTHON) -m lora_kernels.gpu_check --out $(OUT) \
	  --budget-s $(or $(BUDGET_S),480)

# The CPU benchmark (a few minutes; writes benchmarks/results/) and the GPU roofline predictions.
bench: $(STAMP)
	$(PY) benchmarks/bench_fused.py
	$(PY) benchmarks/bench_fused.py --predict

# The Triton releases below the pin where something changes (docs/kernels.md): the floor (what torch
# 2.6 pins), the last without host TMA descriptors, the first with them, the lent GPU machine's,
# Blackwell's first descriptor builds. 3.5.1 and 3.7.1 built like their neighbours and are left out
# for CI's time. Each must build every kernel with tensor cores and within the GPU's shared memory
# (tests/test_inspect.py; zero spills and the tuner's candidate builds are checked for the pin only:
# an older Triton's tuner skips a candidate that fails to build; Triton 3.2 has no Blackwell target,
# so its run leaves sm_100 / sm_120 out). Each Triton goes into its own folder, put first on
# PYTHONPATH; the venv is left as it is. CI runs this after `make test`.
TRITON_COMPAT ?= 3.2.0 3.3.1 3.4.0 3.6.0 3.8.0
COMPAT_DIR ?= .compat

compat: $(STAMP)
	set -e; for v in $(TRITON_COMPAT); do \
	  dir=$(COMPAT_DIR)/triton-$$v; \
	  if [ ! -d $$dir ]; then \
	    rm -rf $$dir.partial; \
	    $(PY) -m pip install --quiet --no-deps --target $$dir.partial "triton==$$v"; \
	    mv $$dir.partial $$dir; \
	  fi; \
	  got=$$(PYTHONPATH=$$dir $(PY) -c 'import triton; print(triton.__version__)'); \
	  [ "$$got" = "$$v" ] || { echo "compat: expected Triton $$v, imported $$got" >&2; exit 1; }; \
	  skip="test_no_spills or candidates or high_ranks"; \
	  case $$v in 3.2.*) skip="$$skip or blackwell";; esac; \
	  echo "== Triton $$v: tests/test_inspect.py, without: $$skip"; \
	  PYTHONPATH=$$dir $(PY) -m pytest -q -p no:cacheprovider tests/test_inspect.py \
	    -k "not ($$skip)"; \
	done

# The oldest torch pyproject.toml admits, with the Triton it pins (3.2.0), in a venv of its own
# (PyPI's CUDA build, about 6 GiB; it runs on CPU). Two runs: the whole suite with Triton 3.9 first
# on PYTHONPATH (the kernels' interpreter tests need 3.9), less the GPU builds (`make compat`'s
# job), then the tests marked `inductor` (torch.compile, torch.export) with the pinned Triton
# (inductor needs the Triton its torch pins), except those running the kernels in the
# interpreter. The FSDP2 tests are left out:
# torch 2.6's FSDP2 can't run on CPU (its CPU stream has no record_event), a gap of that torch,
# not of ours; it runs in `make test`. CI runs this after `make compat`.
TORCH_FLOOR ?= torch==2.6.0
FLOOR_VENV ?= .venv-floor
FLOOR_PY := $(FLOOR_VENV)/bin/python
FLOOR_STAMP := $(FLOOR_VENV)/.installed
PIN_DIR := $(COMPAT_DIR)/$(subst ==,-,$(TRITON_PIN))

$(FLOOR_STAMP): pyproject.toml Makefile
	test -x $(FLOOR_PY) || $(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_PY) -m pip install --quiet --upgrade pip
	$(FLOOR_PY) -m pip install --quiet "$(TORCH_FLOOR)" -e ".[dev,peft]"
	touch $(FLOOR_STAMP)
# (DeepSpeed is left out of the floor venv, for CI's time: tests/test_engines.py's ZeRO-3 tests
# skip there, saying so; FSDP1's run.)

# Order-only on the floor venv (it only needs its pip): a re-stamped venv keeps the folder.
$(PIN_DIR): | $(FLOOR_STAMP)
	rm -rf $@.partial
	$(FLOOR_PY) -m pip install --quiet --no-deps --target $@.partial "$(TRITON_PIN)"
	rm -rf $@
	mv $@.partial $@

floor: $(FLOOR_STAMP) $(PIN_DIR)
	$(FLOOR_PY) -c 'import torch; v = torch.__version__.split("+")[0]; \
	  assert "torch==" + v == "$(TORCH_FLOOR)", v'
	PYTHONPATH=$(PIN_DIR) $(FLOOR_PY) -m pytest -q -p no:cacheprovider \
	  -m "not inductor and not slow" -k "not fsdp2" --ignore=tests/test_inspect.py
	$(FLOOR_PY) -m pytest -q -p no:cacheprovider -m "inductor and not slow" \
	  -k "not triton_path and not fsdp2" \
	  --ignore=tests/test_inspect.py

clean:
	rm -rf $(VENV) $(FLOOR_VENV) $(COMPAT_DIR) .pytest_cache .ruff_cache .hypothesis
