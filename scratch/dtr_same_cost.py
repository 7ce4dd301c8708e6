"""HeadRouter's attention side per call at Flux 1024^2 (B=2: recon + edit row, 24 heads x 128, bf16):
plain attention, IARouter alone, paper-form DTR with the previous step's map (one fused pass with a
block multiplier), and with the call's own map (dtr_map="same": the plain call with probe + LSE,
then the small text-key call). Median of CUDA-event times over interleaved rounds. Not a test."""
import statistics
import sys

import torch

import iidkern
from iidkern.edit import headrouter
from iidkern.edit.headrouter import HeadRouterConfig, HeadRouterPolicy
from iidkern.policy import AttentionSite, attend

n_text, n_img, heads, dim = 512, 4096, 24, 128
if len(sys.argv) > 1 and sys.argv[1] == "sd3":
    n_text, n_img, heads, dim = 333, 4096, 24, 64
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(2, n_text + n_img, heads, dim, generator=g).to("cuda", torch.bfloat16) for _ in range(3))
text, image = (0, n_text), (n_text, n_text + n_img)

policies = {
    "route only": HeadRouterPolicy(HeadRouterConfig(dtr_image="off")),
    "dtr previous": HeadRouterPolicy(HeadRouterConfig(route=False, dtr_map="previous")),
    "dtr same": HeadRouterPolicy(HeadRouterConfig(route=False, dtr_map="same")),
    "route+dtr previous": HeadRouterPolicy(HeadRouterConfig(dtr_map="previous")),
    "route+dtr same": HeadRouterPolicy(HeadRouterConfig(dtr_map="same")),
    "route+dtr same, torch stats": HeadRouterPolicy(HeadRouterConfig(dtr_map="same")),
}
steps = {name: 0 for name in policies}
kernel_stats = headrouter.branch_pair_stats


def torch_stats(out, pairs, layout, backend=None):
    return kernel_stats(out, pairs, layout, backend="reference")


def call(name):
    if name == "plain":
        return iidkern.attention(q, k, v, layout="bnhd")
    steps[name] += 1
    site = AttentionSite(block=0, block_kind="double", text=text, image=image, step=steps[name])
    if name.endswith("torch stats"):  # the pair statistics of the weighted output in PyTorch (before s30)
        headrouter.branch_pair_stats = torch_stats
        try:
            return attend(q, k, v, site, policies[name], backend="triton")
        finally:
            headrouter.branch_pair_stats = kernel_stats
    return attend(q, k, v, site, policies[name], backend="triton")


names = ["plain"] + list(policies)
times = {name: [] for name in names}
for name in names:
    for _ in range(3):
        call(name)
torch.cuda.synchronize()
import os  # noqa: E402

only = os.environ.get("ONLY")  # names separated by "|": time only these (and plain)
if only:
    names = ["plain"] + [n for n in names if n in only.split("|")]
back_to_back = os.environ.get("BACK_TO_BACK") == "1"  # 20 calls between two events: max(host, GPU) per call
for _ in range(int(os.environ.get("ROUNDS", "5"))):
    for name in names:
        if back_to_back:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            a.record()
            for _ in range(20):
                call(name)
            b.record()
            torch.cuda.synchronize()
            times[name].append(a.elapsed_time(b) / 20)
            continue
        for _ in range(20):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            call(name)
            b.record()
            torch.cuda.synchronize()
            times[name].append(a.elapsed_time(b))
print(f"{torch.cuda.get_device_name()} torch {torch.__version__} | B=2 H={heads} D={dim} text {n_text} image {n_img} bf16")
if times["plain"]:  # (ROUNDS=0: set up and warm up only, for scratch/pair_kernel_gpu_time.py)
    base = statistics.median(times["plain"])
    for name in names:
        med = statistics.median(times[name])
        print(f"{name:20s} {med:8.3f} ms  {med / base:6.3f}x plain")
