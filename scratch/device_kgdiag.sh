#!/bin/bash
# Device run (one H100): probe diagnoses on a build with one variant switch (scratch/probe_variant_ab.py):
#   SWITCH=KG_DIAG VALUES="0 1 3 0" (NOTES.md 57, Flux), SWITCH=KG_IDS VALUES="0 1 2 0 1" SHAPES=sd3_1024 ERROR=--error (58).
export PYTHONPATH=$PWD:$PWD/scratch PYTHONUNBUFFERED=1
nvidia-smi -L
for v in ${VALUES:-0 1 3 0}; do
  env "${SWITCH:-KG_DIAG}=$v" timeout -k 10 140 python3 scratch/probe_variant_ab.py "${SWITCH:-KG_DIAG}" \
    "${SHAPES:-flux_1024,flux_edit}" $ERROR 2>&1 | grep -E "${SWITCH:-KG_DIAG}=|Error" | head -8
done
