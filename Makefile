# Two commands set up everything: `make demo` and `make test` (both install into .venv first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The design names onnxruntime-gpu (it also runs on CPU) on Linux x86-64; plain onnxruntime
# elsewhere.  Never both in one env: they install the same `onnxruntime` module.
EXTRAS ?= $(shell if [ "$$(uname -s)-$$(uname -m)" = "Linux-x86_64" ]; then echo gpu,train,dev; else echo cpu,train,dev; fi)
STAMP := $(VENV)/.lmonnx-installed
SOURCES := pyproject.toml setup.py lmonnx/_xent.pyx $(wildcard csrc/*.c csrc/*.h)

.PHONY: install test demo bench clean

install: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

test: install
	$(PY) -m pytest tests
	$(PY) -m pytest benchmarks --benchmark-disable -q

demo: install
	$(PY) benchmarks/kernel_table.py

bench: install
	-$(PY) -m pip install --quiet ".[bench]" --no-deps torch==2.13.0 2>/dev/null || true
	$(PY) benchmarks/kernel_table.py
	$(PY) -m pytest benchmarks --benchmark-only

clean:
	rm -rf build lmonnx/_xent.c lmonnx/*.so *.egg-info
