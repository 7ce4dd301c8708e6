#!/bin/bash
# Device run: the HeadRouter GPU tests (sync-free calls, same-call DTR), then the per-variant profile.
export PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > /dev/null 2>&1
PYTHONPATH=/tmp/site:$PWD timeout -s INT 240 python3 -m pytest -q -p no:cacheprovider -n 4 -m cuda \
  tests/test_edit_gpu.py tests/test_edit_headrouter.py tests/test_diffusers_backend.py 2>&1 \
  | grep -E "^E  |passed|failed|^FAILED" | head -20
PYTHONPATH=/tmp/site:$PWD timeout 200 python3 scratch/dtr_profile.py 2>&1 | grep -v -i warn | tail -60
PYTHONPATH=/tmp/site:$PWD timeout 120 python3 scratch/dtr_same_cost.py 2>&1 | tail -7
