#!/usr/bin/env bash
# Device check for NOTES.md 25 (about 2 minutes): the key-group probe and value probe over a
# ragged last key tile, compiled. Each configuration in its own process (an illegal address
# poisons the CUDA context). With "force" the guard launch.fusable_key_span is lifted, so
# the kernel's one-tile tail loop sums the key groups; "nan 0" and a small err on every
# force line mean the guard can go. Then: python -m pytest -m cuda tests -k "image_first or ragged".
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
for dt in bf16 fp16; do for d in 64 128; do for ni in 4096 4083; do for mode in force guard; do
  timeout 90 python scratch/debug_kg.py $dt $d text_last $ni "{}" $mode 2>&1 | grep -v Warn | tail -1
done; done; done; done
timeout 90 python scratch/debug_kg.py bf16 64 text_last 4096 "{'kg_split': False}" force 2>&1 | tail -1
timeout 90 python scratch/debug_kg.py bf16 64 text_first 4096 "{}" force 2>&1 | tail -1
