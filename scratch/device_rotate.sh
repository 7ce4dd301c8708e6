#!/bin/bash
# Device run (one H100): GPU tests of the Hopper kernel's multiplier and key-group paths, then the rotation A/B.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD:$PWD/scratch PYTHONUNBUFFERED=1
nvidia-smi -L
echo "== GPU tests (hopper, multiplier, key groups)"
timeout -s INT -k 15 200 python3 -m pytest -m cuda tests/test_hopper_fwd.py tests/test_fused_probe.py tests/test_gpu.py \
  -q -p no:cacheprovider -n 4 -k "mult or key_group or kg or probe or hopper" 2>&1 | tail -4
echo "== rotation A/B"
timeout -k 15 ${AB_S:-300} python3 scratch/rotate_ab.py ${AB_SHAPES:-flux_1024,flux_edit} 2>&1 | grep -v Warn | tail -30
