#!/bin/bash
# Device run (one H100): the key-group probe diagnosis (scratch/kg_diag_ab.py), one process per variant.
export PYTHONPATH=$PWD:$PWD/scratch PYTHONUNBUFFERED=1
nvidia-smi -L
for v in 0 1 3 0; do KG_DIAG=$v timeout -k 10 120 python3 scratch/kg_diag_ab.py 2>&1 | grep KG_DIAG; done
