#!/usr/bin/env bash
# Issue #22's accelerator run, prepared for one GPU (the device machine's
# H100/H200) and runnable on any CUDA host with jax[cuda]: the train step
# and cached decoding of a ~1B-parameter anchor with a ~250M m_A (random
# weights, frozen models in bfloat16, bridges float32), MFU against the
# chip's bfloat16 matmul measured in the same run and against its data
# sheet. JSON lines go to $OUT (default results/gpu/), one file a script.
#
#   bash benchmarks/gpu_wheels.sh     # here: the wheels the image lacks
#   then, on the device machine (carry: .whl):  bash benchmarks/gpu.sh
#
# Budget: three processes that each compile 1B-parameter programs; ~5-8
# minutes on an H100 (not yet measured: no device run has had it).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out=${OUT:-results/gpu}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv \
  > "$out/gpu.txt" 2>&1 || true
python3 -c 'import jax, flax; print("jax", jax.__version__, "flax",
flax.__version__, jax.devices())' | tee -a "$out/gpu.txt"
# Pairs spread over the anchor (the backward crosses 16 of its 18 layers),
# then the paper's rule (k = 4: anchor layers 3, 8, 13, 17).
common='--config=1b --frozen_dtype=bfloat16 --steps=5 --threads=16'
python3 benchmarks/train_step.py $common --pairs=3:1,7:5,11:9,15:13 \
  2>"$out/train_step_spread.log" | tee "$out/train_step_spread.jsonl"
python3 benchmarks/train_step.py $common --modes=calm \
  2>"$out/train_step_paper.log" | tee "$out/train_step_paper.jsonl"
# JAX takes 75% of the GPU's memory by default: leave torch room for
# transformers' generate beside it.
XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 python3 benchmarks/decode.py --config=1b \
  --dtype=bfloat16 --repeats=3 --threads=16 --transformers \
  2>"$out/decode.log" | tee "$out/decode.jsonl"
