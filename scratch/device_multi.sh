#!/bin/bash
# Device run (nvidia-h100-x2): the two-GPU tests, the same tests with the device guard
# switched off (they must fail), then the whole GPU suite.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD:$PWD/scratch PYTHONUNBUFFERED=1
nvidia-smi -L
echo "== two-GPU tests, guard on"
timeout 300 python3 -m pytest tests/test_multi_gpu.py -q -p no:cacheprovider -rs 2>&1 | tail -8
echo "== two-GPU tests, guard off (expected to fail)"
cp iidkern/attention.py /tmp/attention.py.bak
sed -i 's/    if device.type == "cuda" and device.index != torch.cuda.current_device():/    if False:/' iidkern/attention.py
grep -c "if False:" iidkern/attention.py
for t in test_plain_on_other_gpu test_extras_on_other_gpu test_other_gpu_stream_order test_iid_pipeline_on_other_gpu; do
  timeout 120 python3 -m pytest "tests/test_multi_gpu.py" -k "$t" -q -p no:cacheprovider -x 2>&1 | tail -2
done
cp /tmp/attention.py.bak iidkern/attention.py
echo "== whole GPU suite"
timeout -s INT -k 15 420 python3 -m pytest -m cuda tests -q -p no:cacheprovider -n 4 2>&1 | tail -8
