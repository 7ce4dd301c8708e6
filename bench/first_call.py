"""First-call (compile) cost of iidkern in a fresh process, for issue 5 target 6.

    TRITON_CACHE_DIR=/tmp/tc python -m bench.first_call --label cold --out first_call.jsonl
    TRITON_CACHE_DIR=/tmp/tc python -m bench.first_call --label warm --out first_call.jsonl

The first run compiles every kernel specialization it meets; the second, a new process
with the same cache directory, should only load them. Appends one JSON line per run.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

CASES = (("flux_1024", "plain"), ("flux_1024", "probe"), ("flux_1024", "tags_50"), ("sd3_1024", "plain"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="time iidkern's first calls in this process")
    ap.add_argument("--label", required=True, help="e.g. cold / warm")
    ap.add_argument("--out", type=Path, required=True, help="JSON-lines file to append to")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("first_call: no CUDA GPU, nothing measured")
        return 0
    t0 = time.perf_counter()
    from bench.implementations import make_impl
    from bench.timing import timed_first_call
    from bench.workloads import SHAPES, build_workload, random_qkv

    import_s = time.perf_counter() - t0
    device = torch.device("cuda")
    x = torch.randn(1024, 1024, device=device)
    (x @ x).sum().item()  # CUDA context and cuBLAS up before any timing

    record = {"label": args.label, "triton_cache_dir": os.environ.get("TRITON_CACHE_DIR", "(default)"),
              "import_s": import_s, "cases": {}}
    for shape_name, feature in CASES:
        shape = SHAPES[shape_name]
        workload = build_workload(shape, torch.bfloat16, feature, device)
        impl = make_impl("iidkern", workload)
        q, k, v = random_qkv(shape, torch.bfloat16, device, seed=0)
        _, first_s = timed_first_call(lambda: impl.call(q, k, v))
        _, second_s = timed_first_call(lambda: impl.call(q, k, v))
        record["cases"][f"{shape_name} {feature}"] = {"first_s": first_s, "second_ms": second_s * 1e3}
        print(f"[{args.label}] {shape_name} {feature}: first call {first_s:.2f} s, next {second_s * 1e3:.3f} ms",
              flush=True)
    record["total_first_s"] = sum(c["first_s"] for c in record["cases"].values())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"[{args.label}] total first-call time {record['total_first_s']:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
