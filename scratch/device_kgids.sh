#!/bin/bash
# Device run (one H100): the Triton kernel's key-group ids at D=64 (scratch/kg_ids_ab.py).
export PYTHONPATH=$PWD:$PWD/scratch PYTHONUNBUFFERED=1
nvidia-smi -L
for v in 0 1 2 0 1; do KG_IDS=$v timeout -k 10 140 python3 scratch/kg_ids_ab.py 2>&1 | grep -E "KG_IDS|Error|error" | head -8; done
