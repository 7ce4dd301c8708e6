"""GPU: the probe pass with grouped sides at Flux 1024^2 (bf16), for the A/B of
scratch/fold_bf16_split.patch (run once before and once after applying it): plain attention,
IID's probe with grouped image queries (4 regions) x 3 instruction segments, and the same
with query ids x each text token, probe pass forced (fuse_key_groups=False); and the bench's
two probes, which the patch should leave as they are."""
import sys

import torch

sys.path.insert(0, "scratch")
import iidkern  # noqa: E402
from iidkern import Probe, TokenGroups as TG  # noqa: E402
from ab_timing import median_ms  # noqa: E402

b, h, txt, img, d = 1, 24, 512, 4096, 128
n = txt + img
g = torch.Generator(device="cuda").manual_seed(0)
q, k, v = (torch.randn(b, h, n, d, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
regions = torch.full((n,), -1, dtype=torch.int32, device="cuda")
regions[txt:] = torch.arange(img, device="cuda", dtype=torch.int32) * 4 // img
instr = TG.segments([(0, 170), (170, 340), (340, txt)], n, device="cuda")
forced = {"fuse_key_groups": False}
cases = {  # name: (probes, kernel options)
    "plain": ([], {}),
    "regions x instructions": ([Probe(TG.ids(regions), instr, heads="keep", normalize="both")], forced),
    "regions x text tokens": ([Probe(TG.ids(regions), TG.each(0, txt), heads="mean")], forced),
    # the bench's two probes (fused IID probe + text x image map): the patch must not move them
    "bench probes": ([Probe(TG.each(txt, n), instr, heads="keep", normalize="keys"),
                      Probe(TG.each(0, txt), TG.each(txt, n), heads="mean")], {}),
}
plain = median_ms(lambda: iidkern.attention(q, k, v), reps=200)
for name, (probes, opts) in cases.items():
    ms = median_ms(lambda: iidkern.attention(q, k, v, probes=probes, kernel_options=opts), reps=200)
    print(f"{sys.argv[1] if len(sys.argv) > 1 else ''} {name:24s} {ms:.4f} ms  {ms / plain:.3f}x plain", flush=True)
