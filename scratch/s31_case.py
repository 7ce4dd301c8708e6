"""Session 31: one call of scratch/replay_s31.py's family per process (a fault ends only its own
process): python3 scratch/s31_case.py NAME; NAME from CASES (printed by --list)."""
import os
import sys

import torch

sys.path.insert(0, "tests")
sys.path.insert(0, "scratch")
import iidkern  # noqa: E402
from replay_s31 import family  # noqa: E402
from test_attention_fuzz_extras import check_call  # noqa: E402

CASES = {}
if os.environ.get("CASE_SET", "second") == "first":  # the first run (a fault, then where it lies)
    for nk in (1, 59, 64, 65, 100, 128, 200):
        CASES[f"vpkp_nk{nk}"] = (dict(nk=nk), {})
    for nk in (1, 59, 100):
        CASES[f"vp_nk{nk}"] = (dict(nk=nk, kp=False), {})
        CASES[f"kp_nk{nk}"] = (dict(nk=nk, vp=False), {})
        CASES[f"vpkp_nk{nk}_kgmode0"] = (dict(nk=nk), {"kg_half_dot": False})
    for nk in (1, 59):
        CASES[f"vpkp_nk{nk}_d64"] = (dict(nk=nk, d=64), {})
        CASES[f"vpkp_nk{nk}_fp16"] = (dict(nk=nk, dtype=torch.float16), {})
        CASES[f"vpkp_nk{nk}_d96"] = (dict(nk=nk, d=96), {})
        CASES[f"vpkp_nk{nk}_stages1"] = (dict(nk=nk), {"num_stages": 1})
        CASES[f"vpkp_nk{nk}_nokgsplit"] = (dict(nk=nk), {"kg_split": False})
else:  # the second: unit lengths through the generic twins, one group, and num_stages=1
    CASES.update({
        "vpkp_nk1": (dict(nk=1), {}), "kp_nk1": (dict(nk=1, vp=False), {}), "vp_nk1": (dict(nk=1, kp=False), {}),
        "vpkp_nq1": (dict(nq=1, nk=100), {}), "kp_nq1_nk1": (dict(nq=1, nk=1, vp=False), {}),
        "vpkp_g1_nk100": (dict(nk=100, groups=1), {}), "kp_g1_nk100": (dict(nk=100, groups=1, vp=False), {}),
        "vpkp_nk59_stages1": (dict(nk=59), {"num_stages": 1}),
        "vpkp_nk100_stages1": (dict(nk=100), {"num_stages": 1}),
        "vpkp_nk200_stages1": (dict(nk=200), {"num_stages": 1}),
        "vp_nk59_stages1": (dict(nk=59, kp=False), {"num_stages": 1}),
        "kp_nk59_stages1": (dict(nk=59, vp=False), {"num_stages": 1, "hopper": False}),
        "vpkp_nk59_stages1_kgmode0": (dict(nk=59), {"num_stages": 1, "kg_half_dot": False}),
        "vpkp_nk59_stages2": (dict(nk=59), {"num_stages": 2}),
        "plain_nk59_stages1": (dict(nk=59, vp=False, kp=False), {"num_stages": 1}),
        "vpkp_nk200_stages1_d64": (dict(nk=200, d=64), {"num_stages": 1}),
    })

if __name__ == "__main__":
    if sys.argv[1] == "--list":
        print(" ".join(CASES))
        sys.exit(0)
    kw, options = CASES[sys.argv[1]]
    attention = iidkern.attention

    def with_options(*args, kernel_options=None, **kwargs):
        return attention(*args, kernel_options={**(kernel_options or {}), **options}, **kwargs)
    iidkern.attention = with_options
    try:
        check_call(family(**kw), torch.device(os.environ.get("CASE_DEVICE", "cuda")))
        print("RESULT ok", flush=True)
    except Exception as e:  # noqa: BLE001
        print("RESULT FAIL", type(e).__name__, str(e).splitlines()[0][:160], flush=True)
