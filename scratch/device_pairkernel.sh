#!/bin/bash
# Device run (session 30): HeadRouter's GPU tests and the pair-statistics tests on the tree, then the
# per-call cost of each HeadRouter form, the default's pair statistics taken by the kernels' pair pass
# against the PyTorch form (scratch/dtr_same_cost.py, interleaved rounds).
export PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > /dev/null 2>&1
PYTHONPATH=/tmp/site:$PWD timeout -s INT 240 python3 -m pytest -q -p no:cacheprovider -n 4 -m cuda \
  tests/test_edit_gpu.py tests/test_gpu.py -k "headrouter or pair or HeadRouter or synchron" 2>&1 | grep -E "^E  |passed|failed" | head -20
PYTHONPATH=/tmp/site:$PWD timeout 150 python3 scratch/dtr_same_cost.py 2>&1 | tail -8
