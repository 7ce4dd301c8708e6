#!/bin/bash
# Device run (one H100): scratch/map_ab.py (the Gluon text x image map against the Triton probe pass).
export PYTHONPATH=$PWD:$PWD/scratch PYTHONUNBUFFERED=1
nvidia-smi -L
timeout -k 10 500 python3 scratch/map_ab.py "${SHAPES:-flux_1024,sd3_1024,flux_edit}" 2>&1 | grep -v Warning | tail -80
