"""Scratch (GPU): the Gluon prototypes of scratch/gluon_fa.py against SDPA and the iidkern
kernel at the Flux (D=128) shapes: correctness per variant in a child process with a time
limit (a barrier bug hangs, it must not eat the device call), then interleaved timing.

    python scratch/gluon_run.py            # all
    python scratch/gluon_run.py check overlap:2 bf16
"""
import os
import subprocess
import sys

sys.path[:0] = [os.path.dirname(__file__), os.path.join(os.path.dirname(__file__), "..")]
VARIANTS = ["pingpong:3", "pp_overlap:2", "pp_overlap:3"]   # kind:NBUF
CHECK_SHAPES = ["flux_256", "flux_1024", "flux_edit"]
TIME_SHAPES = ["flux_512", "flux_1024", "flux_edit", "flux_2048"]


def check(variant, dt):
    import torch
    import gluon_fa
    from bench.workloads import SHAPES, DTYPES, random_qkv
    kind, nbuf = variant.split(":")
    worst = 0.0
    for name in CHECK_SHAPES:
        q, k, v = random_qkv(SHAPES[name], DTYPES[dt], torch.device("cuda"), seed=1)
        out = torch.full_like(q, float("nan"))
        gluon_fa.launch(kind, q, k, v, NBUF=int(nbuf), out=out)
        torch.cuda.synchronize()
        ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
        err = (out.float() - ref).abs().max().item()
        worst = max(worst, err if err == err else float("inf"))
        c = gluon_fa.launch.last
        print(f"CHECK {variant} {dt} {name}: max|err| {err:.2e} regs {getattr(c, 'n_regs', '?')} "
              f"spills {getattr(c, 'n_spills', '?')}", flush=True)
    print("RESULT", variant, dt, "ok" if worst < 2e-2 else "BAD", flush=True)


def time(variants, dt):
    import torch
    import iidkern
    import gluon_fa
    from ab_timing import interleaved_ratios
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from bench.workloads import SHAPES, DTYPES, random_qkv
    F = torch.nn.functional

    def sdpa(backend, q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)
    for name in TIME_SHAPES:
        q, k, v = random_qkv(SHAPES[name], DTYPES[dt], torch.device("cuda"), seed=0)
        fns = {"cudnn": lambda: sdpa(SDPBackend.CUDNN_ATTENTION, q, k, v),
               "fa2": lambda: sdpa(SDPBackend.FLASH_ATTENTION, q, k, v),
               "iidkern": lambda: iidkern.attention(q, k, v)}
        for var in variants:
            kind, nbuf = var.split(":")
            fns[var] = lambda kind=kind, nbuf=int(nbuf): gluon_fa.launch(kind, q, k, v, NBUF=nbuf)
        interleaved_ratios(fns, "cudnn", rounds=5, label=f"{name}/{dt}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "check":
        check(sys.argv[2], sys.argv[3])
    elif len(sys.argv) > 1 and sys.argv[1] == "time":
        time(sys.argv[3].split(",") if len(sys.argv) > 3 and sys.argv[3] else [], sys.argv[2])
    else:
        passed = {"bf16": [], "fp16": []}
        for dt in passed:
            for var in VARIANTS:
                try:
                    r = subprocess.run([sys.executable, __file__, "check", var, dt], capture_output=True, text=True, timeout=90)
                    print(r.stdout.strip()[-3000:], r.stderr.strip()[-1500:] if r.returncode else "", flush=True)
                    if f"RESULT {var} {dt} ok" in r.stdout:
                        passed[dt].append(var)
                except subprocess.TimeoutExpired:
                    print("HANG", var, dt, flush=True)
        for dt, vs in passed.items():
            subprocess.run([sys.executable, __file__, "time", dt, ",".join(vs)], timeout=240)
