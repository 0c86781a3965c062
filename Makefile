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

PTB := ../shared/data
BENCH_RUN := runs/ptb

# Side-by-side tables (kernel peers; corpus evaluation vs TensorFlow and PyTorch), then the
# pytest-benchmark suites.  PyTorch comes from the `bench` extra (CPU build on this machine kind).
bench: install
	$(PY) -m pip install --quiet -e ".[$(EXTRAS),bench]"
	$(PY) benchmarks/kernel_table.py
	test -f $(BENCH_RUN).onnx || { $(VENV)/bin/lmonnx train $(PTB)/ptb.valid.txt --tokenizer whitespace \
	    --vocab-size 10000 --units 200 --layers 2 --epochs 1 --out $(BENCH_RUN) --force && \
	  $(VENV)/bin/lmonnx export $(BENCH_RUN) -o $(BENCH_RUN).onnx --force; }
	$(PY) benchmarks/eval_table.py --run $(BENCH_RUN) --model $(BENCH_RUN).onnx --corpus $(PTB)/ptb.test.txt
	$(PY) -m pytest benchmarks --benchmark-only

clean:
	rm -rf build lmonnx/_xent.c lmonnx/*.so *.egg-info
