#!/bin/bash
# Device run (NOTES.md 76): the GPU suite faulted (illegal address) with fold_bf16_split.patch
# applied. Replays the call that faulted (scratch/fold_fault_*.pt, rebuilt from the suite log:
# both probes, and each alone) on the tree as it is and with the patch, under compute-sanitizer
# where it faults, then the CUDA fuzz with the call log and CUDA_LAUNCH_BLOCKING=1 on the
# patched tree (device_fuzz.sh: a faulting call goes to compute-sanitizer). Run it unpatched.
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > /dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
replay() {
  for c in p1 p2 both; do
    printf "%s %s: " "$1" "$c"
    CUDA_LAUNCH_BLOCKING=1 timeout 90 python3 scratch/replay_fuzz_call.py scratch/fold_fault_$c.pt 2>&1 \
      | grep -E "^ok|Error" | tail -1 | cut -c1-200
  done
  timeout 90 /usr/local/cuda/bin/compute-sanitizer --tool memcheck --print-limit 2 python3 scratch/replay_fuzz_call.py \
    scratch/fold_fault_both.pt 2>&1 | grep -E "=== (Invalid|  +at|ERROR SUMMARY)" | head -3
}
replay shipped
git apply scratch/fold_bf16_split.patch 2>/dev/null || patch -p1 < scratch/fold_bf16_split.patch > /dev/null || exit 1
replay patched
SEEDS="${SEEDS:-31 32 33 34 35 36}" EXAMPLES=150 LIMIT=${LIMIT:-240} bash scratch/device_fuzz.sh 2>&1 | grep -v "^GPU"
