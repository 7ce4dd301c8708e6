"""Token-tag masks: exactness, overlapping tags, fully masked rows, and real tile skipping."""
import pytest
import torch

import iidkern
from iidkern.kernels.tiles import classify_tiles
from iidkern.reference import attention_reference
from helpers import OUT_TOL, assert_close_rel, assert_lse_equal, make_qkv, random_tags
from oracle import tiles_visited

TILES = {"BLOCK_M": 16, "BLOCK_N": 16, "poison": True}


def dense_tile_visits(q_tags, k_tags, bm, bn):
    """Independent count: key tiles holding at least one allowed (query, key) pair, per query tile."""
    return tiles_visited(iidkern.allowed_pairs(q_tags, k_tags), bm, bn)  # [B, Mt]


def assert_visits_exactly_the_meeting_tiles(res, q_tags, k_tags, bm=16, bn=16):
    """Every head of each query tile visited exactly the key tiles holding an allowed pair."""
    expected = dense_tile_visits(q_tags, k_tags, bm, bn)  # [B, Mt]
    visited = res.tiles_visited  # [B, H, Mt]
    assert torch.equal(visited, expected[:, None, :].expand_as(visited).to(visited.dtype))


@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tag_dtype", [torch.int32, torch.int64])
def test_random_overlapping_tags(layout, dtype, tag_dtype):
    g = torch.Generator().manual_seed(21)
    b, h, nq, nk = 2, 3, 53, 47
    q, k, v = make_qkv(b, h, nq, nk, 32, dtype=dtype, layout=layout, generator=g)
    qt, kt = random_tags(b, nq, generator=g, dtype=tag_dtype), random_tags(b, nk, generator=g, dtype=tag_dtype)
    res = iidkern.attention(q, k, v, layout=layout, tags=(qt, kt), backend="triton", return_lse=True,
                            kernel_options=TILES)
    ref = attention_reference(q, k, v, layout=layout, tags=(qt, kt))
    assert_close_rel(res.out, ref.out, OUT_TOL[dtype])
    assert_lse_equal(res.lse, ref.lse, tol=1e-3)


def test_fully_masked_rows_give_zeros_and_neg_inf_lse():
    g = torch.Generator().manual_seed(22)
    q, k, v = make_qkv(2, 2, 40, 35, 16, generator=g)
    qt = random_tags(2, 40, generator=g)
    qt[:, ::3] = 0  # every third query holds no bit: it may attend nothing
    kt = random_tags(2, 35, generator=g) | 1
    res = iidkern.attention(q, k, v, tags=(qt, kt), backend="triton", return_lse=True, kernel_options=TILES)
    empty = qt == 0
    assert torch.isfinite(res.out).all(), "fully masked rows must not produce NaN/inf"
    assert (res.out.permute(0, 2, 1, 3)[empty] == 0).all()
    assert torch.isneginf(res.lse.permute(0, 2, 1)[empty]).all()
    assert_close_rel(res.out, attention_reference(q, k, v, tags=(qt, kt)).out, 2e-5)


def test_all_keys_masked_everywhere():
    q, k, v = make_qkv(1, 2, 20, 20, 16)
    qt = torch.ones(1, 20, dtype=torch.int32)
    kt = torch.full((1, 20), 2, dtype=torch.int32)
    res = iidkern.attention(q, k, v, tags=(qt, kt), backend="triton", return_lse=True, count_tiles=True,
                            kernel_options=TILES)
    assert (res.out == 0).all() and torch.isneginf(res.lse).all()
    assert (res.tiles_visited == 0).all(), "no tile may be visited when nothing can meet"


