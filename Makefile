# Set-up and the project's jobs. Every target creates .venv when it is missing and installs what it needs.
#   make demo   the side-by-side comparison (small default, about 12 minutes on 2 CPU cores)
#   make test   the test suite
#   make lint   ruff

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch is pinned here, before anything else is installed: the CPU build of 2.13.0 installs from a file on
# these machines, while plain `torch` (or a range admitting a newer release, asked for by a dependency)
# makes pip download a multi-GB CUDA build.
TORCH  := torch==2.13.0

.PHONY: demo test lint bench setup data clean

$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	touch $@

# the package with every extra the tests and the demo use (fairseq-fixed builds in about 3.5 minutes)
$(VENV)/.installed: $(VENV)/.torch setup.py
	$(PIP) install -q $(TORCH) -e ".[dev,deepspeed,fairseq,plot,efff]"
	touch $@

# Fashion-MNIST for the eFFF reproduction: a Debian package (needs root); without it those tests skip
$(VENV)/.data: $(VENV)/.torch
	@if [ -d /usr/share/datasets/fashion-mnist ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null)) || \
		echo "note: could not install dataset-fashion-mnist; Fashion-MNIST tests will skip"; \
	else echo "note: run 'apt-get install dataset-fashion-mnist' as root for the Fashion-MNIST tests"; fi
	touch $@

setup: $(VENV)/.installed $(VENV)/.data

test: setup
	$(PY) -m pytest -q tests

demo: setup
	$(VENV)/bin/fff-moe compare --out runs/compare

bench: setup
	$(PY) benchmarks/bench_inference.py

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
