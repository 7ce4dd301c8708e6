"""Session 31: the GPU suite's fuzz faulted once (illegal address, H200, triton 3.6) and did not again. Its
reported examples share one family: b=2, h=2, nq=677, d=128, bf16, bhnd, per-head weights, a value probe on
one query and a probe of 435 spread queries x id-grouped keys (two groups). Run that family and variants
around it (python3 scratch/replay_s31.py [cuda|cpu] [quick]); under compute-sanitizer with
PYTORCH_NO_CUDA_MEMORY_CACHING=1 every tensor is its own allocation, so an out-of-bounds access is seen
even where it does not fault."""
import itertools
import sys

import torch

sys.path.insert(0, "tests")
from test_attention_fuzz_extras import check_call, describe  # noqa: E402
from iidkern import Probe, TokenGroups, ValueProbe  # noqa: E402

IDS59 = [0, 1, 1, -1, 1, 1, 0, -1, 0, 1, 1, -1, 0, -1, 1, -1, -1, 1, 0, -1, -1, -1, 0, 0, 1, 0, -1, 0, 1, -1,
         0, 1, 0, 0, 1, -1, 1, 1, -1, -1, 1, 1, -1, 1, 0, 0, -1, 0, 0, 0, -1, 0, -1, 1, 1, 0, -1, -1, 1]


def family(nq=677, nk=59, d=128, dtype=torch.bfloat16, layout="bhnd", b=2, h=2, vp=True, kp=True, qstop=435,
           hw=True, seed=1241533, groups=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor(IDS59 * (nk // 59 + 1), dtype=torch.int32)[:nk]
    ids[-1] = 1
    if groups == 1:
        ids = torch.where(ids >= 0, 0, -1).to(torch.int32)
    probes = []
    if vp:
        probes.append(ValueProbe(torch.randn(nk, 1, generator=g), TokenGroups.each(0, 1), heads="mean"))
    if kp:
        probes.append(Probe(TokenGroups.each(0, min(qstop, nq)), TokenGroups.ids(ids), heads="mean"))
    return dict(layout=layout, packed=False, b=b, h=h, nq=nq, nk=nk, d=d, dtype=dtype, rng=g, seed=seed,
                scale=0.99999, tags=None, head_weights=torch.tensor([1.0627, 0.3934])[:h] if hw else None,
                probes=probes, block_multiplier=None, pair_stats=None, return_lse=False, count_tiles=False,
                tiles=None)


def variants(quick):
    yield family()
    yield family(nk=1)
    if quick:
        return
    for nk, nq in itertools.product((1, 17, 59, 64, 65, 130), (1, 64, 435, 677, 700)):
        for vp, kp in ((True, True), (True, False), (False, True)):
            yield family(nk=nk, nq=nq, vp=vp, kp=kp)
    for dtype, layout, d in itertools.product((torch.float16, torch.bfloat16), ("bhnd", "bnhd"), (64, 96, 128, 40)):
        yield family(dtype=dtype, layout=layout, d=d)


if __name__ == "__main__":
    device = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")
    quick = "quick" in sys.argv
    bad = 0
    for call in variants(quick):
        try:
            check_call(call, device)
            print("ok  ", describe(call), flush=True)
        except Exception as e:  # noqa: BLE001 (each call reported)
            bad += 1
            print("FAIL", describe(call), "::", type(e).__name__, str(e).splitlines()[0][:200], flush=True)
            if "illegal" in str(e) or "misaligned" in str(e):
                break
    print("failures:", bad)
