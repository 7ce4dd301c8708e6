"""Hypothesis fuzz: random shapes, layouts, dtypes, tags and probes vs the float64 oracle."""
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import iidkern
from iidkern import Probe, TokenGroups as TG
from iidkern.reference import attention_reference
from helpers import OUT_TOL, PROBE_TOL, assert_close_rel, assert_lse_equal, make_qkv, random_tags


@st.composite
def cases(draw):
    b = draw(st.integers(1, 2))
    h = draw(st.integers(1, 3))
    nq = draw(st.integers(1, 70))
    nk = draw(st.integers(1, 70))
    d = draw(st.sampled_from([8, 16, 24, 32, 64]))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    layout = draw(st.sampled_from(["bhnd", "bnhd"]))
    use_tags = draw(st.booleans())
    density = draw(st.floats(0.05, 0.9))
    block = draw(st.sampled_from([(16, 16), (16, 32), (32, 16)]))
    seed = draw(st.integers(0, 2**31 - 1))
    return b, h, nq, nk, d, dtype, layout, use_tags, density, block, seed


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_fuzz_against_reference(case):
    b, h, nq, nk, d, dtype, layout, use_tags, density, (bm, bn), seed = case
    g = torch.Generator().manual_seed(seed)
    q, k, v = make_qkv(b, h, nq, nk, d, dtype=dtype, layout=layout, generator=g)
    tags = (random_tags(b, nq, density=density, generator=g), random_tags(b, nk, density=density, generator=g)) \
        if use_tags else None
    q_lo = int(torch.randint(0, nq, (1,), generator=g))
    k_hi = int(torch.randint(1, nk + 1, (1,), generator=g))
    kg = torch.randint(-1, 3, (nk,), generator=g, dtype=torch.int32)
    kg[0] = 0  # at least one probed key
    probes = [Probe(TG.each(q_lo, nq), TG.each(0, k_hi), heads="mean"),
              Probe(TG.each(0, nq), TG.ids(kg, 3), heads="keep")]
    res = iidkern.attention(q, k, v, layout=layout, tags=tags, probes=probes, return_lse=True, backend="triton",
                            kernel_options={"BLOCK_M": bm, "BLOCK_N": bn, "poison": True})
    ref = attention_reference(q, k, v, layout=layout, tags=tags, probes=probes)
    assert torch.isfinite(res.out.float()).all()
    if ref.out.abs().max() > 0:
        assert_close_rel(res.out, ref.out, OUT_TOL[dtype])
    else:
        assert (res.out == 0).all()
    assert_lse_equal(res.lse, ref.lse, tol=1e-3)
    for got, want in zip(res.probes, ref.probes):
        if want.abs().max() > 0:
            assert_close_rel(got, want, PROBE_TOL[dtype])
        else:
            assert (got == 0).all()
