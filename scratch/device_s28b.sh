#!/bin/bash
# Device run (session 28, after the fold landed): the fold's precision test at head dims 16-256,
# the probe / extras / editing GPU tests on the tree, then the CUDA fuzz on fresh seeds.
export PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > /dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
T0=$(date +%s)
timeout -s INT ${TEST_LIMIT:-200} python3 -m pytest -q -p no:cacheprovider -n 4 -m cuda -rf tests/test_attention_extras.py \
  tests/test_fused_probe.py tests/test_edit_gpu.py tests/test_gpu.py 2>&1 | grep -E "^(FAILED|ERROR)|^E  |passed|failed" | head -20
echo "targeted: $(( $(date +%s) - T0 )) s"
SEEDS="${SEEDS:-51 52 53 54}" EXAMPLES=${EXAMPLES:-100} LIMIT=${LIMIT:-150} bash scratch/device_fuzz.sh 2>&1 | grep -v "^GPU"
