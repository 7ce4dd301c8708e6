#!/bin/bash
# Device run (nvidia-h100-x2): the whole GPU suite (two-GPU tests included), then the GPU fuzz.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD:$PWD/scratch PYTHONUNBUFFERED=1
nvidia-smi -L
echo "== whole GPU suite"
timeout -s INT -k 15 330 python3 -m pytest -m cuda tests -q -p no:cacheprovider -n 4 -rs 2>&1 | tail -8
echo "== GPU fuzz"
timeout -k 15 ${FUZZ_S:-170} python3 scratch/gpu_fuzz.py ${FUZZ_RUN_S:-150} ${FUZZ_SEED:-0} 2>&1 | tail -25
