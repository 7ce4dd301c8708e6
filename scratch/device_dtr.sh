#!/bin/bash
# Device run: the GPU tests touched by same-call DTR, then its cost at Flux and SD3 1024^2.
export PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > /dev/null 2>&1
PYTHONPATH=/tmp/site:$PWD timeout -s INT ${TEST_LIMIT:-300} python3 -m pytest -q -p no:cacheprovider -n 4 -m cuda \
  tests/test_edit_gpu.py tests/test_edit_headrouter.py tests/test_mmdit_policy.py tests/test_diffusers_backend.py 2>&1 \
  | grep -E "^E  |passed|failed|^FAILED" | head -20
PYTHONPATH=/tmp/site:$PWD timeout 120 python3 scratch/dtr_same_cost.py 2>&1 | tail -8
PYTHONPATH=/tmp/site:$PWD timeout 120 python3 scratch/dtr_same_cost.py sd3 2>&1 | tail -7
