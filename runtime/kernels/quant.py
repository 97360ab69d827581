"""Quantized matmuls: y = x @ dequant(w)^T (+ bias), with the weight kept quantized in memory.

Two weight formats:

* ``fp8-block``: ``w`` is float8_e4m3fn [N, K] with one fp32 scale per (128 x 128) block, ``scale[N/bn, K/bk]``
  (DeepSeek-V3's ``weight_scale_inv``: dequant(w)[n, k] = w[n, k] * scale[n // bn, k // bk]). With
  ``act_quant`` the activations are quantized on the fly too, one scale per token and per bk-wide K tile
  (s = amax / 448), and the product runs on the tensor cores' FP8 path: per K tile,
  acc += (x_q . w_q) * s_x[m] * s_w[n], accumulated in fp32. Without it (the weight-only form a graph
  that dequantizes and multiplies in bf16 computes) the fp8 tile is widened to the activation dtype.
* ``int8-channel``: ``w`` is int8 [N, K] with one scale per output channel, ``scale[N]``; activations stay in
  their dtype; the scale is applied to the fp32 accumulator in the epilogue.

The activation quantization runs inside the GEMM's K loop (``quantize``: the tile is read in bf16, its row
maxima taken, and it is cast to fp8 in registers) or as a separate pre-kernel writing fp8 activations and
their scales (``prequantized``); which is faster depends on M (bench/RESULTS.md has the measurement).

Decode sizes (M <= 16) are bandwidth-bound: there the K dimension is split across programs so every SM
streams weight bytes, and the fp32 partial sums are added in a fixed order (deterministic).
"""
from __future__ import annotations

import os
import textwrap
from typing import Optional

import torch
import triton

from deepfuse.codegen import KernelTemplate, cache_dir, generate, memo
from deepfuse.runtime import autotune
from deepfuse.runtime.kernels import TRITON_DTYPES, loop_stages, size_hint

FORMATS = ("fp8-block", "int8-channel")
FP8_MAX = 448.0  # the largest finite float8_e4m3fn
INT8_MAX = 127.0
# Floor of a tile's absolute maximum before it becomes a scale: an all-zero tile quantizes to zeros (scale
# 1e-12 / 448) instead of 0 / 0.
AMAX_FLOOR = 1e-12
DEFAULT_BLOCK = (128, 128)

# The interpreter's fp32 -> fp8 cast is off; kernels that quantize in registers round through this first (the MoE
# experts' FP8 kernels take it too).
ROUND_TO_E4M3 = '''\
@triton.jit
def round_to_e4m3(v):
    \"\"\"v rounded (to nearest even) onto the float8_e4m3fn grid, in fp32. Only the interpreter needs it: its
    fp32 -> fp8 cast rounds half up and drops the carry into the exponent (124.3 becomes 64, not 128).\"\"\"
    ulp = tl.exp2(tl.maximum(tl.floor(tl.log2(tl.abs(v) + 1e-30)), -6.0) - 3.0)
    magic = ulp * 12582912.0  # 1.5 * 2**23 ulps: adding and subtracting it rounds to a multiple of ulp
    return (v + magic) - magic
'''

TEMPLATE = KernelTemplate(
    "quant_matmul",
    '''
import triton
import triton.language as tl


${round_to_e4m3}


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row block, column block) of program_id(0) in grouped order: GROUP_M row blocks sweep the column blocks
    together, so programs that share weight columns run together and reuse the weight tile from L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_rows, (pid % per_group) // group_rows


@triton.jit
def ${kernel_name}(
    X, XS, W, WS, Bias, Y,
    M, N, K,
    stride_xm, stride_xk, stride_xsm, stride_xsk,
    stride_wn, stride_wk, stride_wsn, stride_wsk,
    stride_ys, stride_ym, stride_yn,
    k_per_split,
    SCALE_BLOCK_N: tl.constexpr, SCALE_BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    EXACT_FP8_ROUNDING: tl.constexpr, UNIFORM_W_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, STAGES: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of y over the K range of split program_id(1); the K loop reads the weight
    in its stored (quantized) form."""
    split = tl.program_id(1)
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # 64-bit: M * K may pass 2**31
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=STAGES):  # scale loads pipelined too
        k_ok = (k0 + offs_k) < K
        x_ptrs = X + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :] * stride_xk
        w_ptrs = W + offs_n[None, :] * stride_wn + (k0 + offs_k)[:, None] * stride_wk
        if EVEN_K:
            x = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=n_ok[None, :], other=0.0)
        else:
            x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        ${tile_product}
    ${epilogue}
    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = Y + split * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


${tma_kernel}


${swap_kernel}


@triton.jit
def act_quant_kernel(
    X, XQ, XS, M, K, stride_xm, stride_xk, stride_qm, stride_sm,
    GROUP_K: tl.constexpr, BLOCK_R: tl.constexpr, EXACT_FP8_ROUNDING: tl.constexpr,
):
    """Per token and per GROUP_K-wide tile: s = max|x| / 448 and x_q = fp8(x / s); a program takes BLOCK_R tokens
    of one tile (one token a program made each a 256-byte read: at 8192 x 8192 it ran at a fifth of HBM speed)."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    tile = tl.program_id(1)
    offs = tile * GROUP_K + tl.arange(0, GROUP_K)
    r_ok = rows < M
    ok = r_ok[:, None] & (offs < K)[None, :]
    x = tl.load(X + rows[:, None] * stride_xm + offs[None, :] * stride_xk, mask=ok, other=0.0).to(tl.float32)
    s = tl.maximum(tl.max(tl.abs(x), axis=1), ${amax_floor}) / ${fp8_max}
    xq = x / s[:, None]
    if EXACT_FP8_ROUNDING:
        xq = round_to_e4m3(xq)
    tl.store(XQ + rows[:, None] * stride_qm + offs[None, :], xq.to(tl.float8e4nv), mask=ok)
    tl.store(XS + rows * stride_sm + tile, s, mask=r_ok)
''',
)

