#!/bin/bash
# Device run (session 30): the default HeadRouter call with the kernels' pair pass against the PyTorch
# statistics, per call synchronized (host time counts) and back to back (max of host and GPU), 15 rounds.
export PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > /dev/null 2>&1
for mode in 0 1; do
  echo "== back to back: $mode"
  BACK_TO_BACK=$mode ROUNDS=15 ONLY="route+dtr same|route+dtr same, torch stats" PYTHONPATH=/tmp/site:$PWD \
    timeout 100 python3 scratch/dtr_same_cost.py 2>&1 | tail -3
done
