"""The quantized-matmul kernels (FP8 block-scaled with activation quantization fused or as a pre-kernel, FP8
weight-only, int8 weight-only) through Triton's interpreter, against float64 math on the dequantized operands,
on fresh random data with outliers; plus the plain-torch conversions they are defined by."""
import pytest
import torch

from conftest import rel_err
from deepfuse.runtime.kernels import quant

TOL = {torch.float32: 1e-5, torch.float16: 2e-3}
MODES = [  # (format, act_quant, prequantize)
    ("fp8-block", True, False),
    ("fp8-block", True, True),
    ("fp8-block", False, None),
    ("int8-channel", False, None),
]


def _weights(n, k, fmt, outliers=True):
    w = torch.randn(n, k) / k ** 0.5
    if outliers:  # a few values 100x the rest: the block (or channel) scale must absorb them
        idx = torch.randint(0, n * k, (max(1, n * k // 500),))
        w.view(-1)[idx] *= 100
    return quant.quantize_weight(w, fmt)


def _activations(m, k, dtype, outliers=True, noncontig=False):
    x = torch.randn(m, k + (5 if noncontig else 0), dtype=dtype)
    if outliers and m * k:
        x.view(-1)[torch.randint(0, x.numel(), (max(1, m * k // 300),))] *= 100
    return x[:, :k] if noncontig else x


SHAPES = [  # m, n, k
    (1, 200, 256),     # one token (decode), N off the tile
    (5, 64, 1024),     # decode with the K dimension split across programs
    (37, 130, 300),    # odd M, N and K (K not a multiple of the 128 block)
    (140, 96, 256),    # past the decode and small tiles
    (0, 64, 128),      # no tokens
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mode", MODES, ids=["fp8-fused-quant", "fp8-prequant", "fp8-weight-only", "int8"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"m{m}n{n}k{k}" for m, n, k in SHAPES])
def test_quant_matmul_matches_float64(dtype, mode, shape):
    fmt, act_quant, pre = mode
    m, n, k = shape
    x = _activations(m, k, dtype, noncontig=True)
    w, scale = _weights(n, k, fmt)
    bias = torch.randn(n, dtype=dtype)
    out = quant.quant_matmul(x, w, scale, bias, fmt, act_quant, prequantize=pre, interpret=True)
    assert out.shape == (m, n) and out.dtype == dtype
    ref = quant.reference(x.double(), w, scale, bias.double(), fmt, act_quant, compute=torch.float64)
    if m:
        assert rel_err(out, ref) < TOL[dtype]


def _check_tile(mode, cfg, shapes, dtype=torch.float16):
    """``cfg`` in ``mode`` at each (m, n, k), in ``dtype`` with a bias, against float64."""
    fmt, act_quant, pre = mode
    for m, n, k in shapes:
        x = _activations(m, k, dtype, noncontig=True)
        w, scale = _weights(n, k, fmt)
        bias = torch.randn(n, dtype=dtype)
        out = quant.quant_matmul(x, w, scale, bias, fmt, act_quant, prequantize=pre, interpret=True, config=cfg)
        ref = quant.reference(x.double(), w, scale, bias.double(), fmt, act_quant, compute=torch.float64)
        assert out.shape == (m, n) and out.dtype == dtype and rel_err(out, ref) < TOL[dtype], (m, n, k)


@pytest.mark.parametrize("mode", MODES, ids=["fp8-fused-quant", "fp8-prequant", "fp8-weight-only", "int8"])
@pytest.mark.parametrize("cfg", quant.SMALL_SPLIT_CONFIGS, ids=lambda c: f"split{c['SPLIT_K']}")
def test_small_tiles_split_along_k(mode, cfg):
    """The split-K candidates past decode sizes: K cut into SPLIT_K ranges (the last one short, and at K of
    three tiles fewer ranges than asked), each range's fp32 partial sum added in a fixed order, then the bias."""
    _check_tile(mode, cfg, [(17, 200, 1000), (100, 64, 384)])


@pytest.mark.parametrize("mode", MODES, ids=["fp8-fused-quant", "fp8-prequant", "fp8-weight-only", "int8"])
@pytest.mark.parametrize("cfg", quant.DECODE_UNSPLIT_CONFIGS, ids=lambda c: f"n{c['BLOCK_N']}")
def test_decode_tiles_over_the_whole_k(mode, cfg):
    """The unsplit decode tiles, in every format a config may name them for: one program per N tile over all of K
    (K off the tile too). Candidates for float weights only (they lost every FP8 decode shape on H100)."""
    assert cfg in quant.DENSE_DECODE_CONFIGS and cfg not in quant.configs_for(4)
    _check_tile(mode, cfg, [(1, 200, 1000), (16, 48, 384)])


@pytest.mark.parametrize("act_quant", [True, False])
def test_fp8_scale_blocks_narrower_than_the_tile(act_quant):
    """32-row weight blocks: a 64-wide output tile spans two scales (the per-column scale path)."""
    x = _activations(20, 256, torch.float32)
    w, scale = quant.quantize_weight(torch.randn(96, 256), "fp8-block", (32, 128))
    assert scale.shape == (3, 2)
    out = quant.quant_matmul(x, w, scale, None, "fp8-block", act_quant, (32, 128), interpret=True)
    ref = quant.reference(x.double(), w, scale, None, "fp8-block", act_quant, (32, 128), compute=torch.float64)
    assert rel_err(out, ref) < 1e-5


TMA_CONFIGS = quant.TMA_SMALL_CONFIGS + quant.TMA_LARGE_CONFIGS + quant.RESCALE_CONFIGS


def _tile_id(c: dict) -> str:
    return f"{c['BLOCK_M']}x{c['BLOCK_N']}/w{c['num_warps']}/s{c['num_stages']}" + "".join(
        f"/{f.lower()}" for f in ("RESCALE", "M_HALVES") if c.get(f))


@pytest.mark.parametrize("cfg", TMA_CONFIGS, ids=_tile_id)
@pytest.mark.parametrize("shape", [(140, 300, 256), (37, 130, 384), (300, 512, 128)],
                         ids=lambda s: "x".join(map(str, s)))
def test_descriptor_fed_fp8_gemm_matches_float64(cfg, shape):
    """Every tile of the descriptor-fed prequantized GEMM, edges in M and N (the copy engine's zero fill past them),
    bias, fp16 out."""
    m, n, k = shape
    x = _activations(m, k, torch.float16)
    w, scale = _weights(n, k, "fp8-block")
    bias = torch.randn(n, dtype=torch.float16)
    xq, xs = quant.prequantize_activations(x, interpret=True)
    assert quant._tma_fits(xq, w, cfg, quant.DEFAULT_BLOCK)
    out = quant.quant_matmul(x, w, scale, bias, "fp8-block", True, prequantize=True, interpret=True, config=cfg)
    ref = quant.reference(x.double(), w, scale, bias.double(), "fp8-block", True, compute=torch.float64)
    assert out.shape == (m, n) and out.dtype == torch.float16
    assert rel_err(out, ref) < TOL[torch.float16]


@pytest.mark.parametrize("cfg", TMA_CONFIGS, ids=_tile_id)
def test_descriptor_fed_fp8_gemm_across_scales_far_apart(cfg):
    """Scales 10^12 apart from one K tile to the next, the activations' one way and the weight's the other, so each
    tile's product is about the same size and every one counts; rows 10^-8 to 10^8 apart, each checked at its own
    size; a weight block whose scale is 0 (its codes nonzero: it must add nothing). The RESCALE form carries its
    accumulator from one tile's scale to the next's: a ratio taken the wrong way round, or a scale applied twice,
    shows here."""
    m, n, k = 70, 256, 512
    swing = (10 ** torch.tensor([6.0, -6.0, 3.0, -3.0])).repeat_interleave(128)
    x = torch.randn(m, k) * swing * 10 ** (16 * torch.rand(m, 1) - 8)
    w, scale = quant.quantize_weight(torch.randn(n, k) / k ** 0.5 / swing, "fp8-block")
    scale[1, 2] = 0.0
    out = quant.quant_matmul(x, w, scale, None, "fp8-block", True, prequantize=True, interpret=True, config=cfg)
    ref = quant.reference(x.double(), w, scale, None, "fp8-block", True, compute=torch.float64)
    row_err = (out.double() - ref).norm(dim=1) / ref.norm(dim=1)
    assert row_err.max() < 1e-5


def test_descriptor_fed_tiles_fall_back_where_descriptors_do_not_fit():
    """K not a multiple of 16 (rows not 16-byte aligned), a weight view off the 16-byte grid, or 64-row weight-scale
    blocks under a 128-wide tile: the same tile runs pointer-fed, still right."""
    cfg = quant.TMA_LARGE_CONFIGS[0]
    cases = [(300, (128, 128), 0), (256, (64, 128), 0), (256, (128, 128), 8)]
    for k, block, offset in cases:
        x = _activations(20, k, torch.float32)
        w, scale = quant.quantize_weight(torch.randn(200, k) / k ** 0.5, "fp8-block", block)
        if offset:  # the same weight, stored 8 bytes into a buffer
            buf = torch.empty(w.numel() + offset, dtype=w.dtype)
            buf[offset:] = w.view(-1)
            w = buf[offset:].view(w.shape)
        xq, _ = quant.prequantize_activations(x, interpret=True)
        assert not quant._tma_fits(xq, w, cfg, block)
        out = quant.quant_matmul(x, w, scale, None, "fp8-block", True, block, prequantize=True, interpret=True,
                                 config=cfg)
        ref = quant.reference(x.double(), w, scale, None, "fp8-block", True, block, compute=torch.float64)
        assert rel_err(out, ref) < 1e-5


def test_descriptor_fed_tiles_are_candidates_only_for_prequantized_fp8(monkeypatch):
    assert all(c.get("TMA") for c in quant.configs_for(4096, tma=True)[-len(quant.TMA_LARGE_CONFIGS):])
    assert all(c.get("TMA") for c in quant.configs_for(100, tma=True)[-len(quant.TMA_SMALL_CONFIGS):])
    assert not any(c.get("TMA") for c in quant.configs_for(4096) + quant.configs_for(8, tma=True))
    monkeypatch.delenv("DEEPFUSE_FP8_TMA", raising=False)
    assert quant.tma_available(torch.device("cpu"), interpret=True)
    assert not quant.tma_available(torch.device("cpu"))  # no copy engine to describe tiles to
    monkeypatch.setenv("DEEPFUSE_FP8_TMA", "0")  # the user's way out
    assert not quant.tma_available(torch.device("cpu"), interpret=True)
    # the RESCALE tiles trade the fp32 sum per K tile for speed: candidates only when asked for
    monkeypatch.delenv("DEEPFUSE_FP8_RESCALE", raising=False)
    assert not any(c.get("RESCALE") for c in quant.configs_for(4096, tma=True))
    monkeypatch.setenv("DEEPFUSE_FP8_RESCALE", "1")
    assert quant.configs_for(4096, tma=True)[-len(quant.RESCALE_CONFIGS):] == quant.RESCALE_CONFIGS


@pytest.mark.parametrize("cfg", quant.DECODE_SWAP_CONFIGS, ids=lambda c: f"n{c['BLOCK_N']}/s{c['num_stages']}")
@pytest.mark.parametrize("shape", [(1, 200, 256), (16, 130, 1024), (5, 64, 300), (3, 256, 2048)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_operand_swapped_decode_gemm_matches_float64(cfg, shape, dtype):
    """The decode GEMM computed as y^T = w . x^T (weight rows on the FP8 MMA's M side): edges in M (1 to 16 of the
    16 token columns), N and K, K split across programs, bias, the transposed store."""
    _check_tile(MODES[0], cfg, [shape], dtype)


def test_operand_swapped_decode_gemm_with_narrow_scale_blocks():
    """32-row weight blocks under a 64-row tile: a scale per weight row of the tile."""
    x = _activations(3, 256, torch.float32)
    w, scale = quant.quantize_weight(torch.randn(96, 256), "fp8-block", (32, 128))
    out = quant.quant_matmul(x, w, scale, None, "fp8-block", True, (32, 128), interpret=True,
                             config=quant.DECODE_SWAP_CONFIGS[0])
    ref = quant.reference(x.double(), w, scale, None, "fp8-block", True, (32, 128), compute=torch.float64)
    assert rel_err(out, ref) < 1e-5


def test_operand_swapped_tiles_are_candidates_only_where_tokens_are_few_and_quantized_in_the_loop():
    cpu = torch.device("cpu")

    def swapped(m, mode, fmt="fp8-block", act_quant=True):
        return [c for c in quant._configs(m, 2048, fmt, act_quant, quant.DEFAULT_BLOCK, mode, cpu) if c.get("SWAP")]

    assert len(swapped(1, "quantize")) == len(quant.DECODE_SWAP_CONFIGS) == len(swapped(16, "quantize"))
    assert not swapped(17, "quantize") and not swapped(1, "prequantized")
    assert not swapped(1, "fp8_weight_only", act_quant=False)
    assert not swapped(1, "int8_weight_only", "int8-channel", False)
    # a SWAP tile handed to another mode runs as the same tile with the tokens on the M side
    x = _activations(2, 256, torch.float32)
    w, scale = _weights(64, 256, "fp8-block")
    out = quant.quant_matmul(x, w, scale, None, "fp8-block", True, prequantize=True, interpret=True,
                             config=quant.DECODE_SWAP_CONFIGS[0])
    ref = quant.reference(x.double(), w, scale, None, "fp8-block", True, compute=torch.float64)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("m", [1, 16, 100, 4096])
def test_fp8_candidates_leave_out_tiles_that_spill(m):
    """FP8 tiles hold at most 64 accumulator values per thread (the scaled product needs a second such tile);
    int8 keeps every tile; every FP8 size bucket still has candidates, the untuned default first."""
    cpu = torch.device("cpu")
    fp8 = quant._configs(m, 4096, "fp8-block", True, quant.DEFAULT_BLOCK, "prequantized", cpu)
    assert fp8 and all(c["BLOCK_M"] * c["BLOCK_N"] <= 64 * 32 * c["num_warps"] for c in fp8)
    assert fp8[0] == quant._fit(quant.configs_for(m)[0], "fp8-block", True, quant.DEFAULT_BLOCK)
    int8 = quant._configs(m, 4096, "int8-channel", False, quant.DEFAULT_BLOCK, "int8_weight_only", cpu)
    assert len(int8) == len(quant.configs_for(m))


@pytest.mark.parametrize("k,splits", [(512, []), (2048, [4]), (10944, [4, 8])])
def test_split_candidates_keep_enough_k_tiles_per_range(k, splits):
    """Past decode sizes K is split only where each range keeps SPLIT_MIN_K_TILES tiles of 128."""
    cpu = torch.device("cpu")
    got = [c["SPLIT_K"] for c in quant._configs(100, k, "int8-channel", False, quant.DEFAULT_BLOCK,
                                                 "int8_weight_only", cpu) if c.get("SPLIT_K")]
    assert got == splits


def test_leading_dims_out_dtype_and_no_bias():
    x = torch.randn(2, 3, 256)
    w, scale = _weights(48, 256, "fp8-block")
    out = quant.quant_matmul(x, w, scale, None, "fp8-block", True, out_dtype=torch.float16, interpret=True)
    assert out.shape == (2, 3, 48) and out.dtype == torch.float16
    ref = quant.reference(x.double(), w, scale, None, "fp8-block", True, compute=torch.float64)
    assert rel_err(out, ref) < 2e-3


def test_zero_tiles_quantize_to_zero_not_nan():
    """An all-zero activation tile has no scale to divide by; it quantizes to zeros."""
    x = torch.randn(4, 256)
    x[1] = 0
    x[2, :128] = 0
    w, scale = _weights(32, 256, "fp8-block")
    for pre in (False, True):
        out = quant.quant_matmul(x, w, scale, None, "fp8-block", True, prequantize=pre, interpret=True)
        assert torch.isfinite(out).all() and (out[1] == 0).all()
        assert rel_err(out, quant.reference(x.double(), w, scale, None, "fp8-block", True, compute=torch.float64)) < 1e-5


def test_activation_quantization_is_per_token_per_tile():
    x = torch.randn(3, 300) * torch.tensor([1.0, 10.0, 1000.0])[:, None]
    q, s = quant.quantize_activation(x, 128)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (3, 3)
    assert torch.allclose(s[:, 0], x[:, :128].abs().amax(1) / 448)
    back = quant.dequantize_activation(q, s, 128)
    # e4m3 rounds to nearest with 3 mantissa bits: a relative error of 2^-4 for normal values; below 2^-6 (in
    # units of the tile's scale) the grid is subnormal, with steps of 2^-9: an absolute error of half a step.
    per_element = s.repeat_interleave(128, dim=1)[:, :300]
    assert ((back - x).abs() <= torch.maximum(x.abs() * 2 ** -4, per_element * 2 ** -10)).all()


@pytest.mark.parametrize("fmt", ["fp8-block", "int8-channel"])
def test_weight_quantization_round_trip(fmt):
    w = torch.randn(300, 260)
    w[7, 9] = 50.0
    q, s = quant.quantize_weight(w, fmt)
    assert q.shape == w.shape and s.dtype == torch.float32
    assert s.shape == ((3, 3) if fmt == "fp8-block" else (300,))
    back = quant.dequantize_weight(q, s, fmt)
    assert rel_err(back, w) < (0.03 if fmt == "fp8-block" else 0.01)
    assert back[7, 9] == pytest.approx(50.0, rel=1e-6)  # the block's (channel's) maximum maps to the grid's end


def test_bad_inputs_are_clear_errors():
    x = torch.randn(2, 256)
    w, scale = _weights(32, 256, "fp8-block")
    with pytest.raises(ValueError, match="format"):
        quant.quant_matmul(x, w, scale, None, "fp4", True, interpret=True)
    with pytest.raises(ValueError, match="scale shape"):
        quant.quant_matmul(x, w, scale[:, :1], None, "fp8-block", True, interpret=True)
    with pytest.raises(ValueError, match="do not chain"):
        quant.quant_matmul(torch.randn(2, 128), w, scale, None, "fp8-block", True, interpret=True)
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        quant.quant_matmul(x, w.to(torch.float16), scale, None, "fp8-block", True, interpret=True)
    wi, si = _weights(32, 256, "int8-channel")
    with pytest.raises(ValueError, match="weight-only"):
        quant.quant_matmul(x, wi, si, None, "int8-channel", True, interpret=True)
    with pytest.raises(TypeError, match="activations"):
        quant.quant_matmul(x.to(torch.int32), wi, si, None, "int8-channel", False, interpret=True)


def test_op_dispatch_interpret_and_reference_agree():
    from deepfuse.runtime import ops  # noqa: F401  (registers torch.ops.deepfuse.*)

    x = torch.randn(3, 5, 256)
    w, scale = _weights(96, 256, "fp8-block")
    args = (x, w, scale, None, "fp8-block", True, 128, 128, torch.float32)
    a = torch.ops.deepfuse.quant_matmul(*args, "interpret")
    b = torch.ops.deepfuse.quant_matmul(*args, "reference")
    assert a.shape == (3, 5, 96) and rel_err(a, b) < 1e-5


def test_layers_of_one_input_share_its_quantization():
    """quant_matmuls: FP8 W8A8 layers of one input (one weight stored transposed, one with a bias) with x quantized
    once: each output the same as that layer's quant_matmul alone (the quantization is x's alone), through the op
    too; prequantized activations of another shape or format, and mismatched lists, are clear errors."""
    from deepfuse.runtime import ops  # noqa: F401  (registers torch.ops.deepfuse.*)

    x = _activations(40, 300, torch.float32)
    w1, s1 = _weights(200, 300, "fp8-block")
    w2, s2 = quant.quantize_weight(torch.randn(72, 300) / 300 ** 0.5, "fp8-block")
    w2t = w2.t().contiguous().t()  # [N, K] as a view of a [K, N] tensor
    bias = torch.randn(72)
    got = quant.quant_matmuls(x, [w1, w2t], [s1, s2], [None, bias], interpret=True)
    for y, (w, s, b) in zip(got, [(w1, s1, None), (w2t, s2, bias)]):
        alone = quant.quant_matmul(x, w, s, b, "fp8-block", True, prequantize=True, interpret=True)
        assert torch.equal(y, alone)
        assert rel_err(y, quant.reference(x.double(), w, s, b, "fp8-block", True, compute=torch.float64)) < 1e-5
    via_op = torch.ops.deepfuse.quant_matmuls(x, [w1, w2t], [s1, s2], [None, bias], 128, 128, torch.float32,
                                             "interpret")
    assert all(torch.equal(a, b) for a, b in zip(via_op, got))
    xq, xs = quant.prequantize_activations(x, interpret=True)
    with pytest.raises(ValueError, match="prequantized activations must be"):
        quant.quant_matmul(x, w1, s1, None, "fp8-block", True, interpret=True, activations=(xq[:5], xs[:5]))
    with pytest.raises(ValueError, match="fp8-block W8A8"):
        quant.quant_matmul(x, w1, s1, None, "fp8-block", False, interpret=True, activations=(xq, xs))
    with pytest.raises(ValueError, match="one scale and one bias"):
        quant.quant_matmuls(x, [w1, w2t], [s1], [None, None], interpret=True)