# A bf16/fp16 activation tile quantized in registers: row maxima, scale, cast to fp8 (the linear_group kernel takes
# it for its FP8 weights too).
QUANTIZE_X = f"""\
xf = x.to(tl.float32)
x_scale = tl.maximum(tl.max(tl.abs(xf), axis=1), {AMAX_FLOOR!r}) / {FP8_MAX!r}
xq = xf / x_scale[:, None]
if EXACT_FP8_ROUNDING:
    xq = round_to_e4m3(xq)
xq = xq.to(tl.float8e4nv)"""
# The per-K-tile product, by how the activation tile arrives.
_PRODUCTS = {
    # the tile quantized here, FP8 dot, both scales on the fp32 result
    "quantize": QUANTIZE_X + """
${scales}
acc += tl.dot(xq, w) * scales""",
    # fp8 tile and its per-token scales written by act_quant_kernel.
    "prequantized": """\
x_scale = tl.load(XS + offs_m * stride_xsm + (k0 // SCALE_BLOCK_K) * stride_xsk, mask=m_ok, other=0.0)
${scales}
acc += tl.dot(x, w) * scales""",
    # activations stay in their dtype; the fp8 tile widens exactly to it, the block scale goes on the result.
    "fp8_weight_only": """\
${w_scales}
acc += tl.dot(x, w.to(x.dtype), input_precision=${precision}) * scales""",
    # int8 values are exact in bf16/fp16/fp32; the per-channel scale waits for the epilogue.
    "int8_weight_only": "acc = tl.dot(x, w.to(x.dtype), acc, input_precision=${precision})",
    # a float weight (no scales), widened to the activation dtype in registers when the graph casts it (a bf16
    # router weight multiplied in fp32): the cast copy is never made.
    "dense": "acc = tl.dot(x, w.to(x.dtype), acc, input_precision=${precision})",
}
# The prequantized GEMM with its operand tiles brought in by Hopper's tensor-memory copies: descriptors over the
# FP8 activations and weight (both K-contiguous), no per-element address arithmetic or masks in the K loop (the
# copy engine zero-fills past the edges). On H100, pre-kernel included, at 8192^3: 808 TFLOP/s against 715 for the
# best pointer-fed tile; at 4096 x 21888 x 2048 677 against 677 (bench/fp8_gemm_tiles.py, bench/RESULTS.md), so both
# forms are candidates (where tma_available). A 256-wide N tile as two 128-wide halves (each with its scalar weight
# scale) lost at both (540 and 528 TFLOP/s) and is not kept.
_TMA_KERNEL = """\
@triton.jit
def fp8_block_prequantized_matmul_tma_kernel(
    X, XS, W, WS, Bias, Y,
    M, N, K,
    stride_xsm, stride_xsk, stride_wsn, stride_wsk, stride_ym, stride_yn,
    SCALE_BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    RESCALE: tl.constexpr, M_HALVES: tl.constexpr, STAGES: tl.constexpr,
):
    \"\"\"One [BLOCK_M, BLOCK_N] tile of y = (x_q . w_q^T) with x's per-token and w's per-block scales on each
    BLOCK_K tile's product (BLOCK_N inside one weight-scale block: one scalar weight scale per K tile); X [M, K]
    and W [N, K] FP8, contiguous, read through tensor descriptors.

    RESCALE: the products accumulate in the MMA itself, the accumulator kept in units of the current K tile's
    scale s_k (x's per row times w's): before tile k's product it is multiplied by s_(k-1) / s_k, and by the
    last tile's scale at the end, so no second tile of unscaled product is held beside it (99 registers a thread
    at 128 x 128 on 8 warps, where the scaled sum takes 156). The multiply waits on the tile's scales before the
    MMA issues, so the loop is a tl.range with STAGES stages: its scale loads become asynchronous copies, issued
    with the operand tiles' (a plain range pipelines only the loads that feed the dot directly). A weight scale
    of 0 is taken as 2^-100 (a block whose scale is 0 adds ~1e-30 of its codes' product, not the 0 it should:
    far below a bf16 output's resolution). M_HALVES (with RESCALE): the rows as two halves, one MMA each, for a
    tile one warpgroup holds whole.\"\"\"
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    m0 = pid_m * BLOCK_M
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    w_desc = tl.make_tensor_descriptor(W, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
    w_scales = WS + (n0 // SCALE_BLOCK_N) * stride_wsn
    ROWS: tl.constexpr = BLOCK_M // 2 if M_HALVES else BLOCK_M
    x_desc = tl.make_tensor_descriptor(X, shape=[M, K], strides=[K, 1], block_shape=[ROWS, BLOCK_K])
    offs_m = m0 + tl.arange(0, ROWS)
    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    if RESCALE:
        W_SCALE_FLOOR: tl.constexpr = 7.888609052210118e-31  # 2^-100, a zero weight scale's stand-in
        s_x = tl.full((ROWS,), 1.0, tl.float32)
        s_w = tl.cast(1.0, tl.float32)
        if M_HALVES:
            offs_hi = offs_m + ROWS
            acc_hi = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
            s_x_hi = tl.full((ROWS,), 1.0, tl.float32)
        for kt in tl.range(0, tl.cdiv(K, BLOCK_K), num_stages=STAGES):
            x = x_desc.load([m0, kt * BLOCK_K])
            w = w_desc.load([n0, kt * BLOCK_K])
            s_w_k = tl.maximum(tl.load(w_scales + kt * stride_wsk), W_SCALE_FLOOR)
            w_ratio = s_w / s_w_k
            s_x_k = tl.load(XS + offs_m * stride_xsm + kt * stride_xsk, mask=offs_m < M, other=1.0)
            acc = tl.dot(x, w.T, acc * (s_x / s_x_k * w_ratio)[:, None])
            s_x = s_x_k
            if M_HALVES:
                x = x_desc.load([m0 + ROWS, kt * BLOCK_K])
                s_x_k = tl.load(XS + offs_hi * stride_xsm + kt * stride_xsk, mask=offs_hi < M, other=1.0)
                acc_hi = tl.dot(x, w.T, acc_hi * (s_x_hi / s_x_k * w_ratio)[:, None])
                s_x_hi = s_x_k
            s_w = s_w_k
        # the last K tile's scales, loaded again: carried out of the loop, the rows' scales took a second layout
        # and a second load in every iteration (TTGIR)
        last = tl.cdiv(K, BLOCK_K) - 1
        s_w = tl.maximum(tl.load(w_scales + last * stride_wsk), W_SCALE_FLOOR)
        acc = acc * (tl.load(XS + offs_m * stride_xsm + last * stride_xsk, mask=offs_m < M, other=1.0) * s_w)[:, None]
        if M_HALVES:
            acc_hi = acc_hi * (tl.load(XS + offs_hi * stride_xsm + last * stride_xsk, mask=offs_hi < M, other=1.0)
                               * s_w)[:, None]
    else:
        for kt in tl.range(0, tl.cdiv(K, BLOCK_K), num_stages=STAGES):
            x = x_desc.load([m0, kt * BLOCK_K])
            w = w_desc.load([n0, kt * BLOCK_K])
            x_scale = tl.load(XS + offs_m * stride_xsm + kt * stride_xsk, mask=offs_m < M, other=0.0)
            acc += tl.dot(x, w.T) * (x_scale[:, None] * tl.load(w_scales + kt * stride_wsk))
    if HAS_BIAS:
        bias = tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        acc += bias
    y_ptrs = Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=(offs_m < M)[:, None] & n_ok[None, :])
    if M_HALVES:
        if HAS_BIAS:
            acc_hi += bias
        tl.store(y_ptrs + ROWS * stride_ym, acc_hi.to(Y.dtype.element_ty),
                 mask=(offs_hi < M)[:, None] & n_ok[None, :])
"""

