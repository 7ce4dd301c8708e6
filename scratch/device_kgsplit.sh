#!/bin/bash
# Device run (one H100): the whole GPU suite, then the fused key-group probe's cost and error
# (scratch/probe_variant_ab.py, no variant switch) after the Triton kernel's bf16 split (NOTES.md 66).
export PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > /dev/null 2>&1
START=$(date +%s)
PYTHONPATH=/tmp/site:$PWD:$PWD/scratch timeout 330 python3 -m pytest -m cuda tests -q -p no:cacheprovider -n 4 2>&1 | tail -6
echo "suite: $(( $(date +%s) - START )) s"
PYTHONPATH=$PWD:$PWD/scratch timeout 200 python3 scratch/probe_variant_ab.py NONE sd3_1024,flux_1024,flux_edit --error 2>&1 \
  | grep -E "NONE=|Error"
