"""On the GPU: the shrunk call of the CUDA fuzz's seed 12 (a value probe whose signed terms
cancel), its error against float64 relative to the sum and to the terms' magnitudes, beside
the emulated tf32 truncation (tests/test_attention_fuzz_extras.py), then the fuzz's check."""
import sys

import torch

sys.path.insert(0, "tests")
import iidkern  # noqa: E402
from helpers import rel_err  # noqa: E402
from oracle import oracle  # noqa: E402
from test_attention_fuzz_extras import check_call, make_inputs, probe_magnitudes, tf32_truncated  # noqa: E402

for nq in (57, 28, 1):
    x = torch.randn(334, 1, generator=torch.Generator().manual_seed(1234770)).to(torch.float16)
    call = dict(b=1, h=1, nq=nq, nk=334, d=64, dtype=torch.bfloat16, layout="bhnd", packed=False, scale=None,
                seed=1234770, tags=None, head_weights=None, block_multiplier=None, pair_stats=None,
                return_lse=False, count_tiles=False, tiles=None,
                probes=[iidkern.ValueProbe(x, iidkern.TokenGroups.each(0, 1), heads="sum")])
    q, k, v = make_inputs(call, torch.device("cpu"))
    want = oracle(q, k, v, probes=call["probes"]).probes[0]
    bound = probe_magnitudes(q, k, v, call, None)[0]
    qc, kc, vc = (t.cuda() for t in (q, k, v))
    got = iidkern.attention(qc, kc, vc, probes=[iidkern.ValueProbe(x.cuda(), iidkern.TokenGroups.each(0, 1),
                                                                   heads="sum")]).probes[0].cpu()
    scores = (q[0, 0, :1].double() @ k[0, 0].double().T) * 64 ** -0.5
    p = torch.exp(scores - scores.max()).float()
    emulated = (tf32_truncated(p).double() @ tf32_truncated(x).double()) / p.double().sum()
    print(f"nq={nq} want {want.item():.6f} gpu {got.item():.6f} emulated {emulated.item():.6f} "
          f"rel {rel_err(got, want):.2e} err/magnitudes {((got.double() - want).abs() / bound).max().item():.2e}")
    check_call(call, torch.device("cuda"))
print("check_call ok")
