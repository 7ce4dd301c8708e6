"""Run one call saved by the fuzz (IIDKERN_FUZZ_LOG=... writes LOG.last.pt before each call)
on the GPU, e.g. under compute-sanitizer: python3 scratch/replay_fuzz_call.py /tmp/calls1.log.last.pt"""
import sys

import torch

sys.path.insert(0, "tests")
from test_attention_fuzz_extras import check_call, describe  # noqa: E402

call = torch.load(sys.argv[1], weights_only=False)
print(describe(call), flush=True)
check_call(call, torch.device(sys.argv[2] if len(sys.argv) > 2 else "cuda"))
print("ok", flush=True)
