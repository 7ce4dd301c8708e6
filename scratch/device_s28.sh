#!/bin/bash
# Device run (NOTES.md 76, session 28): the routed fold_bf16_split.patch. Applies it, replays the
# head-dim-40 call that faulted (must now pass: the split is routed off at d=40), runs the
# targeted GPU tests (incl. the strict-xfail's GPU case, which must now pass) and the CUDA fuzz.
export PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > /dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
git apply scratch/fold_bf16_split.patch || exit 1
for c in both p1 p2; do
  printf "patched %s: " "$c"
  CUDA_LAUNCH_BLOCKING=1 timeout 90 python3 scratch/replay_fuzz_call.py scratch/fold_fault_$c.pt 2>&1 \
    | grep -E "^ok|Error" | tail -1 | cut -c1-200
done
T0=$(date +%s)
timeout -s INT ${TEST_LIMIT:-220} python3 -m pytest -q -p no:cacheprovider -n 4 -m cuda -rf tests/test_attention_extras.py \
  tests/test_gpu.py tests/test_fused_probe.py tests/test_edit_gpu.py \
  tests/test_attention_fuzz_extras.py::test_fused_probe_beside_probe_pass_at_head_dim_40 2>&1 | grep -E "^(FAILED|ERROR)|^E  |passed|failed" | head -20
echo "targeted: $(( $(date +%s) - T0 )) s"
SEEDS="${SEEDS:-4 41 42 43}" EXAMPLES=${EXAMPLES:-100} LIMIT=${LIMIT:-170} bash scratch/device_fuzz.sh 2>&1 | grep -v "^GPU"
