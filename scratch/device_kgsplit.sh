#!/bin/bash
# Device run (one H100): the whole GPU suite, then the fused key-group probe's cost and error
# (scratch/probe_variant_ab.py, no variant switch) after the Triton kernel's bf16 split (NOTES.md 66).
SUITE_ONLY=1 bash scratch/device_suite.sh
PYTHONPATH=$PWD:$PWD/scratch timeout 200 python3 scratch/probe_variant_ab.py NONE sd3_1024,flux_1024,flux_edit --error 2>&1 \
  | grep -E "NONE=|Error"
