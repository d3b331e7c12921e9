# The quick-start commands (README): `make demo` and `make test`. Both set up .venv first.
# `make test` runs every test (CI: .ci/run); `make test-fast` runs only the in-process ones
# (`pytest -m "not slow"`: no subprocess of the job or a benchmark), a few minutes on 2 cores.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH := torch==2.13.0
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu

.PHONY: demo test test-fast lint image-check

# torch: the CPU build on development and CI machines, from PyTorch's CPU index when it can be reached;
# otherwise from the configured package index (on PyPI that is the CUDA build: larger, same results on CPU).
# The image installs CUDA torch from uv.lock.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if $(PY) -c "import urllib.request; urllib.request.urlopen('$(TORCH_CPU_INDEX)/', timeout=10).close()" 2>/dev/null; then \
		echo "torch: installing the CPU build from $(TORCH_CPU_INDEX)"; \
		$(PY) -m pip install -q --index-url $(TORCH_CPU_INDEX) $(TORCH); \
	else \
		echo "torch: $(TORCH_CPU_INDEX) cannot be reached; installing $(TORCH) from the configured package index"; \
		$(PY) -m pip install -q $(TORCH); \
	fi
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(PY) entrypoint.py train --config examples/cpu-demo.yaml

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Two workers (pytest-xdist), one test file each at a time: the subprocess tests wait on signals, leases and
# servers as much as they compute, so two overlap well even on 2 cores (measured: 14 min instead of 19;
# the in-process tier 2.5 min instead of 5).
PYTEST_WORKERS ?= 2

test: lint
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile

test-fast: lint
	$(PY) -m pytest -m "not slow" -n $(PYTEST_WORKERS) --dist loadfile

# Builds the image with podman from local stand-ins for its base images (Debian bookworm for the CUDA base,
# uv from PyPI), runs the CPU demo in it as the cluster does (uid 10001, read-only root, scratch volume),
# checks SIGTERM -> 75 and that a code change rebuilds only the project layer. Needs root; see the script.
image-check:
	bash scripts/image-check.sh
