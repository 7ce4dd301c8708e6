"""Session 28: is the fold test's 1.6e-5 at head dim 256 (H200) the scores' fp32 accumulation or
the fold? The same call also takes a token x token map (nothing folds; the same scores and LSE in
the same probe pass), folded on the host in float64: the folded probes' distance to it isolates
the fold; their distance to the float64 oracle includes the scores."""
import sys
import torch
sys.path.insert(0, "tests")
import iidkern
from iidkern import Probe, TokenGroups as TG
from helpers import probe_on
from oracle import oracle
from test_attention_extras import fold_precision_inputs

DEV = torch.device('cuda' if torch.cuda.is_available() else 'cpu')

for d in ((128, 256) if DEV.type == 'cuda' else (32,)):
    for dtype in (torch.bfloat16, torch.float16):
        q, k, v, q_ids, k_ids, _ = fold_precision_inputs(d, dtype)
        nq, nk = q.shape[2], k.shape[2]
        probes = [Probe(TG.ids(q_ids), TG.each(0, nk), heads="keep"), Probe(TG.each(0, nq), TG.ids(k_ids), heads="keep"),
                  Probe(TG.each(0, nq), TG.each(0, nk), heads="keep")]
        res = iidkern.attention(*(t.to(DEV) for t in (q, k, v)), probes=[probe_on(p, DEV) for p in probes], backend="triton",
                                kernel_options={"fuse_key_groups": False})
        tok = res.probes[2].double().cpu()  # [B, H, nq, nk]
        qmask = torch.stack([(q_ids == j) for j in range(5)], 1).double()  # [B, 5, nq]
        host_q = torch.einsum("bgq,bhqk->bhgk", qmask, tok)
        kmask = torch.stack([(k_ids == j) for j in range(5)], 1).double()  # [nk, 5]
        host_k = tok @ kmask
        want = oracle(q, k, v, probes=probes).probes
        for name, got, host, w in (("queries fold", res.probes[0], host_q, want[0]), ("keys fold", res.probes[1], host_k, want[1])):
            got = got.double().cpu()
            mag = w.abs().clamp_min(1e-300)
            print(f"d={d} {str(dtype)[6:]} {name}: vs host fold of the same call's token map "
                  f"{((got - host).abs() / host.abs().clamp_min(1e-300)).max():.2e}, vs float64 oracle "
                  f"{((got - w).abs() / mag).max():.2e}; token map vs oracle "
                  f"{((tok - want[2]).abs() / want[2].abs().clamp_min(1e-300)).max():.2e}")
