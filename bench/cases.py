"""The list of benchmark cases, most important first.

A case is (shape, dtype, feature, implementation). The order matters on the device: a
run stopped by its time limit keeps what ran, so the three model shapes come first, then
the sequence-length sweep, then the FlexAttention tag masks (each one a fresh compile).
``BENCH_QUICK=1`` keeps a small subset (Flux 1024^2 and SD3 1024^2).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List

from .workloads import SHAPES, TAG_FEATURES

PLAIN_IMPLS = ("iidkern", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "flex")
TAG_IMPLS = ("iidkern", "sdpa_cudnn", "sdpa_efficient")  # flex tag cases come last (compiles)
FEATURE_IMPLS = {
    "probe": ("iidkern", "naive"),
    "head_weights": ("iidkern", "sdpa_cudnn+torch"),
    "block_mult": ("iidkern", "naive"),
    **{t: TAG_IMPLS for t in TAG_FEATURES},
}
MODEL_SHAPES = ("flux_1024", "sd3_1024", "flux_edit")
SWEEP_SHAPES = ("flux_256", "flux_512", "flux_2048")
SD3_SWEEP_SHAPES = ("sd3_256", "sd3_512", "sd3_2048")  # issue 5 target 1 at D=64 too


@dataclass(frozen=True)
class Case:
    shape: str
    dtype: str
    feature: str
    impl: str

    @property
    def id(self) -> str:
        return f"{self.shape}-{self.dtype}-{self.feature}-{self.impl}"

    @property
    def group(self) -> str:
        return f"{self.shape} {self.dtype} {self.feature}"


def quick_mode() -> bool:
    return os.environ.get("BENCH_QUICK", "0") not in ("", "0")


def all_cases(quick: bool = False) -> List[Case]:
    cases: List[Case] = []

    def add(shape, feature, impls, dtype="bf16"):
        cases.extend(Case(shape, dtype, feature, i) for i in impls)

    model_shapes = MODEL_SHAPES[:2] if quick else MODEL_SHAPES
    tag_features = ("tags_0", "tags_50", "tags_75") if quick else tuple(TAG_FEATURES)
    for shape in model_shapes:
        add(shape, "plain", PLAIN_IMPLS)
        for feature in ("probe", "head_weights", "block_mult", *tag_features):
            add(shape, feature, FEATURE_IMPLS[feature])
    add("flux_1024_b2", "plain", ("iidkern", "sdpa_cudnn"))
    # The Triton kernel's own times where the Hopper kernel serves the calls (D=128), kept
    # beside the Hopper kernel's for the record (what the Gluon kernel buys per feature).
    for shape in [s for s in model_shapes if SHAPES[s].head_dim == 128] + ["flux_1024_b2"]:
        add(shape, "plain", ("iidkern_triton",))
    for shape in [s for s in model_shapes if SHAPES[s].head_dim == 128]:
        add(shape, "probe", ("iidkern_triton",))
        add(shape, "block_mult", ("iidkern_triton",))
        for feature in ("tags_0", "tags_50", "tags_iid"):
            if feature in tag_features:
                add(shape, feature, ("iidkern_triton",))
    add("flux_1024_b2", "pair_stats", ("iidkern", "sdpa_cudnn+torch"))
    if not quick:
        for shape in SWEEP_SHAPES:
            add(shape, "plain", PLAIN_IMPLS)
        add("flux_1024", "plain", PLAIN_IMPLS, dtype="fp16")
        add("sd3_1024", "plain", ("iidkern", "sdpa_cudnn"), dtype="fp16")
        for shape in SD3_SWEEP_SHAPES:
            add(shape, "plain", ("iidkern", "sdpa_cudnn", "sdpa_flash", "flex"))
        for shape in SWEEP_SHAPES + SD3_SWEEP_SHAPES:  # both half dtypes at every size
            add(shape, "plain", ("iidkern", "sdpa_cudnn"), dtype="fp16")
    for shape in model_shapes:
        for feature in (("tags_50",) if quick else tag_features):
            add(shape, feature, ("flex",))
        if quick:
            break
    assert all(c.shape in SHAPES for c in cases)
    return cases
