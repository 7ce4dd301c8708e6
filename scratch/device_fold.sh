#!/bin/bash
# Device run (NOTES.md 76): scratch/fold_bf16_split.patch verified and timed. The strict xfail
# of the tf32 fold first (unpatched), timings before and after, then the patched tree's probe
# tests, the whole fuzz (CUDA variant) and, with SUITE=1, the GPU suite.
export PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > /dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_attention_extras.py -k fp32_precision -rxX 2>&1 | tail -3
timeout 120 python3 scratch/fold_timing.py tf32 2>&1 | tail -6
git apply scratch/fold_bf16_split.patch 2>/dev/null || patch -p1 < scratch/fold_bf16_split.patch > /dev/null || exit 1
timeout 120 python3 scratch/fold_timing.py bf16x3 2>&1 | tail -6
timeout -s INT ${TEST_LIMIT:-240} python3 -m pytest -q -p no:cacheprovider -n 4 -m cuda -rf tests/test_attention_extras.py \
  tests/test_gpu.py tests/test_fused_probe.py tests/test_edit_gpu.py \
  tests/test_attention_fuzz_extras.py::test_fused_probe_beside_probe_pass_at_head_dim_40 2>&1 | grep -E "^(FAILED|ERROR)|^E  |passed|failed" | head -20
SEEDS="${SEEDS:-21 22 23 24}" EXAMPLES=${EXAMPLES:-40} LIMIT=${LIMIT:-200} bash scratch/device_fuzz.sh 2>&1 | grep -v "^GPU"
[ -n "$SUITE" ] && SUITE_ONLY=1 bash scratch/device_suite.sh