# The decode GEMM of the in-loop quantizing mode with the operands swapped: y^T = w . x^T. With the few tokens as
# the MMA's M side, 16 rows are below the 64 of Hopper's FP8 warpgroup MMA, and Triton widens every FP8 weight tile
# to fp16 for the older MMA (bench/kernel_resources.py counted 72 such conversions a tile in the MoE experts' 16-row
# FP8 tile); the weight rows as the M side (64 and up) and the tokens as N (16) go to the FP8 MMA as loaded. On H100
# at V2-Lite's decode shapes: 3-7% faster than the best tile before (bench/fp8_decode_tiles.py, bench/RESULTS.md).
_SWAP_KERNEL = """\
@triton.jit
def fp8_block_quantize_decode_kernel(
    X, W, WS, Bias, Y,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_wsn, stride_wsk,
    stride_ys, stride_ym, stride_yn,
    k_per_split,
    SCALE_BLOCK_N: tl.constexpr, SCALE_BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    EXACT_FP8_ROUNDING: tl.constexpr, UNIFORM_W_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
):
    \"\"\"One [BLOCK_M, BLOCK_N] tile of y over the K range of split program_id(1), for a few tokens, computed
    transposed: the weight tile's BLOCK_N rows are the FP8 MMA's M side, the BLOCK_M tokens its N side; the
    activation tile quantized per token here, both scales on each K tile's fp32 product.\"\"\"
    split = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = tl.program_id(0) // num_n
    pid_n = tl.program_id(0) % num_n
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # y^T
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=STAGES):  # scale loads pipelined too
        k_ok = (k0 + offs_k) < K
        x_ptrs = X + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :] * stride_xk
        w_ptrs = W + offs_n[:, None] * stride_wn + (k0 + offs_k)[None, :] * stride_wk
        if EVEN_K:
            x = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=n_ok[:, None], other=0.0)
        else:
            x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        ${quantize_x}
        ${scales}
        acc += tl.dot(w, tl.trans(xq)) * scales
    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    y_ptrs = Y + split * stride_ys + offs_m[None, :] * stride_ym + offs_n[:, None] * stride_yn
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=m_ok[None, :] & n_ok[:, None])
"""

# The weight's block scale for this K tile (times the activation's, when there is one). When BLOCK_N divides the
# scale block, the whole tile shares one weight scale: a scalar load, and one FMA per accumulator element.
_SCALES = """\
if UNIFORM_W_SCALE:
    w_scale = tl.load(WS + (pid_n * BLOCK_N // SCALE_BLOCK_N) * stride_wsn + (k0 // SCALE_BLOCK_K) * stride_wsk)
    scales = ${x_scale}w_scale
else:
    w_scale = tl.load(WS + (offs_n // SCALE_BLOCK_N) * stride_wsn + (k0 // SCALE_BLOCK_K) * stride_wsk, mask=n_ok, other=0.0)
    scales = ${x_scale}w_scale${w_axis}"""


def _scales(x_scale: str, w_axis: str = "[None, :]") -> str:
    """``_SCALES`` with the activation's scale factor in front (``x_scale``, "" for none) and a weight scale per
    output column laid along ``w_axis`` of the tile (``[:, None]`` in the swapped kernel, whose rows are y's
    columns)."""
    return _SCALES.replace("${x_scale}", x_scale).replace("${w_axis}", w_axis)

_EPILOGUES = {
    "int8_weight_only": "acc *= tl.load(WS + offs_n * stride_wsn, mask=n_ok, other=0.0)[None, :]",
}

_generated = memo()


def _mode(fmt: str, act_quant: bool, prequantized: bool) -> str:
    if fmt == "int8-channel":
        return "int8_weight_only"
    if not act_quant:
        return "fp8_weight_only"
    return "prequantized" if prequantized else "quantize"


def kernels_for(mode: str, x_dtype: torch.dtype, origin: str = ""):
    """The generated module for this mode and activation dtype and its GEMM's name: ``<mode>_matmul_kernel``
    (``fp8_block_`` in front for the FP8 x FP8 modes), ``decode_linear_kernel`` for ``dense``."""
    key = (str(cache_dir()), mode, x_dtype)
    if key not in _generated:
        name = ("decode_linear_kernel" if mode == "dense"
                else f"{'fp8_block_' if mode in ('quantize', 'prequantized') else ''}{mode}_matmul_kernel")
        what = {
            "quantize": "FP8 x FP8 block-scaled GEMM, activations quantized per token and 128-wide K tile in the K loop",
            "prequantized": "FP8 x FP8 block-scaled GEMM over activations quantized by act_quant_kernel",
            "fp8_weight_only": "GEMM over FP8 block-scaled weights, activations in their own dtype",
            "int8_weight_only": "GEMM over int8 weights with per-output-channel scales, activations in their own dtype",
            "dense": "a decode-sized GEMM over a float weight read as stored, K split across programs",
        }[mode]
        family = "linear (decode-sized matmul)" if mode == "dense" else "quant (quantized matmul)"
        header = (
            f"Pattern family: {family}.\n"
            f"Computes: y = x @ {'w' if mode == 'dense' else 'dequant(w)'}^T (+ bias): {what}; fp32 accumulation.\n"
            + (f"First generated for: {origin}" if origin else "")
        )
        consts = {"amax_floor": repr(AMAX_FLOOR), "fp8_max": repr(FP8_MAX),
                  "precision": '"ieee"' if x_dtype == torch.float32 else "None"}
        fill = lambda s: s.replace("${amax_floor}", consts["amax_floor"]).replace("${fp8_max}", consts["fp8_max"]) \
            .replace("${precision}", consts["precision"])\
            .replace("${scales}", _scales("x_scale[:, None] * ")).replace("${w_scales}", _scales(""))  # noqa: E731
        slots = {
            "round_to_e4m3": ROUND_TO_E4M3,
            "kernel_name": name,
            "tile_product": fill(_PRODUCTS[mode]),
            "tma_kernel": _TMA_KERNEL if mode == "prequantized"
            else "# (the descriptor-fed GEMM serves the prequantized mode only)",
            "swap_kernel": fill(_SWAP_KERNEL.replace("        ${quantize_x}", textwrap.indent(QUANTIZE_X, " " * 8))
                                .replace("        ${scales}",
                                         textwrap.indent(_scales("x_scale[None, :] * ", "[:, None]"), " " * 8)))
            if mode == "quantize"
            else "# (the operand-swapped decode GEMM serves the in-loop quantizing mode only)",
            "epilogue": _EPILOGUES.get(mode, "# the scales were applied per K tile"),
            **consts,
        }
        _generated[key] = (generate(TEMPLATE, {"mode": mode, "x_dtype": str(x_dtype)}, slots, header), name)
    return _generated[key]


