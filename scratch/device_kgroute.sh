#!/bin/bash
# Device run (one H100): scratch/kg_route_ab.py (key-group probe fused vs the probe pass).
export PYTHONPATH=$PWD:$PWD/scratch PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"
timeout -k 10 400 python3 scratch/kg_route_ab.py "${SHAPES:-sd3_1024,flux_1024,flux_edit}" 2>&1 | grep -v Warning | tail -60
