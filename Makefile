# Two entry points: `make bench` (the main job) and `make test`. Both build .venv themselves.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# torch first, pinned: a bare `torch` requirement on an empty venv would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv test bench fuzz clean

$(VENV)/.installed: pyproject.toml benchmarks/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,integrations]"
	$(PY) -m pip install -q -e ./benchmarks
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest

fuzz: venv
	PRECOND_FUZZ=long $(PY) -m pytest tests/test_reliability.py
	$(PY) benchmarks/soak.py

bench: venv
	$(PY) -m precond_bench

clean:
	rm -rf $(VENV) runs