# Tiles by regime. Decode (M <= 16) is bandwidth-bound: narrow N tiles and split K so every SM streams weight
# bytes. Larger M is compute-bound: wide tiles, deep pipelines. The first entry is the untuned default.
DECODE_MAX_M = 16
DECODE_CONFIGS = [
    {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 2, "num_stages": 6},
    {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 2, "num_stages": 4},
]
# The operand-swapped decode GEMM (``_SWAP_KERNEL``, FP8 with activations quantized in the loop): BLOCK_N weight
# rows, 64 or more, on the FP8 MMA's M side; appended to the candidates where that mode runs.
DECODE_SWAP_CONFIGS = [
    {"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": 128, "SWAP": True, "num_warps": 4, "num_stages": st}
    for bn, st in [(64, 4), (64, 6), (128, 4)]
]
# Narrow N tiles over the whole K in one program (SPLIT_K 1): no second pass to add fp32 partial sums, which the
# split tiles above need. Candidates for float weights only: for FP8 (in-loop quantizing, M = 1, H100) they were
# never the fastest at any V2-Lite projection, even timed with the split tiles' sum as a separate launch (q_proj
# 9.90 against 9.61 us for the swapped tile, MLP down 42.7 against 16.6; bench/RESULTS.md), and each costs a
# compile per shape.
DECODE_UNSPLIT_CONFIGS = [
    {"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": 128, "SPLIT_K": 1, "num_warps": 4, "num_stages": 4} for bn in (16, 32)
]
DENSE_DECODE_CONFIGS = DECODE_CONFIGS + DECODE_UNSPLIT_CONFIGS  # float weights (deepfuse.passes.linear)
SMALL_MAX_M = 128
SMALL_CONFIGS = [
    {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 5},
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 8, "num_stages": 3},
]
# Up to SMALL_MAX_M rows a narrow output has fewer tiles than the GPU has SMs (V2-Lite's MLP down projection at
# 128 tokens: 16 tiles of 64 x 128 over K = 10944): these split K as well, the fp32 partial sums then added in a
# fixed order; 43 -> 28 us there on H100 (cuBLAS bf16 25, row-wise FP8 29). Timed beside the unsplit tiles, so
# where the tiles already fill the GPU the autotuner keeps those; offered only where each range keeps at least
# SPLIT_MIN_K_TILES K tiles (kv_b_proj's K = 512, four tiles in all, ran 6.3 -> 8.4 us with them among the
# candidates; see TUNE_WEIGHT_COPIES for the likely cause).
SPLIT_MIN_K_TILES = 4
SMALL_SPLIT_CONFIGS = [
    {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "SPLIT_K": splits, "num_warps": 4, "num_stages": 4}
    for splits in (4, 8)
]
LARGE_CONFIGS = [  # BLOCK_N 128 keeps a tile inside one weight scale block (a scalar scale per K tile)
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 8, "num_stages": 4},
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128, "num_warps": 8, "num_stages": 3},
]


# The descriptor-fed GEMM (prequantized FP8 x FP8 only; see _TMA_KERNEL): appended to the candidates above, so the
# compile-time timing keeps the pointer-fed tiles wherever they are faster.
TMA_SMALL_CONFIGS = [
    {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4, "TMA": True},
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 8, "num_stages": 4, "TMA": True},
]
TMA_LARGE_CONFIGS = [
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 8, "num_stages": 4, "TMA": True},
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 8, "num_stages": 3, "TMA": True},
]
# RESCALE (see _TMA_KERNEL) holds the accumulator alone: 99 registers a thread at 128 x 128 on 8 warps and 99 KB of
# shared memory at 3 stages, so two tiles share an SM; on one warpgroup (M_HALVES) 165 registers, 178 for 256 x 128
# on 8 warps (sm_90a, bench/kernel_resources.py). On H100 (bench/fp8_gemm_tiles.py, bench/RESULTS.md) they ran
# 835-848 TFLOP/s at 8192^3 against 783 for the best scaled-sum tile, and 797 against 659 at V2-Lite's MLP shape
# (4096 x 21888 x 2048), but their error against float64 doubled (3.6e-3 against 1.7e-3 at K = 8192, 2.1e-3 at
# 2048): the FP8 MMA's own accumulation over all of K is not the fp32 sum per K tile that issue 5 asks for (the
# limited accumulation precision DeepSeek-V3's report describes). So they are opt-in: DEEPFUSE_FP8_RESCALE=1 adds
# them to the candidates the compile-time timing picks from, which weighs speed only.
RESCALE_CONFIGS = [
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 8, "num_stages": 3, "TMA": True, "RESCALE": True},
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3, "TMA": True, "RESCALE": True,
     "M_HALVES": True},
    {"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 8, "num_stages": 3, "TMA": True, "RESCALE": True,
     "M_HALVES": True},
]


def rescale_enabled() -> bool:
    return os.environ.get("DEEPFUSE_FP8_RESCALE") == "1"


TMA_ONLY = ("TMA", "RESCALE", "M_HALVES")  # what a descriptor-fed tile's config names beyond the tile itself


def tma_available(device: torch.device, interpret: bool = False) -> bool:
    """Whether the descriptor-fed tiles join the candidates: where the copy engine has tensor descriptors (Hopper,
    compute capability 9.0, and later) or in the interpreter, unless DEEPFUSE_FP8_TMA=0. Launched from Inductor's
    compiled code inside a captured CUDA graph they run right (tests/test_gpu_quant.py, H100)."""
    if os.environ.get("DEEPFUSE_FP8_TMA") == "0":
        return False
    return interpret or (device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9)


