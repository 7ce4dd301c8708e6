"""Session 31: compile (sm_90, no GPU) the Triton kernel's specializations of the calls that faulted on the
H200 (scratch/replay_s31.py) and of neighbours; print shared memory (metadata), and the TTGIR's local
allocations, to see which ingredient makes the kernel read shared memory past its allocation.
Usage: python scratch/smem_s31.py [dump_dir]"""
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"
sys.path.insert(0, "tests")
import torch  # noqa: E402

import iidkern  # noqa: E402
import iidkern.kernels as kernels  # noqa: E402
from iidkern import Probe, TokenGroups, ValueProbe  # noqa: E402
from iidkern.kernels import fast_launch  # noqa: E402
import triton_compile as tc  # noqa: E402

kernels.INTERPRETING = True
recorded = []
fast_launch.Launcher.launch = lambda self, grid, args, kwargs: recorded.append((self.kernel, args, kwargs))


def call(nq=1, nk=1, d=128, dtype=torch.bfloat16, b=2, h=2, vp=True, kp=True, hw=True):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, h, nq, d).to(dtype)
    k = torch.randn(b, h, nk, d).to(dtype)
    v = torch.randn(b, h, nk, d).to(dtype)
    probes = []
    if vp:
        probes.append(ValueProbe(torch.randn(nk, 1, generator=g), TokenGroups.each(0, 1), heads="mean"))
    if kp:
        ids = torch.randint(-1, 2, (nk,), generator=g, dtype=torch.int32)
        ids[-1] = 1
        probes.append(Probe(TokenGroups.each(0, nq), TokenGroups.ids(ids), heads="mean"))
    return iidkern.attention(q, k, v, layout="bhnd", scale=0.99999, probes=probes,
                             head_weights=torch.tensor([1.0627, 0.3934])[:h] if hw else None, backend="triton")


CASES = {
    "vp+kp nk1": dict(), "vp+kp nk59": dict(nk=59, nq=677), "vp+kp nk100": dict(nk=100, nq=677),
    "vp+kp nk64": dict(nk=64), "vp nk1": dict(kp=False), "kp nk1": dict(vp=False),
    "vp+kp nk1 nohw": dict(hw=False), "vp+kp nk1 fp16": dict(dtype=torch.float16),
    "vp+kp nk1 d64": dict(d=64), "vp+kp nk59 d64": dict(d=64, nk=59),
}
only = [a for a in sys.argv[1:] if not a.startswith("/")]
dump = next((a for a in sys.argv[1:] if a.startswith("/")), None)
for name, kw in CASES.items():
    if only and name not in only:
        continue
    del recorded[:]
    call(**kw)
    for kernel, args, kwargs in recorded:
        if kernel.fn.__name__ != "attn_fwd_kernel":
            continue
        c = tc.compile_spec(kernel, args, kwargs, tc.TARGETS["sm_90"])
        const = {key: val for key, val in kwargs.items() if key.isupper() and key not in ("BLOCK_D",)}
        opts = {key: kwargs[key] for key in ("num_warps", "num_stages", "maxnreg") if key in kwargs}
        print(f"{name:18s} shared={c.metadata.shared:6d} {opts} {const}", flush=True)
        if dump:
            os.makedirs(dump, exist_ok=True)
            tag = name.replace(" ", "_").replace("+", "")
            for ext in ("ttgir", "ptx"):
                with open(f"{dump}/{tag}.{ext}", "w") as f:
                    f.write(c.asm[ext])
