# Two commands set up everything: `make demo` and `make test` (both install into .venv first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The design names onnxruntime-gpu (it also runs on CPU) on Linux x86-64; plain onnxruntime
# elsewhere.  Never both in one env: they install the same `onnxruntime` module.
EXTRAS ?= $(shell if [ "$$(uname -s)-$$(uname -m)" = "Linux-x86_64" ]; then echo gpu,train,dev,ray,serve,mix,asr; else echo cpu,train,dev,ray,serve,mix,asr; fi)
STAMP := $(VENV)/.lmonnx-installed
SOURCES := pyproject.toml setup.py lmonnx/_xent.pyx $(wildcard csrc/*.c csrc/*.h)

.PHONY: install test demo bench clean

install: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	# pyctcdecode (lmonnx.ctc_decoding) pins numpy<2 in its metadata only (upstream PRs
	# #116/#118 open); it runs on numpy 2, so it goes in without its pins. Its other needs:
	# pygtrie, hypothesis (dev extra).
	$(PY) -m pip install --quiet --no-deps "pyctcdecode==0.5.0" "pygtrie>=2.1,<3"
	touch $@

test: install
	$(PY) -m pytest tests
	$(PY) -m pytest benchmarks --benchmark-disable -q

# The whole pipeline on the built-in synthetic corpus (a Markov chain whose true perplexity is
# known): synth -> train -> export -> evaluate -> predict, a few minutes on 2 cores.  The
# default (tied) recipe with the synthetic-oracle test's flags (tests/test_train.py), 2 layers.
DEMO := demo
LMONNX := $(VENV)/bin/lmonnx
demo: install
	$(LMONNX) synth --out $(DEMO)/data --words 100 --force > /dev/null
	$(LMONNX) train $(DEMO)/data/train.txt --valid $(DEMO)/data/valid.txt --tokenizer whitespace \
	  --vocab-size 104 --units 64 --layers 2 --epochs 10 --out $(DEMO)/run --force
	$(LMONNX) export $(DEMO)/run -o $(DEMO)/model.onnx --force
	$(LMONNX) evaluate $(DEMO)/data/test.txt --model $(DEMO)/model.onnx --providers cpu
	$(LMONNX) predict "$$(head -n 1 $(DEMO)/data/test.txt | cut -d ' ' -f 1-3)" -k 5 \
	  --model $(DEMO)/model.onnx --providers cpu
	$(PY) -c 'import json, lmonnx; \
	  report = lmonnx.Scorer("$(DEMO)/model.onnx", providers="cpu").evaluate(open("$(DEMO)/data/test.txt")); \
	  true = json.load(open("$(DEMO)/data/truth.json"))["true_perplexity"]["test"]; \
	  print(f"test perplexity: model {report.perplexity:.3f}, true {true:.3f}, " \
	        f"ratio {report.perplexity / true:.3f} (1 = the true chain)")'

PTB := ../shared/data
BENCH_RUN := runs/ptb

# Side-by-side tables (kernel peers; corpus evaluation vs TensorFlow and PyTorch), then the
# pytest-benchmark suites.  PyTorch comes from the `bench` extra (CPU build on this machine kind).
bench: install
	$(PY) -m pip install --quiet -e ".[$(EXTRAS),bench]"
	$(PY) benchmarks/kernel_table.py
	test -f $(BENCH_RUN).onnx || { $(VENV)/bin/lmonnx train $(PTB)/ptb.valid.txt --tokenizer whitespace \
	    --vocab-size 10000 --units 200 --layers 2 --epochs 4 --out $(BENCH_RUN) --force && \
	  $(VENV)/bin/lmonnx export $(BENCH_RUN) -o $(BENCH_RUN).onnx --force; }
	$(PY) benchmarks/eval_table.py --run $(BENCH_RUN) --model $(BENCH_RUN).onnx --corpus $(PTB)/ptb.test.txt
	$(PY) benchmarks/beam_table.py
	$(PY) benchmarks/long_line.py
	$(PY) benchmarks/ray_table.py
	-$(PY) benchmarks/serve_table.py --corpus $(PTB)/ptb.test.txt  # wrk's load (apt-get install wrk); a FAIL line exits 1: go on
	-$(PY) benchmarks/serve_table.py --corpus $(PTB)/ptb.test.txt --client-pool aiohttp
	$(PY) benchmarks/train_table.py --corpus all --seeds 0,1,2 --ptb $(PTB)
	KENLM_BIN=$$(bash benchmarks/build_kenlm.sh) && $(PY) benchmarks/quality_table.py --data $(PTB) --kenlm-bin $$KENLM_BIN
	$(PY) benchmarks/torch_lm.py --data $(PTB) --corpus ptb --minutes 10
	$(PY) -m pytest benchmarks --benchmark-only

clean:
	rm -rf build lmonnx/_xent.c lmonnx/*.so *.egg-info