def test_one_dimensional_tags_are_shared_by_the_batch():
    g = torch.Generator().manual_seed(23)
    q, k, v = make_qkv(3, 1, 30, 30, 16, generator=g)
    qt, kt = random_tags(1, 30, generator=g)[0], random_tags(1, 30, generator=g)[0]
    out = iidkern.attention(q, k, v, tags=(qt, kt), backend="triton", kernel_options=TILES)
    ref = attention_reference(q, k, v, tags=(qt.expand(3, 30), kt.expand(3, 30))).out
    assert_close_rel(out, ref, 2e-5)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_tags_of_batch_one_are_shared_by_the_batch(backend):
    """[1, N] tags (what instruction_tags returns for [N_instr, N_img] region masks) apply to
    every batch row, like [N] tags."""
    g = torch.Generator().manual_seed(29)
    q, k, v = make_qkv(3, 2, 30, 30, 16, generator=g)
    qt, kt = random_tags(1, 30, generator=g), random_tags(3, 30, generator=g)
    out = iidkern.attention(q, k, v, tags=(qt, kt), backend=backend, kernel_options=TILES if backend == "triton" else None)
    ref = attention_reference(q, k, v, tags=(qt.expand(3, 30), kt), compute_dtype=torch.float64).out
    assert_close_rel(out, ref, 2e-5)
    with pytest.raises(ValueError, match="q_tags"):
        iidkern.attention(q, k, v, tags=(random_tags(2, 30, generator=g), kt), backend=backend)


def test_a_tag_mask_is_a_snapshot_of_its_tags():
    """The mask copies its tags: changing the tensors afterwards changes neither its cached
    tile lists nor what the kernels read (a mask on live tags whose lists were cached for
    the old values would skip tiles the new tags need)."""
    g = torch.Generator().manual_seed(31)
    q, k, v = make_qkv(1, 2, 40, 40, 16, generator=g)
    qt = torch.ones(1, 40, dtype=torch.int64)
    kt = torch.ones(1, 40, dtype=torch.int64)
    kt[:, 20:] = 2
    mask = iidkern.tag_mask(qt, kt)
    before = iidkern.attention(q, k, v, tags=mask, backend="triton", kernel_options=TILES)
    ref = attention_reference(q, k, v, tags=(qt.clone(), kt.clone()), compute_dtype=torch.float64).out
    qt[:] = 3  # would now see every key
    after = iidkern.attention(q, k, v, tags=mask, backend="triton", kernel_options=TILES)
    assert torch.equal(before, after)
    assert_close_rel(after, ref, 2e-5)
    fresh = iidkern.attention(q, k, v, tags=iidkern.tag_mask(qt, kt), backend="triton", kernel_options=TILES)
    assert_close_rel(fresh, attention_reference(q, k, v, compute_dtype=torch.float64).out, 2e-5)


