"""The MLA kernels (absorbed split-context decode, expanded flash prefill) through Triton's interpreter, against
float64 math, on fresh random inputs; shapes small enough for the interpreter."""
import pytest
import torch
import triton

from conftest import rel_err
from deepfuse.runtime.kernels import mla
from deepfuse.runtime.latent_cache import FP8, dequantize_latent, quantize_latent

TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def _inputs(b, s, t, h, dn, r, dv, c, dtype, noncontig=False):
    q = torch.randn(b, s, h, dn + r, dtype=dtype)
    q_nope, q_pe = q[..., :dn], q[..., dn:]  # views into one q, as the models split it
    latent = torch.randn(b, t, c + r + (3 if noncontig else 0), dtype=dtype)
    c_kv, k_pe = latent[..., :c], latent[..., c:c + r]
    w = (torch.randn(h * (dn + dv), c) / c ** 0.5).to(dtype)
    return q_nope, q_pe, c_kv, k_pe, w


CASES = [  # b, s, t, h, dn, r, dv, c
    (1, 1, 1, 4, 16, 8, 16, 32),       # one token, one key
    (2, 1, 37, 4, 16, 8, 16, 32),      # decode, odd context
    (2, 3, 40, 3, 16, 8, 24, 32),      # a few queries (speculative), heads off the block, dv != dn
    (1, 19, 19, 2, 16, 16, 16, 64),    # prefill, odd length
    (2, 7, 130, 4, 32, 16, 32, 64),    # chunked prefill over a longer context
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("path", ["absorbed", "expanded"])
@pytest.mark.parametrize("shape", CASES, ids=[f"b{c[0]}s{c[1]}t{c[2]}h{c[3]}" for c in CASES])
@pytest.mark.parametrize("causal", [True, False])
def test_mla_paths_match_float64(dtype, path, shape, causal):
    b, s, t, h, dn, r, dv, c = shape
    q_nope, q_pe, c_kv, k_pe, w = _inputs(b, s, t, h, dn, r, dv, c, dtype, noncontig=True)
    scale = (dn + r) ** -0.5
    ref = mla.reference(*(x.double() for x in (q_nope, q_pe, c_kv, k_pe, w)), scale, causal)
    out = mla.mla_attention(q_nope, q_pe, c_kv, k_pe, w, scale, causal, path=path, interpret=True)
    assert out.shape == (b, s, h, dv) and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("path", ["absorbed", "expanded"])
@pytest.mark.parametrize("mask_kind", ["bool_b1st", "float_st"])
def test_mla_masks(path, mask_kind):
    """Padding-style bool masks per batch row (True = attend) and additive float masks, broadcast."""
    b, s, t, h, dn, r, dv, c = 3, 2, 21, 4, 16, 8, 16, 32
    q_nope, q_pe, c_kv, k_pe, w = _inputs(b, s, t, h, dn, r, dv, c, torch.float32)
    if mask_kind == "bool_b1st":
        lengths = torch.tensor([21, 9, 1])  # different lengths in one batch: keys past a row's length are padding
        mask = (torch.arange(t)[None, :] < lengths[:, None])[:, None, None, :].expand(b, 1, s, t)
    else:
        mask = torch.randn(s, t)
        mask[:, 5:9] = float("-inf")
    ref = mla.reference(*(x.double() for x in (q_nope, q_pe, c_kv, k_pe, w)), 0.3, False, mask)
    out = mla.mla_attention(q_nope, q_pe, c_kv, k_pe, w, 0.3, False, mask, path=path, interpret=True)
    assert rel_err(out, ref) < 1e-5


def test_absorbed_and_expanded_agree_on_one_query_many_splits():
    """The split merge: a context much longer than one split's block, every split non-empty."""
    q_nope, q_pe, c_kv, k_pe, w = _inputs(1, 1, 300, 2, 16, 8, 16, 32, torch.float32)
    a = mla.mla_attention(q_nope, q_pe, c_kv, k_pe, w, 0.25, True, path="absorbed", interpret=True,
                          config={"BLOCK_H": 16, "BLOCK_T": 16})
    e = mla.mla_attention(q_nope, q_pe, c_kv, k_pe, w, 0.25, True, path="expanded", interpret=True)
    assert rel_err(a, e) < 1e-5


@pytest.mark.parametrize("b,s,h,dv,c", [(3, 7, 2, 40, 96), (1, 1, 20, 16, 32), (0, 1, 4, 16, 32)], ids=str)
def test_absorbed_query_and_output_tiles(b, s, h, dv, c, poisoned_empty):
    """The absorptions' tiles: more queries than one 16-row block, a latent width that is no multiple of its
    64- and 128-wide slices, value heads off the 16-wide output slices, heads past one head block, no queries at
    all; and kv_b_proj's weight stored transposed (its rows not unit-strided). Every buffer starts as NaN."""
    dn, r, t = 16, 8, 45
    q_nope, q_pe, c_kv, k_pe, _ = _inputs(b, s, t, h, dn, r, dv, c, torch.float32)
    w = (torch.randn(c, h * (dn + dv)) / c ** 0.5).t()  # [H*(DN+DV), C] with strides (1, H*(DN+DV))
    ref = mla.reference(*(x.double() for x in (q_nope, q_pe, c_kv, k_pe, w)), 0.2, True)
    out = mla.mla_attention(q_nope, q_pe, c_kv, k_pe, w, 0.2, True, path="absorbed", interpret=True)
    assert out.shape == (b, s, h, dv)
    if b:
        assert torch.isfinite(out).all() and rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_absorbed_merge_of_many_and_empty_splits(dtype):
    """The splits' merge on the same inputs at 3 and 64 splits: with 64, a causal context of 50 leaves some
    splits empty (their LSE is -inf and must weigh nothing)."""
    b, s, t, h, dn, r, dv, c = 2, 3, 50, 4, 16, 8, 40, 160
    q_nope, q_pe, c_kv, k_pe, w = _inputs(b, s, t, h, dn, r, dv, c, dtype)
    ref = mla.reference(*(x.double() for x in (q_nope, q_pe, c_kv, k_pe, w)), 0.2, True)
    for splits in (3, 64):
        out = mla.mla_attention(q_nope, q_pe, c_kv, k_pe, w, 0.2, True, path="absorbed", interpret=True,
                                config={**mla.DECODE_CONFIG, "BLOCK_T": 16, "SPLITS": splits})
        assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("queries, context, want", [
    (1, 2048, 64),      # one query: the fill rule wants 264 programs; no split shorter than a 32-row tile
    (1, 32768, 128),    # ... capped at 128 splits
    (32, 2048, 8),      # fill: 32 queries x 9 splits >= 2 x 132 programs; 9 splits of whole tiles leave one empty
    (1, 2049, 65),      # a static cache's 2049 rows: 65 tiles, a split each
    (64, 32768, 64),    # a long context: splits of at most 512 rows, not the fill rule's 5 of 6554
    (64, 100, 4),       # a short one: the fill rule's 5, but 100 rows hold only 4 tiles
    (1024, 1, 1),       # never below one split
])
def test_decode_split_count_fills_the_gpu_and_bounds_the_split(queries, context, want):
    assert mla.decode_splits(queries, 1, context, 132, 32) == want


@pytest.mark.parametrize("block_t", [16, 32, 64])
def test_decode_splits_all_hold_rows(block_t):
    """The partial kernel rounds a split up to whole tiles (cdiv(cdiv(T, splits), BLOCK_T) tiles): every split
    the count launches must start inside the context, and together they must cover it."""
    for queries in (1, 3, 32, 64, 500):
        for context in (1, 15, 16, 17, 100, 2048, 2049, 4097, 32768, 100_003):
            splits = mla.decode_splits(queries, 1, context, 132, block_t)
            per_split = -(-(-(-context // splits)) // block_t) * block_t
            assert (splits - 1) * per_split < context <= splits * per_split, (queries, context, splits)


@pytest.mark.parametrize("splits", [1, 4, 19])
def test_decode_never_lets_the_rows_its_mask_hides_in(splits):
    """A static cache's decode step: 300 positions allocated, 41 written, the rest masked. The unwritten tail
    holds NaN from position 41 on, inside a live 16-key block too: a kernel that let one of those rows into its
    sums would return NaN. With 4 or 19 splits most splits lie wholly in the tail."""
    b, t, filled = 2, 300, 41
    q_nope, q_pe, c_kv, k_pe, w = _inputs(b, 1, t, 4, 16, 8, 16, 32, torch.float32)
    ref = mla.reference(*(x.double() for x in (q_nope, q_pe, c_kv[:, :filled], k_pe[:, :filled], w)), 0.3, False)
    c_kv[:, filled:], k_pe[:, filled:] = float("nan"), float("nan")
    mask = torch.zeros(1, t).masked_fill(torch.arange(t)[None, :] >= filled, float("-inf"))
    out = mla.mla_attention(q_nope, q_pe, c_kv, k_pe, w, 0.3, False, mask, path="absorbed", interpret=True,
                            config={"BLOCK_H": 16, "BLOCK_T": 16, "SPLITS": splits})
    assert rel_err(out, ref) < 1e-5


def test_prefill_never_computes_the_tiles_its_mask_hides():
    """A static cache's prefill: 40 queries at positions 0..39 over 200 allocated keys, masked causally. Keys
    past position 47 hold NaN (only whole masked 16-key tiles lie there), and so does the upper triangle's
    reach: a kernel that computed a fully masked tile would return NaN."""
    b, s, t = 1, 40, 200
    q_nope, q_pe, c_kv, k_pe, w = _inputs(b, s, t, 2, 16, 8, 16, 32, torch.float32)
    ref = mla.reference(*(x.double() for x in (q_nope, q_pe, c_kv[:, :s], k_pe[:, :s], w)), 0.3, True)
    c_kv[:, 48:], k_pe[:, 48:] = float("nan"), float("nan")
    keys = torch.arange(t)
    mask = torch.zeros(s, t).masked_fill(keys[None, :] > torch.arange(s)[:, None], float("-inf"))
    out = mla.mla_attention(q_nope, q_pe, c_kv, k_pe, w, 0.3, False, mask, path="expanded", interpret=True,
                            config={"BLOCK_M": 16, "BLOCK_N": 16})
    assert rel_err(out, ref) < 1e-5


def _prefill_masks(b, s, t):
    """Masks a prefill meets as inputs (a regionally compiled model's): causal (bottom-right), a sliding
    window of 30 keys, per-row padding (bool, keys past each batch row's length), causal with a bias of
    ones in the first 8 keys (visible everywhere, never zero), and random values with -inf holes."""
    q_pos = torch.arange(s)[:, None] + t - s
    keys = torch.arange(t)[None, :]
    causal = torch.zeros(s, t).masked_fill(keys > q_pos, float("-inf"))
    window = causal.masked_fill(keys <= q_pos - 30, float("-inf"))
    # the first row's length anywhere in 1..T; the others' at least 16, so some key tiles are whole and visible
    # (interior) at the tests' tile sizes, as two short rows would not always leave (1 run in ~100 failed)
    lengths = torch.cat([torch.randint(1, t + 1, (1,)), torch.randint(16, t + 1, (b - 1,))])
    padding = (keys[None] < lengths[:, None, None]).expand(b, s, t)[:, None]  # [B, 1, S, T] bool
    bias = causal.clone()
    bias[:, :8] += 1.0
    holes = torch.randn(s, t).masked_fill(torch.rand(s, t) < 0.3, float("-inf"))
    holes[:, 0] = 0.0  # every row sees a key
    return {"causal": causal, "window": window, "padding": padding, "bias": bias, "holes": holes}


@pytest.mark.parametrize("kind", ["causal", "window", "padding", "bias", "holes"])
@pytest.mark.parametrize("bm,bn", [(16, 8), (8, 4)])
def test_mask_tile_ranges_hold_what_each_tile_is(kind, bm, bn):
    """Per query block: no key visible outside [first, end); every key of [i_start, i_end) visible with an
    additive 0 for every row (inside S) and the tiles wholly inside T; first <= i_start <= i_end <= end."""
    b, h, s, t = 2, 3, 45, 70
    mask4 = mla._mask_4d(_prefill_masks(b, s, t)[kind], b, h, s, t)
    ranges = mla.mask_tile_ranges(mask4, bm, bn)
    interior = 0
    assert ranges.shape == (b, h, triton.cdiv(s, bm), 4) and ranges.dtype == torch.int32
    for bi in range(b):
        for hi in range(h):
            for mi in range(ranges.shape[2]):
                first, i_start, i_end, end = (int(v) * bn for v in ranges[bi, hi, mi])
                rows = mask4[bi, hi, mi * bm:(mi + 1) * bm]
                assert first <= i_start <= i_end <= max(end, i_start)
                outside = torch.cat([rows[:, :first], rows[:, end:]], dim=1)
                assert (outside == float("-inf")).all()
                assert (rows[:, i_start:i_end] == 0).all()
                assert i_start == i_end or i_end <= t // bn * bn
                interior += i_end - i_start
    assert interior > 0 or kind == "holes"  # the masks with zeros have interior tiles at these sizes


@pytest.mark.parametrize("kind", ["causal", "window", "padding", "bias", "holes"])
@pytest.mark.parametrize("also_causal", [False, True])
def test_prefill_with_a_mask_input(kind, also_causal):
    """The prefill kernel over a mask it reads (what a layer compiled on its own receives): its hidden tiles
    skipped, its all-zero tiles read unmasked, the rest masked; with the causal flag as well, both apply. Key
    tiles no row sees hold NaN: a kernel that computed a hidden tile would return NaN."""
    b, h, s, t = 2, 2, 45, 70
    mask = _prefill_masks(b, s, t)[kind]
    if also_causal and kind in ("padding", "holes"):  # rows whose every visible key is causally hidden: NaN
        pytest.skip("the mask and causality together hide whole rows")
    for dtype in (torch.float32, torch.float16):
        q_nope, q_pe, c_kv, k_pe, w = _inputs(b, s, t, h, 16, 8, 16, 32, dtype, noncontig=True)
        ref = mla.reference(*(x.double() for x in (q_nope, q_pe, c_kv, k_pe, w)), 0.25, also_causal, mask)
        mask4 = mla._mask_4d(mask, b, h, s, t)
        hidden = (mask4 == float("-inf")).all(dim=2).all(dim=1)  # [B, T]: keys no row of any head sees
        hidden = torch.nn.functional.pad(hidden, (0, -t % 4), value=True).view(b, -1, 4).all(dim=-1)
        hidden = hidden.repeat_interleave(4, dim=1)[:, :t]  # ... whose whole 4-key tile no row sees
        c_kv, k_pe = c_kv.clone(), k_pe.clone()
        c_kv[hidden], k_pe[hidden] = float("nan"), float("nan")
        out = mla.mla_attention(q_nope, q_pe, c_kv, k_pe, w, 0.25, also_causal, mask, path="expanded",
                                interpret=True, config={"BLOCK_M": 8, "BLOCK_N": 4})
        assert rel_err(out, ref) < TOL[dtype], (kind, dtype)


@pytest.mark.parametrize("s,t,causal", [(50, 50, True), (9, 77, True), (33, 70, False), (40, 200, True)], ids=str)
def test_prefill_interior_and_edge_tiles(s, t, causal):
    """Small tiles, so query blocks have several interior key tiles (read unmasked) before their edge ones: square
    and chunked causal prefill (a short chunk over a long context too), a context off the tile, non-causal."""
    b, h, dn, r, dv, c = 2, 2, 16, 8, 16, 32
    for dtype in (torch.float32, torch.float16):
        q_nope, q_pe, c_kv, k_pe, w = _inputs(b, s, t, h, dn, r, dv, c, dtype, noncontig=True)
        ref = mla.reference(*(x.double() for x in (q_nope, q_pe, c_kv, k_pe, w)), 0.25, causal)
        out = mla.mla_attention(q_nope, q_pe, c_kv, k_pe, w, 0.25, causal, path="expanded", interpret=True,
                                config={"BLOCK_M": 16, "BLOCK_N": 16})
        assert rel_err(out, ref) < TOL[dtype]


TMA_TILE = {"BLOCK_M": 16, "BLOCK_N": 16, "TMA": True}


@pytest.fixture
def descriptor_fits(monkeypatch):
    """What each prefill launch's ``_descriptors_fit`` answered."""
    answers, real = [], mla._descriptors_fit
    monkeypatch.setattr(mla, "_descriptors_fit", lambda *t: answers.append(real(*t)) or answers[-1])
    return answers


@pytest.mark.parametrize("shape,causal", [((2, 50, 50, 2, 16, 8, 16, 32), True), ((1, 9, 77, 3, 16, 16, 24, 64), True),
                                          ((2, 33, 70, 2, 32, 8, 32, 32), False), ((1, 1, 19, 2, 16, 8, 16, 32), True)],
                         ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_descriptor_fed_prefill_matches_float64(shape, causal, dtype, descriptor_fits):
    """The prefill's key and value tiles through tensor descriptors (TMA): square and chunked causal prefill, a
    context off the tile (the copy engine's zero fill), dv != dn (a value tile wider than its rows), non-causal."""
    b, s, t, h, dn, r, dv, c = shape
    q_nope, q_pe, c_kv, k_pe, w = _inputs(b, s, t, h, dn, r, dv, c, dtype)
    ref = mla.reference(*(x.double() for x in (q_nope, q_pe, c_kv, k_pe, w)), 0.25, causal)
    out = mla.mla_attention(q_nope, q_pe, c_kv, k_pe, w, 0.25, causal, path="expanded", interpret=True,
                            config=TMA_TILE)
    assert out.shape == (b, s, h, dv) and rel_err(out, ref) < TOL[dtype]
    assert descriptor_fits == [True]


@pytest.mark.parametrize("kind", ["causal", "window", "bias"])
def test_descriptor_fed_prefill_with_a_mask_input(kind, descriptor_fits):
    b, h, s, t = 2, 2, 45, 70
    mask = _prefill_masks(b, s, t)[kind]
    q_nope, q_pe, c_kv, k_pe, w = _inputs(b, s, t, h, 16, 8, 16, 32, torch.float32)
    ref = mla.reference(*(x.double() for x in (q_nope, q_pe, c_kv, k_pe, w)), 0.25, False, mask)
    out = mla.mla_attention(q_nope, q_pe, c_kv, k_pe, w, 0.25, False, mask, path="expanded", interpret=True,
                            config=TMA_TILE)
    assert rel_err(out, ref) < TOL[torch.float32] and descriptor_fits == [True]


def test_descriptor_fed_prefill_falls_back_where_descriptors_do_not_fit(descriptor_fits):
    """A rope key whose rows are 43 fp32 values apart (172 bytes, not a multiple of 16): the same tile with
    pointers, right."""
    q_nope, q_pe, c_kv, k_pe, w = _inputs(1, 20, 20, 2, 16, 8, 16, 32, torch.float32, noncontig=True)
    ref = mla.reference(*(x.double() for x in (q_nope, q_pe, c_kv, k_pe, w)), 0.25, True)
    out = mla.mla_attention(q_nope, q_pe, c_kv, k_pe, w, 0.25, True, path="expanded", interpret=True,
                            config=TMA_TILE)
    assert rel_err(out, ref) < TOL[torch.float32] and descriptor_fits == [False]


def _fp8_latent(c_kv):
    """c_kv quantized per token as the FP8 cache stores it, rows of very different sizes and one all zero."""
    rows = c_kv * torch.logspace(-2, 1, c_kv.shape[1], dtype=c_kv.dtype)[None, :, None]
    rows[:, min(1, rows.shape[1] - 1)] = 0
    return quantize_latent(rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("path", ["absorbed", "expanded"])
@pytest.mark.parametrize("shape", [CASES[1], CASES[2], CASES[4]], ids=["decode", "speculative", "chunked"])
def test_fp8_latent_matches_float64(dtype, path, shape):
    """An FP8 latent with per-token scales: the kernels' result equals float64 attention over the dequantized
    cache (the FP8 values are the inputs here; what FP8 loses against the original latent is the cache's
    business, tested with it)."""
    b, s, t, h, dn, r, dv, c = shape
    q_nope, q_pe, c_kv, k_pe, w = _inputs(b, s, t, h, dn, r, dv, c, dtype)
    kv8, kv_scale = _fp8_latent(c_kv.float())
    exact = dequantize_latent(kv8, kv_scale.double(), torch.float64)
    ref = mla.reference(*(x.double() for x in (q_nope, q_pe)), exact, k_pe.double(), w.double(), 0.2, True)
    assert rel_err(mla.reference(q_nope.double(), q_pe.double(), kv8, k_pe.double(), w.double(), 0.2, True,
                                 kv_scale=kv_scale), ref) < 1e-12
    scales = kv_scale if path == "absorbed" else kv_scale[..., 0]  # [B, T, 1] as the cache holds it, or [B, T]
    out = mla.mla_attention(q_nope, q_pe, kv8, k_pe, w, 0.2, True, kv_scale=scales, path=path, interpret=True)
    assert out.dtype == dtype and rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("magnitude", [1e-6, 1.0, 3e5])
def test_fp8_latent_widened_to_fp16_matches_float64(dtype, magnitude):
    """The FP8_AS_FP16 candidate: queries of any magnitude (3e5 is past fp16's range once absorbed, 1e-6 deep
    in its subnormals) enter the fp16 score dot scaled per head, so the result stays within fp16 products'
    rounding of float64 over the dequantized cache. fp16 queries cannot hold 3e5 themselves; bf16 ones can
    (the case the scaling is for), which the interpreter cannot run: fp32 queries stand in for them."""
    if dtype == torch.float16 and magnitude > 6e4:
        pytest.skip("fp16 queries cannot hold this magnitude")
    b, s, t, h, dn, r, dv, c = CASES[2]
    q_nope, q_pe, c_kv, k_pe, w = _inputs(b, s, t, h, dn, r, dv, c, torch.float32)
    q_nope, q_pe = (q_nope * magnitude).to(dtype), (q_pe * magnitude).to(dtype)
    k_pe, w = k_pe.to(dtype), w.to(dtype)
    scale = 0.2 / magnitude ** 2 if magnitude > 1 else 0.2  # scores of a size softmax can still tell apart
    kv8, kv_scale = _fp8_latent(c_kv)
    exact = dequantize_latent(kv8, kv_scale.double(), torch.float64)
    ref = mla.reference(q_nope.double(), q_pe.double(), exact, k_pe.double(), w.double(), scale, True)
    out = mla.mla_attention(q_nope, q_pe, kv8, k_pe, w, scale, True, kv_scale=kv_scale, path="absorbed",
                            interpret=True, config={"BLOCK_H": 16, "BLOCK_T": 16, "FP8_AS_FP16": True})
    assert out.dtype == dtype and torch.isfinite(out).all() and rel_err(out, ref) < 2e-3


@pytest.mark.parametrize("magnitude, scaled", [(1e6, slice(40, 90)), (1.0, slice(None)), (1e-9, slice(None)),
                                               (1e-5, slice(40, 90))])
def test_fp8_latent_in_fp16_stays_right_past_fp16s_range(magnitude, scaled):
    """Under FP8_AS_FP16 P.V reads the tile's values in fp16: a latent past fp16's range (1e6) or below its
    subnormals (1e-9, which fp16 would flush to zero) must come out right, and so must tiles whose rows differ
    in size by 1e5 or 1e6 (rows 40-89 alone scaled)."""
    b, s, t, h, dn, r, dv, c = CASES[4]
    q_nope, q_pe, c_kv, k_pe, w = _inputs(b, s, t, h, dn, r, dv, c, torch.float32)
    rows = c_kv.clone()
    rows[:, scaled] *= magnitude
    kv8, kv_scale = quantize_latent(rows)
    exact = dequantize_latent(kv8, kv_scale.double(), torch.float64)
    scale = 0.2 / max(magnitude, 1.0)  # scores of a size softmax can still tell apart
    ref = mla.reference(q_nope.double(), q_pe.double(), exact, k_pe.double(), w.double(), scale, True)
    out = mla.mla_attention(q_nope, q_pe, kv8, k_pe, w, scale, True, kv_scale=kv_scale, path="absorbed",
                            interpret=True, config={"BLOCK_H": 16, "BLOCK_T": 16, "SPLITS": 2, "FP8_AS_FP16": True})
    assert torch.isfinite(out).all() and rel_err(out, ref) < 2e-3


def test_fp8_latent_decode_never_reads_the_masked_tail():
    """A static FP8 cache's step: the unwritten tail's scales are NaN (a reused buffer), the mask hides it."""
    b, t, filled = 2, 120, 23
    q_nope, q_pe, c_kv, k_pe, w = _inputs(b, 1, t, 4, 16, 8, 16, 32, torch.float32)
    kv8, kv_scale = quantize_latent(c_kv)
    exact = dequantize_latent(kv8, kv_scale.double(), torch.float64)
    ref = mla.reference(q_nope.double(), q_pe.double(), exact[:, :filled], k_pe[:, :filled].double(), w.double(),
                        0.3, False)
    kv_scale[:, filled:] = float("nan")
    mask = torch.zeros(1, t).masked_fill(torch.arange(t)[None, :] >= filled, float("-inf"))
    out = mla.mla_attention(q_nope, q_pe, kv8, k_pe, w, 0.3, False, mask, kv_scale=kv_scale, path="absorbed",
                            interpret=True, config={"BLOCK_H": 16, "BLOCK_T": 16, "SPLITS": 3})
    assert rel_err(out, ref) < 1e-5


def test_fp8_latent_bad_inputs_are_clear_errors():
    q_nope, q_pe, c_kv, k_pe, w = _inputs(1, 1, 4, 2, 16, 8, 16, 32, torch.float32)
    kv8, kv_scale = quantize_latent(c_kv)
    with pytest.raises(TypeError, match="kv_scale"):
        mla.mla_attention(q_nope, q_pe, kv8, k_pe, w, 1.0, True, interpret=True)
    with pytest.raises(TypeError, match="kv_scale"):
        mla.mla_attention(q_nope, q_pe, c_kv, k_pe, w, 1.0, True, kv_scale=kv_scale, interpret=True)
    with pytest.raises(ValueError, match="kv_scale"):
        mla.mla_attention(q_nope, q_pe, kv8, k_pe, w, 1.0, True, kv_scale=kv_scale[:, :2], interpret=True)
    with pytest.raises(ValueError, match="kv_scale"):
        mla.mla_attention(q_nope, q_pe, kv8, k_pe, w, 1.0, True, kv_scale=kv_scale.half(), interpret=True)
    assert kv8.dtype == FP8


def test_bad_shapes_are_clear_errors():
    q_nope, q_pe, c_kv, k_pe, w = _inputs(1, 1, 4, 2, 16, 8, 16, 32, torch.float32)
    with pytest.raises(ValueError, match="rope width"):
        mla.mla_attention(q_nope, q_pe, c_kv, k_pe[..., :4], w, 1.0, True, interpret=True)
    with pytest.raises(ValueError, match="w_kv_b"):
        mla.mla_attention(q_nope, q_pe, c_kv, k_pe, w[:, :8], 1.0, True, interpret=True)
    with pytest.raises(TypeError, match="dtype"):
        mla.mla_attention(q_nope, q_pe, c_kv.double(), k_pe, w, 1.0, True, interpret=True)


def test_latent_cache_is_far_smaller_than_mha():
    """V2 dims: 576 values per token and layer against 16 heads x (192 + 128) for MHA of the same heads."""
    latent = mla.latent_bytes(1, 1, 512, 64, 2)
    mha = mla.mha_cache_bytes_per_token(16, 128, 64, 128, 2)
    assert latent == 1152 and mha == 10240 and 1 - latent / mha > 0.88
