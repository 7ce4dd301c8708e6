"""Host time of HeadRouter's route-only call at Flux 1024^2 (B=2, bf16): cProfile over 30 calls
(GPU synchronized before and after; the host issues the calls). Not a test."""
import cProfile
import pstats

import torch

from iidkern.edit.headrouter import HeadRouterConfig, HeadRouterPolicy
from iidkern.policy import AttentionSite, attend

g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(2, 4608, 24, 128, generator=g).to("cuda", torch.bfloat16) for _ in range(3))
policy = HeadRouterPolicy(HeadRouterConfig(dtr_image="off"))
site = AttentionSite(block=0, block_kind="double", text=(0, 512), image=(512, 4608), step=1)
for _ in range(5):
    attend(q, k, v, site, policy, backend="triton")
torch.cuda.synchronize()
prof = cProfile.Profile()
prof.enable()
for _ in range(30):
    attend(q, k, v, site, policy, backend="triton")
prof.disable()
torch.cuda.synchronize()
pstats.Stats(prof).sort_stats("tottime").print_stats(18)
