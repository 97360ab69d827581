"""Decode-sized projections that read the same input, in one launch.

    y_g = x @ W_g^T   for g < G (G <= MAX_GROUPS), x [M, K], W_g [N_g, K], y_g [M, N_g]

At a few rows these matmuls are bandwidth-bound and short: V2-Lite's q_proj and kv_a_proj_with_mqa read 12.6 and
2.4 MB per layer and decode step, and cuBLAS took 6.8 and 6.1 us for them one after the other, 7.2 us as one
matmul over the two weights stacked (H200, ``bench/decode_projections.py``). Stacking the weights would need a
copy of them that goes stale when the model's own are updated; this kernel reads each weight where it lies. Its
column tiles run over the weights one after the other: program_id(0) picks the weight (and its output) by where
it falls among the weights' tile counts, so a single launch streams every weight byte once, the whole K per
program (no split-K partial sums, no second launch), fp32 accumulation. Measured there: 8.3 us for the V2-Lite
pair (against 12.5 for the two cuBLAS launches), 16.1 for V3's q_a_proj + kv_a_proj (19.2).

With FP8 weights (``weight_scales``: 128 x 128 blocks, W8A8 as ``quant.quant_matmul`` computes it) the same
launch streams half the bytes. On H100 the FP8 decode GEMMs of the attention projections lost to cuBLAS bf16 one at
a time (q_proj 9.8 against 7.9 us, bench/RESULTS.md), which is why ``quantize_skip=("self_attn",)`` was the faster
decode. The quant pass offers FP8 W8A8 layers of one activation this launch, timed at compile time against their
quant_matmuls (``deepfuse.passes.quant``); ``bench/decode_projections.py`` times both forms beside bf16's.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton

from deepfuse.codegen import KernelTemplate, cache_dir, generate, memo
from deepfuse.runtime import autotune
from deepfuse.runtime.kernels import TRITON_DTYPES, loop_stages, quant, rms_norm, size_hint

MAX_GROUPS = 4
MAX_M = 16  # decode sizes: one BLOCK_M tile of rows covers them

TEMPLATE = KernelTemplate(
    "linear_group",
    '''
import triton
import triton.language as tl


${round_to_e4m3}


@triton.jit(do_not_specialize=["N0", "N1", "N2", "N3", "stride_ym0", "stride_ym1", "stride_ym2", "stride_ym3"])
def linear_group_kernel(
    X, W0, W1, W2, W3, Y0, Y1, Y2, Y3, NormW, S0, S1, S2, S3,
    M, K, N0, N1, N2, N3,
    stride_xm, stride_ym0, stride_ym1, stride_ym2, stride_ym3, stride_sn, eps,
    GROUPS: tl.constexpr, EVEN_K: tl.constexpr, NORM: tl.constexpr, FP8: tl.constexpr,
    EXACT_FP8_ROUNDING: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of y_g = x @ W_g^T over the whole K, for the weight g whose column tiles
    hold program_id(0): weight 0's tiles come first, then weight 1's, and so on. Each W_g is [N_g, K] and y_g
    [M, N_g], both contiguous along their last dim, as is x.
    NORM: x is first RMS-normalized, x * rsqrt(mean(x^2) + eps) * NormW, which is rsqrt(..) * ((x * NormW) @ W^T):
    the K loop multiplies each x tile by its NormW tile and sums the squares of x beside the dot, and the row's
    rsqrt scales the accumulator at the end (no pass over x before the loop, no normalized x in memory). The loop
    is a tl.range of STAGES stages so that NormW's tiles are pipelined too (a plain range pipelines only the loads
    feeding the dot). With NORM the launch still took 18.1 us on H100 against 9.2 without (V2-Lite's q_proj and
    kv_a_proj): the pass folds the norm only when asked (``deepfuse.passes.linear_group``). Since then the squares
    are summed along K once after the loop (their per-step sum took eight warp shuffles in every step, sm_90a
    SASS); not yet timed.
    FP8: each W_g is float8_e4m3fn with fp32 scales per 128 x 128 block, S_g [N_g / 128, K / 128] (row stride
    stride_sn), and the layers are W8A8 (DeepSeek-V3's recipe, as ``quant_matmul`` computes them): each x tile is
    quantized per row in registers (every program again: x is a few rows), the FP8 dot accumulates in fp32 and
    both scales multiply it, the weight's one scalar per K tile (BLOCK_K 128, BLOCK_N dividing 128)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    tiles0 = tl.cdiv(N0, BLOCK_N)
    tiles1 = tl.cdiv(N1, BLOCK_N)
    tiles2 = tl.cdiv(N2, BLOCK_N)
    W = W0
    Y = Y0
    S = S0
    n_w = N0
    stride_ym = stride_ym0
    tile = pid_n
    if GROUPS > 1:
        if pid_n >= tiles0:
            W = W1
            Y = Y1
            S = S1
            n_w = N1
            stride_ym = stride_ym1
            tile = pid_n - tiles0
    if GROUPS > 2:
        if pid_n >= tiles0 + tiles1:
            W = W2
            Y = Y2
            S = S2
            n_w = N2
            stride_ym = stride_ym2
            tile = pid_n - tiles0 - tiles1
    if GROUPS > 3:
        if pid_n >= tiles0 + tiles1 + tiles2:
            W = W3
            Y = Y3
            S = S3
            n_w = N3
            stride_ym = stride_ym3
            tile = pid_n - tiles0 - tiles1 - tiles2
    s_ptr = S + (tile * BLOCK_N // 128) * stride_sn  # FP8: the tile's row of weight scale blocks
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < n_w
    x_ptrs = X + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = W + offs_n.to(tl.int64)[None, :] * K + offs_k[:, None]  # [BLOCK_K, BLOCK_N], K innermost in memory
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    squares = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)  # summed along K after the loop: no shuffles in it
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=n_ok[None, :], other=0.0)
        else:
            k_ok = (k0 + offs_k) < K
            x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if NORM:
            xf = x.to(tl.float32)
            squares += xf * xf
            # the weight's tile loaded as x's [BLOCK_M, BLOCK_K] (its rows the same): in x's layout each thread's
            # values are 16 contiguous bytes, which the pipeline copies asynchronously; a [BLOCK_K] load had 2
            g = tl.load(NormW + k0 + offs_k[None, :] + 0 * offs_m[:, None], mask=(k0 + offs_k < K)[None, :],
                        other=0.0).to(tl.float32)
            x = (xf * g).to(w.dtype)
        if FP8:  # W8A8: the x tile quantized per row, the FP8 dot's fp32 result times both scales
            ${quantize_x}
            w_scale = tl.load(s_ptr + k0 // 128)
            acc += tl.dot(xq, w) * (x_scale * w_scale)[:, None]
        else:
            acc = tl.dot(x, w, acc, input_precision=${precision})
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if NORM:
        acc = acc * tl.rsqrt(tl.sum(squares, axis=1) / K + eps)[:, None]
    y_ptrs = Y + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
''',
)

# Narrow column tiles: V2-Lite's q_proj + kv_a_proj (3648 columns) make 228 programs of 16, V3's q_a_proj +
# kv_a_proj (2112 columns) 132; deep K tiles keep each program's loads in flight. The first is the untuned default.
CONFIGS = [
    {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 256, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 128, "num_warps": 4, "num_stages": 6},
    {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 512, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4},
]

# FP8 weights (W8A8): the K tile is the 128-wide scale block, N tiles divide it (one weight scale per K tile); an FP8
# tile is half a bf16 one's bytes, so deeper pipelines keep as many bytes in flight.
FP8_CONFIGS = [
    {"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": 128, "num_warps": 4, "num_stages": st}
    for bn, st in [(16, 6), (32, 6), (16, 8), (32, 8), (64, 6)]
]
FP8_BLOCK = quant.DEFAULT_BLOCK[0]  # the weight scale block (both dims)

_generated = memo()


def kernels_for(dtype: torch.dtype, origin: str = ""):
    """The generated module for this dtype (``linear_group_kernel``)."""
    key = (str(cache_dir()), dtype)
    if key not in _generated:
        header = (
            "Pattern family: linear_group (decode-sized projections of one input).\n"
            "Computes: y_g = x @ W_g^T for up to 4 weights read in one launch; fp32 accumulation; x optionally\n"
            "RMS-normalized in the same launch (NORM); or FP8 weights in 128 x 128 blocks, x quantized per row and\n"
            "128-wide tile (FP8, W8A8).\n"
            + (f"First generated for: {origin}" if origin else "")
        )
        # the x tile's W8A8 quantization: quant_matmul's in-loop one (x -> xq, x_scale)
        slots = {"precision": '"ieee"' if dtype == torch.float32 else "None",
                 "round_to_e4m3": quant.ROUND_TO_E4M3, "quantize_x": quant.QUANTIZE_X}
        _generated[key] = generate(TEMPLATE, {"dtype": str(dtype)}, slots, header)
    return _generated[key]


def check(x: torch.Tensor, weights: Sequence[torch.Tensor],
          weight_scales: Optional[Sequence[torch.Tensor]] = None) -> None:
    """A clear error for operands the kernel does not take."""
    if not 1 <= len(weights) <= MAX_GROUPS:
        raise ValueError(f"linear_group: 1 to {MAX_GROUPS} weights, got {len(weights)}")
    if x.dtype not in TRITON_DTYPES:
        raise TypeError(f"linear_group: x must be float16, bfloat16 or float32, got {x.dtype}")
    for i, w in enumerate(weights):
        if w.dim() != 2 or w.shape[1] != x.shape[-1]:
            raise ValueError(f"linear_group: x [..., {x.shape[-1]}] and weight {i} {tuple(w.shape)} do not chain "
                             "(each weight is [N, K])")
        if weight_scales is not None:
            want = (triton.cdiv(w.shape[0], FP8_BLOCK), triton.cdiv(w.shape[1], FP8_BLOCK))
            if w.dtype != torch.float8_e4m3fn:
                raise TypeError(f"linear_group: with weight_scales weight {i} must be float8_e4m3fn, got {w.dtype}")
            sc = weight_scales[i]
            if tuple(sc.shape) != want or sc.dtype != torch.float32 or sc.device != x.device:
                raise ValueError(f"linear_group: weight {i}'s scales must be fp32 {want} (one per {FP8_BLOCK} x "
                                 f"{FP8_BLOCK} block) on {x.device}, got {tuple(sc.shape)} {sc.dtype} on {sc.device}")
        elif w.dtype != x.dtype:
            raise TypeError(f"linear_group: weight {i} is {w.dtype}, x is {x.dtype}: the weights are read in x's "
                            "dtype")
        if w.stride(1) != 1 or (w.shape[0] > 1 and w.stride(0) != w.shape[1]):
            raise ValueError(f"linear_group: weight {i} must be contiguous [N, K], got strides {w.stride()}")
        if w.device != x.device:
            raise ValueError(f"linear_group: weight {i} is on {w.device}, x on {x.device}")


def reference(x: torch.Tensor, weights: Sequence[torch.Tensor], norm_weight: Optional[torch.Tensor] = None,
              eps: float = 0.0, weight_scales: Optional[Sequence[torch.Tensor]] = None) -> list[torch.Tensor]:
    """The projections in torch; with ``norm_weight``, of x RMS-normalized first (in fp32, rounded to x's dtype);
    with ``weight_scales``, FP8 W8A8 layers (``quant.reference``)."""
    if norm_weight is not None:
        x, _ = rms_norm.reference(x, norm_weight, None, eps, False, x.dtype)
    if weight_scales is not None:
        return [quant.reference(x, w, s, None, "fp8-block", True) for w, s in zip(weights, weight_scales)]
    return [torch.nn.functional.linear(x, w) for w in weights]


def linear_group(x: torch.Tensor, weights: Sequence[torch.Tensor], interpret: bool = False,
                 config: Optional[dict] = None, out: Optional[Sequence[torch.Tensor]] = None,
                 origin: str = "", norm_weight: Optional[torch.Tensor] = None,
                 eps: float = 0.0, weight_scales: Optional[Sequence[torch.Tensor]] = None) -> list[torch.Tensor]:
    """[x @ w^T for w in weights], x [..., K] with at most ``MAX_M`` rows, each w [N_g, K] contiguous in x's dtype
    -> [..., N_g] each, one launch. With ``norm_weight`` [K] (any float dtype), of RMSNorm(x) instead:
    x * rsqrt(mean(x^2) + eps) * norm_weight, computed in the same launch (``reference``'s math, summed in another
    order). With ``weight_scales`` (fp32 [N_g / 128, K / 128] each) the weights are float8_e4m3fn in 128 x 128
    blocks and the products FP8 W8A8 (x quantized per row and 128-wide tile, as ``quant.quant_matmul`` computes
    them); not with ``norm_weight``. ``out``: contiguous tensors to write into (tests poison them). ``config``
    None: autotune now (real tensors). Traceable: the launch becomes an Inductor user-kernel node."""
    check(x, weights, weight_scales)
    fp8 = weight_scales is not None
    if fp8 and norm_weight is not None:
        raise ValueError("linear_group: FP8 weights (weight_scales) do not take a norm_weight")
    if norm_weight is not None and (tuple(norm_weight.shape) != (x.shape[-1],)
                                    or norm_weight.dtype not in TRITON_DTYPES):
        raise ValueError(f"linear_group: the norm weight must be [{x.shape[-1]}] in a float dtype, got "
                         f"{tuple(norm_weight.shape)} {norm_weight.dtype}")
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()  # a few rows: the copy is small
    m = x2.shape[0]
    if isinstance(m, int) and m > MAX_M:
        raise ValueError(f"linear_group: decode sizes only (at most {MAX_M} rows), got {m}")
    ns = [w.shape[0] for w in weights]
    ys = list(out) if out is not None else [x2.new_empty((m, n)) for n in ns]
    gen = kernels_for(x.dtype, origin)
    fn = gen.function("linear_group_kernel", interpret=interpret)
    if not interpret:
        fn = torch.library.wrap_triton(fn)
    norm = None if norm_weight is None else norm_weight.contiguous()
    pad = MAX_GROUPS - len(weights)
    w_args = list(weights) + [weights[0]] * pad
    y_args = ys + [ys[0]] * pad
    n_args = ns + [0] * pad
    scales = [sc.contiguous() for sc in weight_scales] if fp8 else [x2]  # (never read without FP8)
    s_args = scales + [scales[0]] * (MAX_GROUPS - len(scales))

    def launch(cfg: dict) -> None:
        cfg = dict(cfg)
        bm, bn, bk = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N"), cfg.pop("BLOCK_K")
        if fp8 and (bk != FP8_BLOCK or FP8_BLOCK % bn):
            raise ValueError(f"linear_group: FP8 tiles take BLOCK_K {FP8_BLOCK} and a BLOCK_N dividing it, got "
                             f"{bn} / {bk}")
        if not (isinstance(m, int) and m == 0):
            fn[(sum(triton.cdiv(n, bn) for n in ns), triton.cdiv(m, bm))](
                x2, *w_args, *y_args, x2 if norm is None else norm, *s_args, m, k, *n_args, x2.stride(0),
                *(y.stride(0) for y in y_args), triton.cdiv(k, FP8_BLOCK), float(eps), GROUPS=len(weights),
                EVEN_K=k % bk == 0, NORM=norm is not None, FP8=fp8, EXACT_FP8_ROUNDING=interpret, BLOCK_M=bm,
                BLOCK_N=bn, BLOCK_K=bk, STAGES=loop_stages(cfg), **({} if interpret else cfg),
            )

    if config is None:
        form = "|norm" if norm is not None else "|fp8" if fp8 else ""
        config = autotune.choose(f"{gen.key}|{'+'.join(map(str, ns))}x{k}{form}", size_hint(m),
                                 FP8_CONFIGS if fp8 else CONFIGS, launch, x.device, enabled=not interpret)
    launch(config)
    return [y.view(*x.shape[:-1], n) for y, n in zip(ys, ns)]