def test_tile_skipping_counts_exactly_the_meeting_tiles():
    """Block-structured tags: the kernel must visit exactly the key tiles that hold an allowed pair."""
    g = torch.Generator().manual_seed(24)
    b, h, n = 2, 2, 99
    q, k, v = make_qkv(b, h, n, n, 16, generator=g)
    seg = torch.arange(n) // 25  # four segments of 25 tokens (tile 16: edges cut tiles -> partial tiles)
    qt = (1 << seg).expand(b, n).clone()
    kt = (1 << seg).expand(b, n).clone()
    kt[1, 90:] = 0  # batch row 1: last keys invisible
    res = iidkern.attention(q, k, v, tags=(qt, kt), backend="triton", count_tiles=True, kernel_options=TILES)
    assert res.tile_shape == (16, 16)
    assert_visits_exactly_the_meeting_tiles(res, qt, kt)
    n_tiles = -(-n // 16)
    assert res.tiles_visited.float().mean() < 0.5 * n_tiles, "block-diagonal tags must skip most tiles"
    assert_close_rel(res.out, attention_reference(q, k, v, tags=(qt, kt)).out, 2e-5)


def test_without_tags_every_tile_is_visited():
    q, k, v = make_qkv(1, 1, 33, 50, 16)
    res = iidkern.attention(q, k, v, backend="triton", count_tiles=True, kernel_options=TILES)
    assert (res.tiles_visited == 4).all()  # ceil(50 / 16)
    assert res.tile_shape == (16, 16)
    res = iidkern.attention(q, k, v, backend="triton", return_lse=True, kernel_options=TILES)
    assert res.tiles_visited is None and res.tile_shape is None  # no counts, no shape they refer to


def test_tile_classification_rules():
    qt = torch.tensor([[1, 1, 3, 3]])
    kt = torch.tensor([[1, 1, 2, 2, 4, 4]])
    skip, full = classify_tiles(qt, kt, 2, 2)
    # q tile 0 = {1}, q tile 1 = {3}; k tiles {1}, {2}, {4}
    assert skip.tolist() == [[[False, True, True], [False, False, True]]]
    assert full.tolist() == [[[True, False, False], [True, True, False]]]
    # a ragged last key tile is never full (its padding must be masked)
    skip, full = classify_tiles(qt, torch.tensor([[1, 1, 1]]), 2, 2)
    assert full[0, :, 1].tolist() == [False, False] and not skip.any()


def test_tag_mask_object_is_reusable_and_cached():
    g = torch.Generator().manual_seed(25)
    q, k, v = make_qkv(1, 2, 40, 40, 16, generator=g)
    qt, kt = random_tags(1, 40, generator=g), random_tags(1, 40, generator=g)
    mask = iidkern.tag_mask(qt, kt)
    a = iidkern.attention(q, k, v, tags=mask, backend="triton", kernel_options=TILES)
    lists = mask.tile_lists(16, 16, 1)
    b = iidkern.attention(q, k, v, tags=mask, backend="triton", kernel_options=TILES)
    assert mask.tile_lists(16, 16, 1) is lists
    assert torch.equal(a, b)
    # the masked attention itself (two runs agreeing would not show tags that were ignored)
    want = attention_reference(q, k, v, tags=(qt, kt), compute_dtype=torch.float64).out
    assert_close_rel(a, want, OUT_TOL[torch.float32])
    # sparsity: the fraction of 16 x 16 tiles with no allowed pair (40 tokens: 3 x 3 tiles, the last ragged)
    allowed = (qt[0][:, None] & kt[0][None, :]) != 0
    visited = tiles_visited(allowed[None], 16, 16).sum().item()
    assert mask.sparsity(16, 16) == pytest.approx(1.0 - visited / 9)


def test_instruction_tags_allow_table():
    """The IID allow table of METHODS.md, checked pair by pair against a hand-written rule."""
    n_img = 8  # 6 text tokens (two instructions) before the image, 2 conditioning tokens after
    instructions = [(0, 3), (3, 6)]
    image = (6, 14)
    cond = [(14, 16)]
    masks = torch.zeros(2, n_img, dtype=torch.bool)
    masks[0, :3] = True
    masks[1, 2:5] = True  # token 2 lies in both regions; tokens 5..7 are background
    for background in ("none", "all"):
        qt, kt = iidkern.instruction_tags(16, image=image, instructions=instructions, region_masks=masks,
                                          background=background, always_visible=cond)
        allow = iidkern.allowed_pairs(qt, kt)[0]

        def kind(t):
            if t < 6:
                return ("P", 0 if t < 3 else 1)
            if t < 14:
                return ("Z", t - 6)
            return ("C", None)

        for i in range(16):
            for j in range(16):
                (ki, ai), (kj, aj) = kind(i), kind(j)
                if ki == "C" or kj == "C":
                    want = True
                elif ki == "P" and kj == "P":
                    want = ai == aj
                elif ki == "P" and kj == "Z":
                    want = True
                elif ki == "Z" and kj == "Z":
                    want = True
                else:  # image query -> text key
                    regions = {r for r in range(2) if masks[r, ai]}
                    if not regions and background == "all":
                        regions = {0, 1}
                    want = aj in regions
                assert bool(allow[i, j]) == want, (background, i, j)


def test_longest_run_of_full_tiles():
    from iidkern.kernels.tiles import longest_run
    sel = torch.tensor([[[0, 1, 1, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1],
                         [1, 1, 0, 1, 1, 0, 0, 1]]], dtype=torch.bool)
    start, stop = longest_run(sel)
    assert start.tolist() == [[4, 0, 0, 0]] and stop.tolist() == [[7, 0, 8, 2]]  # ties: the first run


def _band_tags(g):
    """[2, 90] query and [2, 75] key tags (tiles of 16, 4 random bits). Queries 0..39 hold
    bit 0 only (query tiles 0 and 1 wholly): for them key tile 0 is full, tile 1 partial,
    tiles 2-3 full (the run) and the ragged tile 4 full but ragged. Queries 80..89 (query
    tile 5) hold bit 5 only and meet only keys 72..74: tiles 0-3 skipped, tile 4 partial and
    ragged. The other query tiles see a random mix."""
    qt, kt = random_tags(2, 90, generator=g, density=0.7), random_tags(2, 75, generator=g, density=0.7)
    qt[:, :40], qt[:, 80:] = 1, 1 << 5
    kt[:, 0:16], kt[:, 16:24], kt[:, 24:32], kt[:, 32:64] = 1, 2, 1, 1
    kt[:, 64:] |= 1
    kt[:, 72:] |= 1 << 5
    return qt, kt


@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_the_kernel_walks_both_lists_the_run_and_the_ragged_tile(layout):
    """Every kind of visit at once (a full tile outside the run, partial tiles, the run, a
    full-but-ragged and a partial ragged tile, skipped tiles): exact against the float64
    reference, and each query tile visits exactly the tiles holding an allowed pair."""
    g = torch.Generator().manual_seed(30)
    qt, kt = _band_tags(g)
    q, k, v = make_qkv(2, 3, 90, 75, 32, layout=layout, generator=g)
    res = iidkern.attention(q, k, v, layout=layout, tags=(qt, kt), backend="triton", count_tiles=True,
                            return_lse=True, kernel_options=TILES)
    ref = attention_reference(q, k, v, layout=layout, tags=(qt, kt), compute_dtype=torch.float64)
    assert_close_rel(res.out, ref.out, OUT_TOL[torch.float32])
    assert_lse_equal(res.lse, ref.lse, tol=1e-3)
    assert_visits_exactly_the_meeting_tiles(res, qt, kt)


def test_tile_lists_partition_the_visited_tiles():
    # partial list, full list and the contiguous full run are disjoint, cover every tile
    # that is not skipped, and the run holds only full tiles.
    from iidkern.kernels.tiles import classify_tiles
    qt, kt = _band_tags(torch.Generator().manual_seed(26))
    mask = iidkern.tag_mask(qt, kt)
    lists = mask.tile_lists(16, 16, 2)
    skip, full = classify_tiles(qt, kt, 16, 16)
    mt, nt = skip.shape[1:]
    for b in range(2):
        for i in range(mt):
            part = set(lists.partial_index[b, i, :lists.partial_count[b, i]].tolist())
            rest = set(lists.full_index[b, i, :lists.full_count[b, i]].tolist())
            run = set(range(lists.run_start[b, i].item(), lists.run_stop[b, i].item()))
            ragged = {nt - 1} if lists.ragged_full[b, i] else set()  # run by the kernel outside the lists
            assert not (part & rest) and not (part & run) and not (rest & run) and not (ragged & (part | rest | run))
            assert part | rest | run | ragged == {j for j in range(nt) if not skip[b, i, j]}
            assert all(full[b, i, j] for j in run | rest) and not any(full[b, i, j] for j in part)
    assert (lists.run_stop - lists.run_start).max() >= 2 and lists.full_count.max() >= 1
    assert lists.ragged_full[:, :2].all()  # query tiles 0 and 1 lie in the band
    partial_last = [nt - 1 in lists.partial_index[b, i, :lists.partial_count[b, i]].tolist()
                    for b in range(2) for i in range(mt)]
    assert lists.partial_count[:, :2].min() >= 1 and partial_last.count(True) >= 2  # query tile 5 at least
    assert (skip[:, 5, :4]).all()  # 75 keys: a ragged last tile, both cases


def _ragged_case_tags(b, nq, nk):
    """Query tiles of 16: tile 0 shares bit 0 with every real key of the ragged last key tile
    (full but ragged), tile 1 holds queries without it (partial), tile 2 none (skipped); the
    other key tiles are full for every query."""
    qt = torch.full((b, nq), 0b001, dtype=torch.int64)
    qt[:, 16:32:2] = 0b010
    qt[:, 17:32:2] = 0b011
    qt[:, 32:] = 0b100
    kt = torch.full((b, nk), 0b111, dtype=torch.int64)
    kt[:, nk - nk % 16:] = 0b001
    return qt, kt


def test_a_ragged_last_tile_full_for_its_real_keys_is_in_no_list():
    """tiles.ragged_tile_full: such a tile is left out of the lists (the kernel runs it like
    untagged attention's ragged tile) and still counted as visited; partial and skipped
    ragged tiles keep their classes; without a ragged tile the flag is never set."""
    from iidkern.kernels.tiles import ragged_tile_full
    qt, kt = _ragged_case_tags(2, 40, 45)
    want = torch.tensor([[True, False, False]] * 2)
    assert torch.equal(ragged_tile_full(qt, kt, 16, 16), want)
    lists = iidkern.tag_mask(qt, kt).tile_lists(16, 16, 2)
    assert lists.ragged_full.tolist() == want.int().tolist()
    partial_has_last = [[2 in lists.partial_index[b, i, :lists.partial_count[b, i]].tolist() for i in range(3)]
                        for b in range(2)]
    assert partial_has_last == [[False, True, False]] * 2
    assert torch.equal(iidkern.tag_mask(qt, kt).tile_counts(16, 16, 2), dense_tile_visits(qt, kt, 16, 16))
    assert not ragged_tile_full(qt, kt[:, :32], 16, 16).any()  # 32 keys: nothing ragged
    # int32 tags, and 1-D tags shared by the batch (the mask expands them), flag the same.
    assert torch.equal(ragged_tile_full(qt.int(), kt.int(), 16, 16), want)
    assert iidkern.tag_mask(qt[0].int(), kt[0]).tile_lists(16, 16, 2).ragged_full.tolist() == want.int().tolist()
    # The flag reads real keys only: one key of the tile without the shared bit breaks it.
    kt[:, -1] = 0b100
    assert not ragged_tile_full(qt, kt, 16, 16).any()


@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize("extras", ["none", "all"])
@pytest.mark.parametrize("nk", [45, 48])
def test_the_kernel_runs_a_full_but_ragged_tile_bounds_masked(layout, extras, nk):
    """The kernel side of the rule above, alone and beside every extra of the tag path
    (head weights, LSE, a value probe, a fused key-group probe, a block multiplier over the
    ragged tile): exact against the float64 reference, and the tile is counted as visited.
    With 48 keys nothing is ragged (the kernel is compiled without the ragged step)."""
    from iidkern import BlockMultiplier, Probe, TokenGroups as TG, ValueProbe
    from helpers import PROBE_TOL, random_key_groups
    g = torch.Generator().manual_seed(29)
    b, h, nq = 2, 3, 40
    q, k, v = make_qkv(b, h, nq, nk, 32, layout=layout, generator=g)
    qt, kt = _ragged_case_tags(b, nq, nk)
    kw = dict(tags=(qt, kt))
    if extras == "all":
        kw.update(head_weights=torch.rand(b, h, generator=g) + 0.5,
                  probes=[Probe(TG.each(0, nq), random_key_groups(nk, (20, nk), 3, g), heads="keep"),
                          ValueProbe(torch.randn(b, nk, 3, generator=g), TG.each(0, nq))],
                  block_multiplier=BlockMultiplier(0.5 + torch.rand(b, 12, 20, generator=g), query_start=3,
                                                   key_start=nk - 20))
    res = iidkern.attention(q, k, v, layout=layout, backend="triton", count_tiles=True, return_lse=True,
                            kernel_options=TILES, **kw)
    ref = attention_reference(q, k, v, layout=layout, compute_dtype=torch.float64, **kw)
    assert_close_rel(res.out, ref.out, OUT_TOL[torch.float32])
    assert_lse_equal(res.lse, ref.lse, tol=1e-3)
    for got, want in zip(res.probes, ref.probes):
        assert_close_rel(got, want, PROBE_TOL[torch.float32], "probe")
    assert_visits_exactly_the_meeting_tiles(res, qt, kt)


def test_visit_lists_hold_full_then_partial_tiles_in_order():
    """The Hopper kernel's one list per query tile: the full tiles, then the partial ones,
    each in increasing order, and nothing skipped; cached per tile shape like tile_lists."""
    g = torch.Generator().manual_seed(27)
    qt, kt = random_tags(2, 90, generator=g, density=0.6), random_tags(2, 75, generator=g, density=0.6)
    qt[:, :40], kt[:, 10:60] = 1, 1
    qt[1, 64:80] = 0  # a query tile with nothing to visit
    mask = iidkern.tag_mask(qt, kt)
    lists = mask.visit_lists(16, 16, 2)
    assert mask.visit_lists(16, 16, 2) is lists
    skip, full = classify_tiles(qt, kt, 16, 16)
    mt, nt = skip.shape[1:]
    assert lists.index.shape == (2, mt, nt) and lists.index.dtype == torch.int32
    for b in range(2):
        for i in range(mt):
            n_full, n_visit = lists.full_count[b, i].item(), lists.visit_count[b, i].item()
            want_full = [j for j in range(nt) if full[b, i, j]]
            want_partial = [j for j in range(nt) if not full[b, i, j] and not skip[b, i, j]]
            assert lists.index[b, i, :n_full].tolist() == want_full
            assert lists.index[b, i, n_full:n_visit].tolist() == want_partial
    assert lists.visit_count[1, 4] == 0 and (lists.full_count > 0).any() and (lists.visit_count > lists.full_count).any()


def _walk_visit_lists(q, k, v, q_tags, k_tags, bm, bn):
    """The Hopper kernel's schedule in float64 torch: per query tile, the online softmax over
    its visit list, the first and the partial tiles masked, the full ones not, and nothing else
    read. It checks that the lists make that schedule exact (the kernel runs on the GPU tests)."""
    lists = iidkern.tag_mask(q_tags, k_tags).visit_lists(bm, bn, q.shape[0])
    b, h, nq, d = q.shape
    nk = k.shape[2]
    out = torch.zeros(b, h, nq, d, dtype=torch.float64)
    lse = torch.full((b, h, nq), -float("inf"), dtype=torch.float64)
    for z in range(b):
        for i in range(lists.index.shape[1]):
            rows = slice(i * bm, min(nq, (i + 1) * bm))
            m = torch.full((h, rows.stop - rows.start), -float("inf"), dtype=torch.float64)
            l = torch.zeros_like(m)
            acc = torch.zeros(h, rows.stop - rows.start, d, dtype=torch.float64)
            n_full, n_visit = lists.full_count[z, i].item(), lists.visit_count[z, i].item()
            for pos in range(n_visit):
                j = lists.index[z, i, pos].item()
                cols = slice(j * bn, min(nk, (j + 1) * bn))
                s = q[z, :, rows].double() @ k[z, :, cols].double().transpose(-1, -2)
                if pos == 0 or pos >= n_full:
                    allowed = (q_tags[z, rows, None] & k_tags[z, None, cols]) != 0
                    s = s.masked_fill(~allowed, -float("inf"))
                m_new = torch.maximum(m, s.amax(-1))
                m_use = torch.where(m_new == -float("inf"), 0.0, m_new)
                p = torch.exp(s - m_use[..., None])
                alpha = torch.exp(m - m_use)
                l = l * alpha + p.sum(-1)
                acc = acc * alpha[..., None] + p @ v[z, :, cols].double()
                m = m_new
            out[z, :, rows] = torch.where(l[..., None] > 0, acc / l[..., None], 0.0)
            lse[z, :, rows] = m + torch.log(l)
    return out, lse


@pytest.mark.parametrize("kind", ["random", "iid"])
def test_the_visit_list_schedule_is_exact(kind):
    g = torch.Generator().manual_seed(28)
    b, h, n_txt, n_img = 2, 2, 20, 70
    n = n_txt + n_img
    q, k, v = make_qkv(b, h, n, n, 8, dtype=torch.float64, generator=g)
    q = q * 3  # peaked rows, so a wrongly unmasked key would show
    if kind == "random":
        qt, kt = random_tags(b, n, generator=g, density=0.5), random_tags(b, n, generator=g, density=0.5)
    else:
        regions = torch.rand(b, 2, n_img, generator=g) < 0.5
        qt, kt = iidkern.instruction_tags(n, image=(n_txt, n), instructions=[(0, 8), (8, 16)], region_masks=regions)
    out, lse = _walk_visit_lists(q, k, v, qt, kt, 16, 16)
    ref = attention_reference(q, k, v, tags=(qt, kt), scale=1.0, compute_dtype=torch.float64)
    assert torch.isinf(ref.lse).any()
    torch.testing.assert_close(out, ref.out.double(), rtol=1e-9, atol=1e-9)
    assert_lse_equal(lse, ref.lse, tol=1e-6)  # the reference returns LSE as float32


def test_strided_tag_views_are_read_right():
    """Tags handed as strided views (a transposed [N, B] tensor, a strided slice) mean what
    their values say: the kernels read a row of tags with a unit stride, so tag_mask copies them."""
    g = torch.Generator().manual_seed(29)
    b, h, n = 2, 2, 37
    q, k, v = make_qkv(b, h, n, n, 16, generator=g)
    qt = random_tags(n, b, generator=g).T  # [B, N] with token stride B
    kt = random_tags(1, 2 * n, generator=g)[0, ::2]  # [N] with stride 2
    assert qt.stride(-1) != 1 and kt.stride(-1) != 1
    res = iidkern.attention(q, k, v, tags=(qt, kt), return_lse=True, backend="triton", kernel_options=TILES)
    ref = attention_reference(q, k, v, tags=(qt.contiguous(), kt.contiguous()))
    assert_close_rel(res.out, ref.out, OUT_TOL[torch.float32])
    assert_lse_equal(res.lse, ref.lse, tol=1e-4)


def test_a_tag_mask_built_directly_copies_strided_views():
    from iidkern.kernels.tiles import TagMask
    qt = torch.arange(12, dtype=torch.int32).view(3, 4).T  # [4, 3] with token stride 4
    mask = TagMask(qt, qt)
    assert mask.q_tags.stride(-1) == 1 and torch.equal(mask.q_tags, qt)


def _segment_tags(b, n, cuts, ragged_bits=None):
    """Block-diagonal tags: segment i of ``cuts`` holds bit i, so each query sees its own
    segment's keys. With cuts on tile boundaries every visited tile is full (none listed)."""
    tags = torch.zeros(b, n, dtype=torch.int64)
    for i, (a, z) in enumerate(zip([0, *cuts], [*cuts, n])):
        tags[:, a:z] = 1 << i
    return tags


def _tag_launch_flags(**call):
    """The Triton kernel's HAS_LISTS of a call, read from its launch."""
    from iidkern.kernels import fast_launch, launch
    with fast_launch.recording() as launches:
        res = iidkern.attention(**call)
    flags = [kw["HAS_LISTS"] for fn, _, _, kw in launches if fn is launch._ATTN]
    assert len(flags) == 1, launches
    return res, flags[0]


@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("extras", ["none", "mult", "all"])
@pytest.mark.parametrize("nk", [45, 48])
def test_tags_with_nothing_listed_run_without_the_list_loops(layout, dtype, extras, nk):
    """Block-diagonal tags on tile boundaries (and the all-allowed case) leave every list
    empty: each visited tile is in the run or is the full-but-ragged last one. The kernel is
    then compiled without the list loops (HAS_LISTS=False); alone and beside every extra of
    the tag path it is exact against the float64 reference and visits exactly the meeting
    tiles, with [B, N] int64 tags and with [N] int32 tags shared by the batch, and a head dim
    that is not a power of two. (A query that sees nothing makes its tiles partial.) "mult" (head weights and a
    block multiplier over the ragged tile) runs that tile inline; "all" adds probes, whose
    side sums keep it in a one-tile loop. A mask with a listed tile keeps the list loops."""
    from iidkern import BlockMultiplier, Probe, TokenGroups as TG, ValueProbe
    from helpers import PROBE_TOL, random_key_groups
    g = torch.Generator().manual_seed(54)
    b, h, nq = 2, 3, 40
    d = 24 if extras == "mult" else 32
    q, k, v = make_qkv(b, h, nq, nk, d, dtype=dtype, layout=layout, generator=g)
    cases = [(_segment_tags(b, nq, [16]), _segment_tags(b, nk, [16])),  # two segments, the second ragged
             (_segment_tags(1, nq, [16])[0].int(), _segment_tags(1, nk, [16])[0].int()),  # shared by the batch
             (torch.full((b, nq), 5), torch.full((b, nk), 4))]  # every key allowed
    for qt, kt in cases:
        kw = dict(tags=iidkern.tag_mask(qt, kt))
        if extras != "none":
            kw.update(head_weights=torch.rand(b, h, generator=g) + 0.5,
                      block_multiplier=BlockMultiplier(0.5 + torch.rand(b, 12, 20, generator=g), query_start=20,
                                                       key_start=nk - 20))
        if extras == "all":
            kw.update(probes=[Probe(TG.each(0, nq), random_key_groups(nk, (20, nk), 3, g), heads="keep"),
                              ValueProbe(torch.randn(b, nk, 3, generator=g), TG.each(0, nq))])
        assert kw["tags"].tile_lists(16, 16, b).has_lists is False
        res, has_lists = _tag_launch_flags(q=q, k=k, v=v, layout=layout, backend="triton", count_tiles=True,
                                           return_lse=True, kernel_options=TILES, **kw)
        assert has_lists is False
        ref = attention_reference(q, k, v, layout=layout, compute_dtype=torch.float64, **{**kw, "tags": (qt, kt)})
        assert_close_rel(res.out, ref.out, OUT_TOL[dtype])
        assert_lse_equal(res.lse, ref.lse, tol=1e-3 if dtype == torch.float32 else 2e-2)
        assert len(res.probes) == len(ref.probes) == len(kw.get("probes", ()))
        for got, want in zip(res.probes, ref.probes):
            assert_close_rel(got, want, PROBE_TOL[dtype], "probe")
        assert_visits_exactly_the_meeting_tiles(res, *kw["tags"].batched(b))
    # A cut inside a key tile makes that tile partial: listed, so the loops are compiled in.
    qt, kt = _segment_tags(b, nq, [16]), _segment_tags(b, nk, [20])
    assert iidkern.tag_mask(qt, kt).tile_lists(16, 16, b).has_lists is True
    res, has_lists = _tag_launch_flags(q=q, k=k, v=v, layout=layout, backend="triton", tags=(qt, kt),
                                       count_tiles=True, kernel_options=TILES)
    assert has_lists is True
    assert_close_rel(res.out, attention_reference(q, k, v, layout=layout, tags=(qt, kt),
                                                  compute_dtype=torch.float64).out, OUT_TOL[dtype])
    assert_visits_exactly_the_meeting_tiles(res, qt, kt)


def test_has_lists_reads_both_lists():
    """has_lists is True when only the partial list, or only the full list outside the run,
    holds a tile, and False for a mask whose query tiles each see one run. A mask whose only
    listed tiles are full ones outside the run keeps the loops and is exact."""
    b, n = 1, 64
    run_only = iidkern.tag_mask(_segment_tags(b, n, [32]), _segment_tags(b, n, [32]))
    assert run_only.tile_lists(16, 16).has_lists is False
    partial = iidkern.tag_mask(_segment_tags(b, n, [32]), _segment_tags(b, n, [40]))
    lists = partial.tile_lists(16, 16)
    assert lists.partial_count.max() > 0 and lists.has_lists is True
    # Query tiles see key tiles 0 and 2 (both full, not contiguous): one is in the run, the
    # other in the full list; nothing is partial.
    qt = torch.ones(b, n, dtype=torch.int64)
    kt = torch.full((b, n), 2, dtype=torch.int64)
    kt[:, :16] = kt[:, 32:48] = 1
    lists = iidkern.tag_mask(qt, kt).tile_lists(16, 16)
    assert lists.partial_count.max() == 0 and lists.full_count.max() > 0 and lists.has_lists is True
    q, k, v = make_qkv(b, 2, n, n, 32, generator=torch.Generator().manual_seed(55))
    res, has_lists = _tag_launch_flags(q=q, k=k, v=v, backend="triton", tags=iidkern.tag_mask(qt, kt),
                                       count_tiles=True, kernel_options=TILES)
    assert has_lists is True
    assert_close_rel(res.out, attention_reference(q, k, v, tags=(qt, kt), compute_dtype=torch.float64).out,
                     OUT_TOL[torch.float32])
    assert_visits_exactly_the_meeting_tiles(res, qt, kt)


def test_only_a_reused_mask_reads_its_lists_back_on_a_gpu():
    """A call's own (q_tags, k_tags) builds a mask for that call alone: on a GPU it must not
    synchronize to read has_lists back (it would every call), so it keeps the loops there.
    On the CPU the read costs nothing and both forms drop them."""
    from iidkern.kernels.tiles import TagMask, _any_listed
    tags = _segment_tags(1, 64, [32])
    assert TagMask(tags, tags, reused=False).tile_lists(16, 16).has_lists is False  # CPU tensors
    empty = torch.zeros(1, 4, dtype=torch.int32)
    assert _any_listed(empty, empty, read_back=True) is False
    if torch.cuda.is_available():
        empty = empty.cuda()
        assert _any_listed(empty, empty, read_back=False) is True
        assert _any_listed(empty, empty, read_back=True) is False