def configs_for(m: int, tma: bool = False) -> list[dict]:
    """Candidate tiles for ``m`` rows; ``tma``: with the descriptor-fed GEMM's (the prequantized mode's, where
    ``tma_available``)."""
    m = size_hint(m)
    if m <= DECODE_MAX_M:
        return list(DECODE_CONFIGS)
    if m <= SMALL_MAX_M:
        return SMALL_CONFIGS + SMALL_SPLIT_CONFIGS + (TMA_SMALL_CONFIGS if tma else [])
    return LARGE_CONFIGS + (TMA_LARGE_CONFIGS + (RESCALE_CONFIGS if rescale_enabled() else []) if tma else [])


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _splits(m, n: int, k: int, cfg: dict, device: torch.device) -> int:
    """K splits for a decode-sized M: enough programs for two per SM, each keeping >= 4 K tiles."""
    if size_hint(m) > DECODE_MAX_M:
        return 1
    tiles_k = triton.cdiv(k, cfg["BLOCK_K"])
    programs = triton.cdiv(n, cfg["BLOCK_N"])
    return max(1, min(triton.cdiv(2 * _sm_count(device), programs), tiles_k // 4))


def check(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor], fmt: str,
          act_quant: bool, block: tuple[int, int], kernel: bool = True) -> None:
    """Clear errors for inputs the kernels (``kernel``) or the reference do not take."""
    if fmt not in FORMATS:
        raise ValueError(f"quant_matmul: format must be one of {FORMATS}, got {fmt!r}")
    if kernel and x.dtype not in TRITON_DTYPES:
        raise TypeError(f"quant_matmul: activations must be float16, bfloat16 or float32, got {x.dtype}")
    if w.dim() != 2 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"quant_matmul: x [..., {x.shape[-1]}] and w {tuple(w.shape)} do not chain (w is [N, K])")
    n, k = w.shape
    if fmt == "fp8-block":
        if w.dtype != torch.float8_e4m3fn:
            raise TypeError(f"quant_matmul fp8-block: weight must be float8_e4m3fn, got {w.dtype}")
        bn, bk = block
        if bk % 16 or bn <= 0:
            raise ValueError(f"quant_matmul fp8-block: block {block} must have a K size that is a multiple of 16")
        want = (triton.cdiv(n, bn), triton.cdiv(k, bk))
        if tuple(scale.shape) != want:
            raise ValueError(f"quant_matmul fp8-block: scale shape {tuple(scale.shape)} should be {want} for "
                             f"weight {tuple(w.shape)} in {bn}x{bk} blocks")
    else:
        if w.dtype != torch.int8:
            raise TypeError(f"quant_matmul int8-channel: weight must be int8, got {w.dtype}")
        if act_quant:
            raise ValueError("quant_matmul int8-channel is weight-only: act_quant must be False")
        if tuple(scale.shape) != (n,):
            raise ValueError(f"quant_matmul int8-channel: scale shape {tuple(scale.shape)} should be ({n},)")
    if scale.dtype != torch.float32:
        raise TypeError(f"quant_matmul: scales must be float32, got {scale.dtype}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"quant_matmul: bias shape {tuple(bias.shape)} should be ({n},)")


def quant_matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    fmt: str,
    act_quant: bool,
    block: tuple[int, int] = DEFAULT_BLOCK,
    out_dtype: Optional[torch.dtype] = None,
    prequantize: Optional[bool] = None,
    interpret: bool = False,
    config: Optional[dict] = None,
    origin: str = "",
    activations: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> torch.Tensor:
    """x [..., K] @ dequant(w [N, K])^T (+ bias) -> [..., N] in ``out_dtype`` (default x's dtype).

    ``prequantize`` (fp8 with act_quant): quantize the activations in a pre-kernel (True) or in the GEMM's K loop
    (False); None picks the measured faster one for this M. ``activations``: x already quantized by
    ``prequantize_activations`` (FP8 [M, K] and its scales), shared by layers of one input (``quant_matmuls``).
    ``config`` None: autotune now (real tensors). Traceable: under make_fx the launches become Inductor
    user-kernel nodes."""
    check(x, w, scale, bias, fmt, act_quant, block)
    out_dtype = out_dtype or x.dtype
    n, k = w.shape
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if activations is not None:
        if fmt != "fp8-block" or not act_quant or prequantize is False:
            raise ValueError("quant_matmul: prequantized activations go with fp8-block W8A8 (act_quant) only")
        prequantize = True
    if prequantize is None:
        prequantize = size_hint(m) > DECODE_MAX_M  # measured: bench/RESULTS.md, quant_matmul
    mode = _mode(fmt, act_quant, prequantize)
    gen, name = kernels_for(mode, x.dtype, origin)
    gemm = gen.function(name, interpret=interpret)
    bn_s, bk_s = block if fmt == "fp8-block" else (1, 1)
    xs = scale  # placeholder pointer where the mode reads no activation scales
    if activations is not None:
        x2, xs = activations
        if (x2.dtype != torch.float8_e4m3fn or tuple(x2.shape) != (m, k)
                or tuple(xs.shape) != (m, triton.cdiv(k, bk_s))):
            raise ValueError(f"quant_matmul: prequantized activations must be float8_e4m3fn [{m}, {k}] with scales "
                             f"[{m}, {k} / {bk_s}], got {x2.dtype} {tuple(x2.shape)} and {tuple(xs.shape)}")
    elif mode == "prequantized":
        x2, xs = prequantize_activations(x2, bk_s, interpret, gen)
    tma_gemm = gen.function("fp8_block_prequantized_matmul_tma_kernel", interpret=interpret) \
        if mode == "prequantized" else None
    swap_gemm = gen.function("fp8_block_quantize_decode_kernel", interpret=interpret) if mode == "quantize" else None
    if not interpret:
        gemm = torch.library.wrap_triton(gemm)
        if tma_gemm is not None:
            tma_gemm = torch.library.wrap_triton(tma_gemm)
        if swap_gemm is not None:
            swap_gemm = torch.library.wrap_triton(swap_gemm)
    configs = _configs(m, k, fmt, act_quant, block, mode, x.device, interpret)

    def launch(cfg: dict, weight: torch.Tensor = w) -> torch.Tensor:
        if cfg.get("TMA"):
            if tma_gemm is not None and _tma_fits(x2, weight, cfg, (bn_s, bk_s)):
                return _launch_tma(tma_gemm, x2, xs, weight, scale, bias, out_dtype, bn_s, cfg, interpret)
            cfg = {key: v for key, v in cfg.items() if key not in TMA_ONLY}  # the same tile, pointer-fed
        if cfg.get("SWAP"):
            if swap_gemm is not None:
                return _launch(swap_gemm, x2, xs, weight, scale, bias, out_dtype, (bn_s, bk_s), cfg, interpret)
            cfg = {key: v for key, v in cfg.items() if key != "SWAP"}  # the same tile, tokens on the M side
        return _launch(gemm, x2, xs, weight, scale, bias, out_dtype, (bn_s, bk_s), cfg, interpret)

    if config is None:
        config = autotune.choose(_tune_key(gen.key, n, k, fmt), size_hint(m), configs,
                                 _over_cold_weights(launch, lambda: w),
                                 x.device, enabled=not interpret)
    else:
        config = _fit(config, fmt, act_quant, block)
    return launch(config).view(*x.shape[:-1], n)


def quant_matmuls(x: torch.Tensor, weights: list[torch.Tensor], scales: list[torch.Tensor],
                  biases: list[Optional[torch.Tensor]], block: tuple[int, int] = DEFAULT_BLOCK,
                  out_dtype: Optional[torch.dtype] = None, interpret: bool = False,
                  configs: Optional[list[Optional[dict]]] = None, origin: str = "") -> list[torch.Tensor]:
    """FP8 W8A8 layers of one input (fp8-block, activations quantized per token and block[1]-wide tile):
    [quant_matmul(x, w, s, b) for each layer] with x quantized once, by one pre-kernel launch, and read by each
    layer's GEMM (a prefill's q_a and kv_a projections, a dense MLP's gate and up). The same values as the layers
    one by one: the quantization is a function of x alone. ``configs``: each layer's tile (None: autotune now).
    Each layer's operands are checked by its quant_matmul."""
    if not weights or not len(weights) == len(scales) == len(biases):
        raise ValueError(f"quant_matmuls: one scale and one bias (or None) per weight, got {len(weights)} weights, "
                         f"{len(scales)} scales, {len(biases)} biases")
    configs = configs or [None] * len(weights)
    gen, _ = kernels_for("prequantized", x.dtype, origin)
    activations = prequantize_activations(x.reshape(-1, x.shape[-1]), block[1], interpret, gen)
    return [quant_matmul(x, w, s, b, "fp8-block", True, block, out_dtype, interpret=interpret, config=cfg,
                         origin=origin, activations=activations)
            for w, s, b, cfg in zip(weights, scales, biases, configs)]


# The weight copies a candidate is timed over: a weight read once per call, from HBM in a model (the next layer's
# weight is not in L2), sits in L2 when one copy is replayed alone, and a tile that wins there can lose from HBM
# (the likely cause of kv_b_proj at 128 tokens going 6.3 -> 8.4 us in bench/run.py, which rotates weight copies,
# once split-K tiles were among its candidates: its 2 MB weight was timed alone; the pick was not recorded).
TUNE_WEIGHT_COPIES = 16


def _over_cold_weights(launch, weight):
    """``launch(cfg, w)`` for the timing, over the weight (``weight()``) and clones of it past twice the L2, made on
    the first run (``choose`` runs it only when it times, so a cached choice clones nothing)."""
    copies = autotune.once(lambda: autotune.cold_clones(weight(), TUNE_WEIGHT_COPIES))

    def run(cfg: dict) -> None:
        for w in copies():
            launch(cfg, w)

    return run


ACT_QUANT_ROWS = 32  # tokens per program of the activation pre-kernel (a 32 x 128 bf16 tile: 8 KB read)


def prequantize_activations(x2: torch.Tensor, group: int = DEFAULT_BLOCK[1], interpret: bool = False,
                            gen=None):
    """The activation pre-kernel: x2 [M, K] -> (float8_e4m3fn [M, K], fp32 scales [M, K/group] rounded up), per
    token and ``group``-wide tile (``quantize_activation``'s math, one launch)."""
    m, k = x2.shape
    gen = gen or kernels_for("prequantized", x2.dtype)[0]
    quant = gen.function("act_quant_kernel", interpret=interpret)
    if not interpret:
        quant = torch.library.wrap_triton(quant)
    xq = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x2.device)
    xs = torch.empty((m, triton.cdiv(k, group)), dtype=torch.float32, device=x2.device)
    if not (isinstance(m, int) and m == 0):
        quant[(triton.cdiv(m, ACT_QUANT_ROWS), triton.cdiv(k, group))](
            x2, xq, xs, m, k, x2.stride(0), x2.stride(1), xq.stride(0), xs.stride(0),
            GROUP_K=group, BLOCK_R=ACT_QUANT_ROWS, EXACT_FP8_ROUNDING=interpret)
    return xq, xs


