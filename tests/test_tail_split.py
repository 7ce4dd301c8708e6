"""The Hopper kernel's last-wave key split (kernels/tail_split.py): the plan, the pass that
joins the pieces (run under Triton's interpreter on CPU), and the launch that hands both
over. The split kernel itself is tested on the H100 (tests/test_hopper_fwd.py, ``cuda``)."""
import inspect
import itertools
import math

import pytest
import torch

import iidkern
from iidkern import BlockMultiplier, Probe, TokenGroups as TG
from iidkern.kernels import hopper_fwd, launch, tail_split
from iidkern.kernels.kernel_args import MultiplierArgs
from iidkern.kernels.tail_split import (NO_SPLIT, SplitPlan, combine_kernel, combine_shape, estimated_time,
                                         piece_range, plan_split)


# --------------------------------------------------------------------------- the plan
@pytest.mark.parametrize("n_key_tiles", [1, 2, 3, 7, 36, 130])
def test_pieces_cover_the_key_tiles_once_and_none_is_empty(n_key_tiles):
    for pieces in range(1, n_key_tiles + 1):
        ranges = [piece_range(p, pieces, n_key_tiles) for p in range(pieces)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n_key_tiles
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        lengths = [b - a for a, b in ranges]
        assert min(lengths) >= 1 and max(lengths) - min(lengths) <= 1


def test_estimated_time_counts_waves_pieces_and_the_join():
    c = tail_split
    # 3 programs of 4 key tiles on 2 SMs: two waves unsplit.
    assert estimated_time(3, 4, 2, NO_SPLIT) == 2 * (4 + c.PROGRAM_OVERHEAD)
    # The last tile in 2 pieces of 2: each SM runs one whole program and one piece, then the join.
    want = 4 + c.PROGRAM_OVERHEAD + 2 + c.PIECE_OVERHEAD + c.COMBINE_OVERHEAD + 2 * c.COMBINE_PER_PIECE
    assert estimated_time(3, 4, 2, SplitPlan(1, 2)) == pytest.approx(want)
    # Pieces start on the first free SM: 3 pieces on 2 SMs take two rounds.
    want = 3 + c.PROGRAM_OVERHEAD + 2 * (1 + c.PIECE_OVERHEAD) + c.COMBINE_OVERHEAD + 3 * c.COMBINE_PER_PIECE
    assert estimated_time(3, 3, 2, SplitPlan(1, 3)) == pytest.approx(want)


def test_estimated_time_rejects_plans_that_do_not_fit():
    with pytest.raises(ValueError, match="does not fit"):
        estimated_time(10, 4, 2, SplitPlan(11, 2))
    with pytest.raises(ValueError, match="does not fit"):
        estimated_time(10, 4, 2, SplitPlan(3, 5))


@pytest.mark.parametrize("n_tiles, n_key_tiles, n_sms", list(itertools.product(
    [1, 5, 131, 133, 144, 288, 864, 1632, 1728, 3168], [1, 2, 6, 12, 36, 68], [16, 132])))
def test_plan_is_the_best_estimate_and_only_where_it_gains(n_tiles, n_key_tiles, n_sms):
    plan = plan_split(n_tiles, n_key_tiles, n_sms)
    unsplit = estimated_time(n_tiles, n_key_tiles, n_sms, NO_SPLIT)
    if n_tiles % n_sms == 0 or n_key_tiles < 2:
        assert plan == NO_SPLIT
    if plan.active:
        assert 0 < plan.n_split <= n_tiles and 2 <= plan.pieces <= min(n_key_tiles, tail_split.MAX_PIECES)
        t = estimated_time(n_tiles, n_key_tiles, n_sms, plan)
        assert t <= unsplit * (1 - tail_split.MIN_GAIN)
        # the tail is what is split, and no other piece count of it is better
        tail = n_tiles % n_sms
        assert plan.n_split == tail
        for pieces in range(2, min(n_key_tiles, tail_split.MAX_PIECES) + 1):
            assert estimated_time(n_tiles, n_key_tiles, n_sms, SplitPlan(tail, pieces)) >= t - 1e-9
    else:
        assert plan == NO_SPLIT


def test_plans_of_the_flux_shapes_on_an_h100():
    """The grids the bench times (132 SMs): the tail is split where it is a fraction of a
    wave, and a grid of whole waves is left alone."""
    assert plan_split(864, 36, 132).active  # Flux 1024²: 6.55 waves
    assert plan_split(1728, 36, 132).active  # B=2: 13.09 waves
    assert plan_split(288, 12, 132).active  # 512²: 2.18 waves
    assert plan_split(3168, 132, 132) == NO_SPLIT  # 2048²: 24 whole waves


def test_max_pieces_bounds_the_plan():
    """SD3 1024² (840 tiles of 35 key tiles): the model's best is 5 pieces; bounded to 2
    (hopper_fwd.LIGHT_SPLIT_PIECES, calls that come to the Hopper kernel for a key-group probe)
    it splits the same tail into 2, the best plan under the bound."""
    assert plan_split(840, 35, 132) == SplitPlan(48, 5)
    light = plan_split(840, 35, 132, max_pieces=hopper_fwd.LIGHT_SPLIT_PIECES)
    assert light == SplitPlan(48, 2)
    assert estimated_time(840, 35, 132, light) < estimated_time(840, 35, 132, NO_SPLIT)


def test_forced_plans_are_clamped_to_the_grid():
    cpu = torch.device("cpu")
    assert hopper_fwd.split_plan_for(10, 4, cpu, (100, 64)) == SplitPlan(10, 4)
    assert hopper_fwd.split_plan_for(10, 4, cpu, False) == NO_SPLIT
    assert hopper_fwd.split_plan_for(10, 4, cpu, None) == NO_SPLIT
    assert hopper_fwd.split_plan_for(10, 1, cpu, (3, 5)) == SplitPlan(3, 1) and not SplitPlan(3, 1).active
    assert hopper_fwd.split_plan_for(10, 4, cpu, "auto") == NO_SPLIT  # no SM count on CPU


# --------------------------------------------------------------------------- the join (interpreter)
def _pieces_of(q, k, v, scale, tile_rows, n_qp, n_whole, n_split, pieces, block_n, onehot):
    """What the kernel's pieces write, in float64: per piece of each split tile, the rows'
    output and key-group sums (``onehot`` [Nk, G_PAD]) over the piece's keys normalized by its
    own sum, and log2 of that sum."""
    b, h, n_q, d = q.shape
    n_k = k.shape[2]
    n_key_tiles = -(-n_k // block_n)
    part_o = torch.full((n_split * pieces * tile_rows, d), float("nan"), dtype=torch.float32)
    part_lse = torch.full((n_split * pieces * tile_rows,), float("nan"), dtype=torch.float32)
    part_kg = torch.full((n_split * pieces * tile_rows, onehot.shape[1]), float("nan"), dtype=torch.float32)
    for t in range(n_split):
        tile = n_whole + t
        bh, qp = divmod(tile, n_qp)
        batch, head = divmod(bh, h)
        r0 = qp * tile_rows
        rows = torch.arange(r0, r0 + tile_rows)
        real = rows < n_q
        s = scale * q[batch, head, rows[real]].double() @ k[batch, head].double().T
        for j in range(pieces):
            a, z = piece_range(j, pieces, n_key_tiles)
            sub = s[:, a * block_n:min(z * block_n, n_k)]
            lse2 = torch.logsumexp(sub, 1) / math.log(2)
            keys = slice(a * block_n, min(z * block_n, n_k))
            o = torch.softmax(sub, 1) @ v[batch, head, keys].double()
            slot = (t * pieces + j) * tile_rows
            part_o[slot:slot + tile_rows][real] = o.float()
            part_lse[slot:slot + tile_rows][real] = lse2.float()
            part_kg[slot:slot + tile_rows][real] = (torch.softmax(sub, 1) @ onehot[keys]).float()
            # rows past the end hold whatever the kernel computed there: finite values
            part_o[slot:slot + tile_rows][~real] = 1e4
            part_lse[slot:slot + tile_rows][~real] = 7.0
            part_kg[slot:slot + tile_rows][~real] = 3.0
    return part_o, part_lse, part_kg


@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize("b, h, n_q, n_k, n_split, pieces, hw_kind, lse, kg, shift", [
    (1, 3, 70, 90, 2, 3, False, False, None, 0.0),
    (2, 2, 33, 200, 3, 5, "bh", True, (5, 30, 3), 200.0),  # key groups on rows [5, 30); 2^lse overflows fp32
    (3, 1, 48, 64, 6, 2, "bhn", True, (0, 48, 8), -160.0),  # every tile split; groups on every row; 2^lse underflows
    (2, 3, 17, 50, 1, 4, "h", False, (16, 17, 1), 0.0),  # one piece per key tile; the last row only
])
def test_combine_joins_the_pieces_into_the_tiles_rows(layout, b, h, n_q, n_k, n_split, pieces, hw_kind, lse, kg,
                                                      shift):
    """``shift`` moves every score by the same amount (in log2 units): the output and key-group
    sums stay, the LSE moves, and the join must weigh the pieces relative to their largest sum."""
    g = torch.Generator().manual_seed(b * 100 + n_q)
    d, tile_rows, block_n, block_r, g_pad = 32, 16, 16, 8, 8
    pieces_p2 = 1 << (pieces - 1).bit_length()  # the pieces load as one [pieces_p2, rows, d] block
    kg_q0, kg_q1, n_groups = kg or (0, 0, 1)
    ids = torch.randint(-1, n_groups, (n_k,), generator=g)
    onehot = torch.zeros(n_k, g_pad, dtype=torch.float64)
    onehot[ids >= 0, ids[ids >= 0]] = 1.0
    q, k, v = (torch.randn(b, h, n, d, generator=g) for n in (n_q, n_k, n_k))
    scale = d ** -0.5
    n_qp = -(-n_q // tile_rows)
    n_whole = n_qp * b * h - n_split
    part_o, part_lse, part_kg = _pieces_of(q, k, v, scale, tile_rows, n_qp, n_whole, n_split, pieces, block_n,
                                           onehot)
    part_lse += shift
    kgo = torch.full((b, h, kg_q1 - kg_q0, n_groups), float("nan"))
    out = torch.full((b, h, n_q, d) if layout == "bhnd" else (b, n_q, h, d), float("nan"))
    lse_out = torch.full((b, h, n_q), float("nan"))
    o_bhnd = out if layout == "bhnd" else out.transpose(1, 2)
    hw = {False: torch.ones(1), "h": torch.rand(h, generator=g), "bh": torch.rand(b, h, generator=g),
          "bhn": torch.rand(b, h, n_q, generator=g)}[hw_kind]
    hw_strides = launch._head_weight_strides(hw) if hw_kind else (0, 0, 0)
    combine_kernel[(n_split, tile_rows // block_r)](
        part_o, part_lse, out, lse_out, hw, o_bhnd.stride(0), o_bhnd.stride(1), o_bhnd.stride(2), *hw_strides,
        part_kg, kgo, kg_q0, kg_q1, n_groups, n_whole, n_qp, pieces, h, n_q,
        TILE_ROWS=tile_rows, BLOCK_R=block_r, HEAD_DIM=d, G_PAD=g_pad, PIECES_P2=pieces_p2,
        HAS_HW=bool(hw_kind), STORE_LSE=lse, HAS_KG=kg is not None)
    s = scale * q.double() @ k.double().transpose(-1, -2)
    want = torch.softmax(s, -1) @ v.double()
    if hw_kind:
        want = want * hw.double().reshape({"h": (1, h, 1, 1), "bh": (b, h, 1, 1), "bhn": (b, h, n_q, 1)}[hw_kind])
    want_lse = torch.logsumexp(s, -1) + shift * math.log(2)
    written = torch.zeros(b, h, n_q, dtype=torch.bool)
    for t in range(n_split):
        bh, qp = divmod(n_whole + t, n_qp)
        written[bh // h, bh % h, qp * tile_rows:(qp + 1) * tile_rows] = True
    got = o_bhnd.double()
    assert torch.isnan(got[~written]).all()  # rows of whole tiles are the kernel's, not the join's
    assert not torch.isnan(got[written]).any()
    assert (got[written] - want[written]).abs().max() < 1e-5
    if lse:
        # fp32 LSE: relative to its size (a shift of 200 in log2 units is ~139 in natural log)
        assert (lse_out.double()[written] - want_lse[written]).abs().max() < 1e-5 * max(1.0, abs(shift))
        assert torch.isnan(lse_out[~written]).all()
    else:
        assert torch.isnan(lse_out).all()
    if kg is not None:  # the group sums of the rows in [kg_q0, kg_q1) that the join writes
        want_kg = (torch.softmax(s, -1) @ onehot)[:, :, kg_q0:kg_q1, :n_groups]
        mine = written[:, :, kg_q0:kg_q1]
        assert mine.any()
        assert (kgo.double()[mine] - want_kg[mine]).abs().max() < 1e-5
        assert torch.isnan(kgo[~mine]).all()


# --------------------------------------------------------------------------- the launch (CPU)
class _Recorder:
    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))


@pytest.mark.parametrize("pieces", range(2, tail_split.MAX_PIECES + 1))
@pytest.mark.parametrize("head_dim", [64, 128])
def test_combine_shape_holds_every_piece_of_its_rows_in_a_bounded_block(pieces, head_dim):
    pieces_p2, rows, warps = combine_shape(pieces, 128, head_dim)
    assert pieces <= pieces_p2 < 2 * pieces and pieces_p2 & (pieces_p2 - 1) == 0
    assert rows >= 1 and rows & (rows - 1) == 0 and 128 % rows == 0  # whole row blocks of the tile
    assert pieces_p2 * rows * head_dim <= tail_split.COMBINE_VALUES_PER_WARP * warps  # 64 fp32 a thread
    # the most rows that bound allows (more programs, each one round trip)
    assert rows == 128 or 2 * pieces_p2 * rows * head_dim > tail_split.COMBINE_VALUES_PER_WARP * warps


@pytest.mark.skipif(not hopper_fwd.AVAILABLE, reason="this Triton has no Gluon warp_specialize")
@pytest.mark.parametrize("extras", [False, True])
def test_a_forced_split_launches_pieces_then_the_join(monkeypatch, extras):
    attn, join = _Recorder(), _Recorder()
    monkeypatch.setattr(hopper_fwd, "_ATTN_HOPPER", attn)
    monkeypatch.setattr(hopper_fwd, "_COMBINE", join)
    b, h, n = 2, 3, 300  # 3 query-tile pairs a (batch, head): 18 tiles; 3 key tiles
    q = torch.randn(b, h, n, 128, dtype=torch.bfloat16)
    out = torch.empty_like(q)
    kw = {}
    if extras:  # what the join applies (head weights, LSE) and joins (key-group sums of a fused probe)
        kw = dict(head_weights=torch.rand(h), head_weight_strides=(0, 1, 0), lse=torch.empty(b, h, n),
                  key_groups=launch._key_group_args(Probe(TG.each(40, n), TG.segments([(0, 9), (9, 40)], n)),
                                                    b, h, n, q.device, torch.empty))
    hopper_fwd.hopper_attention(q, q, q, out, layout="bhnd", scale=0.1, split=(5, 3), **kw)
    (grid, args, kwargs), = attn.calls
    runtime = [p.name for p in hopper_fwd.attn_fwd_hopper.params if not p.is_constexpr]
    arg = dict(zip(runtime, args))
    assert len(args) == len(runtime) and kwargs["SPLIT"] is True and kwargs["HAS_KG"] is extras
    assert grid == (18 - 5 + 5 * 3,)
    assert (arg["n_whole"], arg["n_qp"], arg["pieces_per_tile"]) == (13, 3, 3)
    assert arg["part_o_ptr"].shape == (15 * 2 * hopper_fwd.BLOCK_M, 128) and arg["part_o_ptr"].dtype == torch.float32
    assert arg["part_lse_ptr"].shape == (15 * 2 * hopper_fwd.BLOCK_M,)
    (jgrid, jargs, jkwargs), = join.calls
    # the kernel's own parameters (an InterpretedFunction under the interpreter has no .params)
    jruntime = [name for name, p in inspect.signature(combine_kernel.fn).parameters.items()
                if "constexpr" not in str(p.annotation)]
    jarg = dict(zip(jruntime, jargs))
    assert len(jargs) == len(jruntime) and jgrid[0] == 5
    assert jgrid[1] * jkwargs["BLOCK_R"] == jkwargs["TILE_ROWS"] == 2 * hopper_fwd.BLOCK_M
    assert jkwargs["PIECES_P2"] == 4  # 3 pieces, loaded as one padded block
    assert jarg["PART_O"] is arg["part_o_ptr"] and jarg["PART_LSE"] is arg["part_lse_ptr"] and jarg["O"] is out
    assert (jarg["n_whole"], jarg["n_qp"], jarg["pieces"], jarg["n_heads"], jarg["n_q"]) == (13, 3, 3, h, n)
    assert (jkwargs["HAS_HW"], jkwargs["STORE_LSE"], jkwargs["HAS_KG"]) == (extras, extras, extras)
    if extras:
        assert jarg["HW"] is kw["head_weights"] and jarg["LSE"] is kw["lse"]
        assert (jarg["hw_sb"], jarg["hw_sh"], jarg["hw_sn"]) == (0, 1, 0)
        groups = kw["key_groups"]
        assert arg["part_kg_ptr"].shape == (15 * 2 * hopper_fwd.BLOCK_M, kwargs["G_PAD"])
        assert jarg["PART_KG"] is arg["part_kg_ptr"] and jarg["KGO"] is groups.sums and jkwargs["G_PAD"] == kwargs["G_PAD"]
        assert (jarg["kg_q0"], jarg["kg_q1"], jarg["n_groups"]) == (groups.q0, groups.q1, groups.n_groups) == (40, n, 2)


@pytest.mark.skipif(not hopper_fwd.AVAILABLE, reason="this Triton has no Gluon warp_specialize")
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("m_dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_block_multiplier_splits_by_head_dim_and_value_dtype(monkeypatch, head_dim, m_dtype):
    """A block multiplier call takes a forced plan at head dim 64 with any values, and at 128
    only with fp16/bf16 values: wider ones spill registers there (NOTES.md 50, 69, 71)."""
    attn, join = _Recorder(), _Recorder()
    monkeypatch.setattr(hopper_fwd, "_ATTN_HOPPER", attn)
    monkeypatch.setattr(hopper_fwd, "_COMBINE", join)
    b, h, n = 2, 3, 300
    q = torch.randn(b, h, n, head_dim, dtype=torch.bfloat16)
    mult = MultiplierArgs.of(BlockMultiplier(torch.rand(b, 150, 40).to(m_dtype), query_start=50, key_start=0))
    hopper_fwd.hopper_attention(q, q, q, torch.empty_like(q), layout="bhnd", scale=0.1, split=(5, 3),
                                multiplier=mult)
    splits = head_dim == 64 or m_dtype in (torch.float16, torch.bfloat16)
    (grid, _, kwargs), = attn.calls
    assert kwargs["SPLIT"] is splits and kwargs["HAS_MULT"] is True
    assert len(join.calls) == splits
    if not splits:
        assert grid == (3, b * h)


@pytest.mark.skipif(not hopper_fwd.AVAILABLE, reason="this Triton has no Gluon warp_specialize")
def test_no_split_keeps_the_two_axis_grid_and_tile_extras_never_split(monkeypatch):
    """Tags (per-tile visit lists) and, at head dim 128, a block multiplier of fp32 values
    keep whole tiles, whatever the split asked for."""
    attn, join = _Recorder(), _Recorder()
    monkeypatch.setattr(hopper_fwd, "_ATTN_HOPPER", attn)
    monkeypatch.setattr(hopper_fwd, "_COMBINE", join)
    b, h, n = 2, 3, 300
    q = torch.randn(b, h, n, 128, dtype=torch.bfloat16)
    out = torch.empty_like(q)
    hopper_fwd.hopper_attention(q, q, q, out, layout="bhnd", scale=0.1, split=False)
    tags = iidkern.tag_mask(torch.randint(1, 4, (n,)), torch.randint(1, 4, (n,)))
    hopper_fwd.hopper_attention(q, q, q, out, layout="bhnd", scale=0.1, split=(5, 3), tags=tags)
    mult = MultiplierArgs.of(BlockMultiplier(torch.rand(b, 150, 40), query_start=50, key_start=0))
    hopper_fwd.hopper_attention(q, q, q, out, layout="bhnd", scale=0.1, split=(5, 3), multiplier=mult)
    assert len(attn.calls) == 3
    for grid, _, kwargs in attn.calls:
        assert grid == (3, b * h) and kwargs["SPLIT"] is False
    assert join.calls == []


def test_split_options():
    assert launch._tail_split_option(None) == "auto"
    assert launch._tail_split_option({"tail_split": True}) == "auto"
    assert launch._tail_split_option({"tail_split": False}) is False
    assert launch._tail_split_option({"tail_split_tiles": 4, "tail_split_pieces": 3}) == (4, 3)
    assert launch._tail_split_option({"tail_split_tiles": 4, "tail_split_pieces": 3, "tail_split": False}) is False
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match=r"tail_split_pieces.*\[2, 64\].*1"):
        iidkern.attention(q, q, q, kernel_options={"tail_split_pieces": 1, "tail_split_tiles": 2})
    with pytest.raises(ValueError, match="tail_split_tiles"):
        iidkern.attention(q, q, q, kernel_options={"tail_split_tiles": -1, "tail_split_pieces": 2})
    with pytest.raises(ValueError, match="force a split together"):
        iidkern.attention(q, q, q, backend="triton", kernel_options={"tail_split_tiles": 3})
