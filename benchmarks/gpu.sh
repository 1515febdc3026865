#!/usr/bin/env bash
# The GPU numbers in docs/performance.md: run from the repo root on a CUDA machine whose
# Python has jax[cuda] (plus the wheels in .whl/ when offline: flax, omegaconf, antlr4).
set -euo pipefail
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
out="${OUT:-/tmp}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
cd benchmarks
python3 precision.py --batch 256 --seq 128 --size 224 --repeats 10 | tee "$out/precision_gpu.jsonl"
python3 overhead.py --batch 256 --steps 10 | tee "$out/overhead_gpu.jsonl"