def _launch(gemm, x2, xs, w, scale, bias, out_dtype, scale_block, cfg: dict, interpret: bool) -> torch.Tensor:
    """One launch of a generated GEMM over x2 [M, K] and w [N, K] (K split across programs at decode sizes, the
    fp32 partial sums then added in a fixed order) -> [M, N] in ``out_dtype``."""
    m, k = x2.shape
    n = w.shape[0]
    cfg = dict(cfg)
    bm, bn, bk = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N"), cfg.pop("BLOCK_K")
    swap = cfg.pop("SWAP", False)  # the operand-swapped decode GEMM: no activation scales, no grouped order
    bn_s, bk_s = scale_block
    splits = cfg.pop("SPLIT_K", None) or _splits(m, n, k, {"BLOCK_N": bn, "BLOCK_K": bk}, x2.device)
    k_per_split = triton.cdiv(triton.cdiv(k, splits), bk) * bk
    splits = triton.cdiv(k, k_per_split)
    y = torch.empty((splits, m, n), dtype=torch.float32 if splits > 1 else out_dtype, device=x2.device)
    if not (isinstance(m, int) and m == 0):
        b = bias if bias is not None else scale
        x_args = (x2.stride(0), x2.stride(1)) if swap else (x2.stride(0), x2.stride(1), xs.stride(0), xs.stride(-1))
        gemm[(triton.cdiv(m, bm) * triton.cdiv(n, bn), splits)](
            *((x2, w, scale, b, y) if swap else (x2, xs, w, scale, b, y)),
            m, n, k,
            *x_args,
            w.stride(0), w.stride(1), scale.stride(0), scale.stride(-1),
            y.stride(0), y.stride(1), y.stride(2),
            k_per_split,
            SCALE_BLOCK_N=bn_s, SCALE_BLOCK_K=bk_s, HAS_BIAS=bias is not None and splits == 1,
            EVEN_K=k % bk == 0, EXACT_FP8_ROUNDING=interpret,
            UNIFORM_W_SCALE=bn_s % bn == 0, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **({} if swap else {"GROUP_M": 8}),
            STAGES=loop_stages(cfg), **({} if interpret else cfg),
        )
    if splits == 1:
        return y[0]
    out = y.sum(0)  # the K splits in a fixed order
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def aligned(t: torch.Tensor) -> bool:
    """Whether ``t`` starts on a 16-byte boundary, as a tensor descriptor needs: its data pointer when it has one;
    under tracing (fake tensors) its offset into a storage the caching allocator aligned."""
    try:
        return t.data_ptr() % 16 == 0
    except Exception:  # a fake tensor has no data pointer
        return t.storage_offset() * t.element_size() % 16 == 0


def _tma_fits(x2: torch.Tensor, w: torch.Tensor, cfg: dict, scale_block) -> bool:
    """Whether the descriptor-fed GEMM takes these operands and this tile: X [M, K] and W [N, K] contiguous FP8 with
    16-byte rows (K a multiple of 16) and starts, the N tile inside one weight-scale block, a K tile that is one
    scale block."""
    k = w.shape[1]
    return (k % 16 == 0 and x2.stride() == (k, 1) and w.stride() == (k, 1) and aligned(x2) and aligned(w)
            and scale_block[0] % cfg["BLOCK_N"] == 0 and cfg["BLOCK_K"] == scale_block[1])


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_allocator() -> None:
    """A tensor descriptor made in a kernel lives in global scratch memory that Triton asks an allocator for at
    launch. Inductor sets one before each of its launches; for launches of ours (autotuning, the eager op) this
    sets a torch one, unless the user has set their own."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)


def _launch_tma(gemm, xq, xs, w, scale, bias, out_dtype, scale_block_n: int, cfg: dict, interpret: bool):
    """One launch of the descriptor-fed prequantized GEMM (``_TMA_KERNEL``) -> [M, N] in ``out_dtype``."""
    m, k = xq.shape
    n = w.shape[0]
    cfg = dict(cfg)
    bm, bn, bk = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N"), cfg.pop("BLOCK_K")
    cfg.pop("TMA")
    rescale, halves = cfg.pop("RESCALE", False), cfg.pop("M_HALVES", False)
    y = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    if not (isinstance(m, int) and m == 0):
        if not interpret:
            ensure_allocator()
        gemm[(triton.cdiv(m, bm) * triton.cdiv(n, bn),)](
            xq, xs, w, scale, bias if bias is not None else scale, y,
            m, n, k,
            xs.stride(0), xs.stride(-1), scale.stride(0), scale.stride(-1), y.stride(0), y.stride(1),
            SCALE_BLOCK_N=scale_block_n, HAS_BIAS=bias is not None,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, RESCALE=rescale, M_HALVES=halves,
            STAGES=loop_stages(cfg),
            **({} if interpret else cfg),
        )
    return y


def decode_linear(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  interpret: bool = False, config: Optional[dict] = None, origin: str = "") -> torch.Tensor:
    """x [..., K] @ w [N, K]^T (+ bias) -> [..., N] in x's dtype, for decode-sized M (<= DECODE_MAX_M rows):
    the weight read as stored (any float dtype, widened to x's in registers), K split across programs so every
    SM streams weight bytes, fp32 accumulation. ``config`` None: autotune now (real tensors). Traceable."""
    if x.dtype not in TRITON_DTYPES or w.dtype not in TRITON_DTYPES:
        raise TypeError(f"decode_linear: x and w must be float16, bfloat16 or float32, got {x.dtype}, {w.dtype}")
    if w.dim() != 2 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"decode_linear: x [..., {x.shape[-1]}] and w {tuple(w.shape)} do not chain (w is [N, K])")
    if bias is not None and tuple(bias.shape) != (w.shape[0],):
        raise ValueError(f"decode_linear: bias shape {tuple(bias.shape)} should be ({w.shape[0]},)")
    n, k = w.shape
    x2 = x.reshape(-1, k)
    gen, name = kernels_for("dense", x.dtype, origin)
    gemm = gen.function(name, interpret=interpret)
    if not interpret:
        gemm = torch.library.wrap_triton(gemm)

    def launch(cfg: dict) -> torch.Tensor:
        return _launch(gemm, x2, w, w, w, bias, x.dtype, (1, 1), cfg, interpret)  # no scales: w stands in

    if config is None:
        config = autotune.choose(f"{gen.key}|{n}x{k}|{w.dtype}", size_hint(x2.shape[0]), DENSE_DECODE_CONFIGS,
                                 launch, x.device, enabled=not interpret)
    return launch(config).view(*x.shape[:-1], n)


def _fit(cfg: dict, fmt: str, act_quant: bool, block) -> dict:
    """A K tile never straddles two scale blocks; with act_quant it is exactly one activation tile."""
    if act_quant:
        return dict(cfg, BLOCK_K=block[1])
    if fmt == "fp8-block":
        return dict(cfg, BLOCK_K=min(cfg["BLOCK_K"], block[1]))
    return cfg


# An FP8 tile's per-K-tile product is a second fp32 tile beside the accumulator (it is scaled before it is added),
# so past 64 accumulator values per thread the FP8 forms spill on sm_90a (bench/kernel_resources.py: 128 x 128 on
# 4 warps, 256 x 128 and 128 x 256 on 8, 360-1056 bytes) and ran 2-4x slower on H100 (bench/fp8_gemm_tiles.py).
# The int8 form accumulates in place and spills at none of them; so does the descriptor-fed GEMM's RESCALE form,
# which may hold twice as many.
FP8_MAX_ACC_PER_THREAD = 64


def _fp8_tile_fits(cfg: dict) -> bool:
    per_thread = cfg["BLOCK_M"] * cfg["BLOCK_N"] // (32 * cfg["num_warps"])
    return per_thread <= FP8_MAX_ACC_PER_THREAD * (2 if cfg.get("RESCALE") else 1)


def _configs(m, k: int, fmt: str, act_quant: bool, block, mode: str, device: torch.device,
             interpret: bool = False) -> list[dict]:
    """The candidate tiles ``mode`` times at ``m`` rows over ``k`` on ``device``, fitted to the scale blocks."""
    tma = mode == "prequantized" and tma_available(device, interpret)
    swap = DECODE_SWAP_CONFIGS if mode == "quantize" and size_hint(m) <= DECODE_MAX_M else []
    configs = [_fit(c, fmt, act_quant, block) for c in configs_for(m, tma) + swap]
    configs = [c for c in configs
               if c.get("SPLIT_K", 1) == 1 or triton.cdiv(k, c["BLOCK_K"]) >= SPLIT_MIN_K_TILES * c["SPLIT_K"]]
    if fmt == "fp8-block":
        configs = [c for c in configs if _fp8_tile_fits(c)]
    return configs


def _tune_key(kernel_key: str, n: int, k: int, fmt: str) -> str:
    return f"{kernel_key}|{n}x{k}|{fmt}"


def tune(m: int, n: int, k: int, fmt: str, act_quant: bool, block, x_dtype, device, has_bias: bool) -> dict:
    """The autotuned config at this size (compile time, on random tensors of the real shapes)."""
    device = torch.device(device)
    mode = _mode(fmt, act_quant, size_hint(m) > DECODE_MAX_M)
    configs = _configs(m, k, fmt, act_quant, block, mode, device)
    if device.type != "cuda":
        return configs[0]
    gen, _ = kernels_for(mode, x_dtype)

    @autotune.once
    def inputs():  # made only if the choice is timed
        x = torch.randn((max(size_hint(m), 1), k), dtype=x_dtype, device=device)
        w, scale = quantize_weight(torch.randn((n, k), device=device), fmt, block)
        return x, w, scale, torch.zeros(n, dtype=x_dtype, device=device) if has_bias else None

    def launch(cfg: dict, weight: torch.Tensor) -> None:
        x, _, scale, bias = inputs()
        quant_matmul(x, weight, scale, bias, fmt, act_quant, block, config=cfg)

    return autotune.choose(_tune_key(gen.key, n, k, fmt), size_hint(m), configs,
                           _over_cold_weights(launch, lambda: inputs()[1]), device)


# ----------------------------------------------------------------------------------------------------------------
# Plain-torch definitions: the reference every kernel is tested against, and the conversions the model loader and
# options={"quantize": ...} use.

def quantize_weight(w: torch.Tensor, fmt: str, block: tuple[int, int] = DEFAULT_BLOCK):
    """A float weight [N, K] -> (quantized weight, fp32 scales) in ``fmt``; dequantize_weight inverts it."""
    w = w.detach().float()
    n, k = w.shape
    if fmt == "fp8-block":
        bn, bk = block
        pad = torch.zeros((triton.cdiv(n, bn) * bn, triton.cdiv(k, bk) * bk), device=w.device)
        pad[:n, :k] = w
        tiles = pad.view(pad.shape[0] // bn, bn, pad.shape[1] // bk, bk)
        scale = tiles.abs().amax(dim=(1, 3)).clamp(min=AMAX_FLOOR) / FP8_MAX
        q = (tiles / scale[:, None, :, None]).view_as(pad)[:n, :k].to(torch.float8_e4m3fn)
        return q.contiguous(), scale.contiguous()
    if fmt == "int8-channel":
        scale = w.abs().amax(dim=1).clamp(min=AMAX_FLOOR) / INT8_MAX
        q = torch.round(w / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
        return q.contiguous(), scale.contiguous()
    raise ValueError(f"quantize_weight: format must be one of {FORMATS}, got {fmt!r}")


def dequantize_weight(w: torch.Tensor, scale: torch.Tensor, fmt: str, block=DEFAULT_BLOCK,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    n, k = w.shape
    if fmt == "fp8-block":
        bn, bk = block
        full = scale.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
        return (w.to(dtype) * full.to(dtype)).to(dtype)
    if fmt == "int8-channel":
        return w.to(dtype) * scale.to(dtype)[:, None]
    raise ValueError(f"dequantize_weight: format must be one of {FORMATS}, got {fmt!r}")


def quantize_activation(x: torch.Tensor, group: int = DEFAULT_BLOCK[1]):
    """Per token and per ``group``-wide K tile: (fp8 values, fp32 scales [..., K/group]), s = max|x| / 448."""
    k = x.shape[-1]
    tiles = triton.cdiv(k, group)
    xf = torch.nn.functional.pad(x.float(), (0, tiles * group - k)).unflatten(-1, (tiles, group))
    s = xf.abs().amax(-1).clamp(min=AMAX_FLOOR) / FP8_MAX
    q = (xf / s[..., None]).to(torch.float8_e4m3fn).flatten(-2)[..., :k]
    return q, s


def dequantize_activation(q: torch.Tensor, s: torch.Tensor, group: int = DEFAULT_BLOCK[1],
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    k = q.shape[-1]
    return q.to(dtype) * s.to(dtype).repeat_interleave(group, -1)[..., :k]


def fake_quantize_activation(x: torch.Tensor, group: int = DEFAULT_BLOCK[1], axis: int = -1) -> torch.Tensor:
    """``x`` quantized per token and ``group``-wide tile along ``axis``, then dequantized to its own dtype:
    the activations of a W8A8 matmul, written out in plain torch."""
    moved = x.movedim(axis, -1)
    return dequantize_activation(*quantize_activation(moved, group), group).to(x.dtype).movedim(-1, axis)


def reference(x, w, scale, bias, fmt: str, act_quant: bool, block=DEFAULT_BLOCK, out_dtype=None,
              compute: torch.dtype = torch.float32) -> torch.Tensor:
    """The quantized matmul in ``compute`` precision (float64 in the tests): dequantized operands, then matmul."""
    check(x, w, scale, bias, fmt, act_quant, tuple(block), kernel=False)
    xc = dequantize_activation(*quantize_activation(x, block[1]), block[1], compute) if act_quant else x.to(compute)
    y = xc @ dequantize_weight(w, scale, fmt, block, compute).t()
    if bias is not None:
        y = y + bias.to(compute)
    return y.to(out_dtype or x.dtype)


def weight_bytes(n: int, k: int, fmt: str, block=DEFAULT_BLOCK) -> int:
    """Bytes a matmul reads for the weight in ``fmt`` (the decode floor's numerator)."""
    if fmt == "fp8-block":
        return n * k + 4 * triton.cdiv(n, block[0]) * triton.cdiv(k, block[1])
    return n * k + 4 * n
