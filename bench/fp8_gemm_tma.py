"""Block-scaled FP8 GEMM main loops beside each other at large M: what the quant kernel's K loop costs and what
Hopper's tensor-memory copies (TMA descriptors) and a 256-wide tile in two scale halves would buy.

    python bench/fp8_gemm_tma.py --out DIR [--shapes 8192x8192x8192,4096x2048x10944,...]

Every variant computes y = (x_q . w_q^T) with one fp32 scale per token and 128-wide K tile (x) and per
128 x 128 block (w), applied to each K tile's product (DeepSeek-V3's recipe), bf16 out, on the same inputs:
- deepfuse: ``quant_matmul`` as the quant pass runs it (activations prequantized, tile autotuned), the
  pre-kernel included;
- mainloop variants (activations already quantized, as the GEMM alone sees them), each checked against the
  float64-accumulated product of the dequantized operands:
  ptr-128: pointer loads, 128 x 128 tile (the quant kernel's loop);
  tma-128: descriptor loads (``tl.make_tensor_descriptor``), 128 x 128 tile;
  tma-256: descriptor loads, 128 x 256 tile as two 128-wide halves, each with its scalar weight scale;
  tma-256-noscale: the same loop with no scales (the plain FP8 GEMM: what the scales cost);
- anchors: cuBLAS bf16 ``torch.mm``; cuBLAS row-wise FP8 ``torch._scaled_mm`` (one scale per row and column,
  activations already quantized).
Median ms by triton.testing.do_bench; TFLOP/s = 2MNK / time. Writes fp8_gemm_tma.json to --out.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(__file__))
from sweep_out import Rows  # noqa: E402


@triton.jit
def _fp8_gemm(X, XS, W, WS, Y, M, N, K, stride_xsm, stride_wsn,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
              TMA: tl.constexpr, HALVES: tl.constexpr, SCALED: tl.constexpr):
    """HALVES: the N tile is HALVES x 128 columns, each half its own accumulator and weight scale."""
    HALF: tl.constexpr = BLOCK_N // HALVES
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    m0 = pid_m * BLOCK_M
    n0 = pid_n * BLOCK_N
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_h = tl.arange(0, HALF)
    m_ok = offs_m < M
    if TMA:
        x_desc = tl.make_tensor_descriptor(X, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
        w_desc = tl.make_tensor_descriptor(W, shape=[N, K], strides=[K, 1], block_shape=[HALF, BLOCK_K])
    acc0 = tl.zeros((BLOCK_M, HALF), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, HALF), dtype=tl.float32)
    for kt in range(0, tl.cdiv(K, BLOCK_K)):
        k0 = kt * BLOCK_K
        if TMA:
            x = x_desc.load([m0, k0])
            w0 = w_desc.load([n0, k0])
        else:
            x = tl.load(X + offs_m[:, None].to(tl.int64) * K + (k0 + offs_k)[None, :], mask=m_ok[:, None], other=0.0)
            w0 = tl.load(W + (n0 + offs_h)[:, None].to(tl.int64) * K + (k0 + offs_k)[None, :],
                         mask=(n0 + offs_h)[:, None] < N, other=0.0)
        if SCALED:
            xs = tl.load(XS + offs_m * stride_xsm + kt, mask=m_ok, other=0.0)
            ws0 = tl.load(WS + (n0 // 128) * stride_wsn + kt)
            acc0 += tl.dot(x, w0.T) * (xs[:, None] * ws0)
        else:
            acc0 = tl.dot(x, w0.T, acc0)
        if HALVES == 2:
            if TMA:
                w1 = w_desc.load([n0 + HALF, k0])
            else:
                w1 = tl.load(W + (n0 + HALF + offs_h)[:, None].to(tl.int64) * K + (k0 + offs_k)[None, :],
                             mask=(n0 + HALF + offs_h)[:, None] < N, other=0.0)
            if SCALED:
                ws1 = tl.load(WS + ((n0 + HALF) // 128) * stride_wsn + kt)
                acc1 += tl.dot(x, w1.T) * (xs[:, None] * ws1)
            else:
                acc1 = tl.dot(x, w1.T, acc1)
    y0 = n0 + offs_h
    tl.store(Y + offs_m[:, None].to(tl.int64) * N + y0[None, :], acc0.to(tl.bfloat16),
             mask=m_ok[:, None] & (y0[None, :] < N))
    if HALVES == 2:
        y1 = n0 + HALF + offs_h
        tl.store(Y + offs_m[:, None].to(tl.int64) * N + y1[None, :], acc1.to(tl.bfloat16),
                 mask=m_ok[:, None] & (y1[None, :] < N))


VARIANTS = {  # name: (TMA, BLOCK_N, HALVES, SCALED, warps, stages)
    "ptr-128": (False, 128, 1, True, 8, 4),
    "tma-128": (True, 128, 1, True, 8, 4),
    "tma-128-s3": (True, 128, 1, True, 8, 3),
    "tma-256": (True, 256, 2, True, 8, 3),
    "tma-256-s4": (True, 256, 2, True, 8, 4),
    "ptr-256": (False, 256, 2, True, 8, 3),
    "tma-256-noscale": (True, 256, 2, False, 8, 3),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None)
    parser.add_argument("--shapes", default="8192x8192x8192,4096x21888x2048,4096x3072x2048,4096x2048x2048")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    from triton.testing import do_bench

    from deepfuse.runtime.kernels.quant import prequantize_activations, quant_matmul, quantize_weight

    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    rows = Rows(args.out, "fp8_gemm_tma")
    for shape in args.shapes.split(","):
        m, n, k = (int(v) for v in shape.split("x"))
        flops = 2 * m * n * k
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w, ws = quantize_weight(torch.randn(n, k, device="cuda") * 0.05, "fp8-block")
        xq, xs = prequantize_activations(x)
        ref = (xq.double().view(m, k // 128, 128) * xs.double()[..., None]).view(m, k) @ \
              (w.double().view(n // 128, 128, k // 128, 128) * ws.double()[:, None, :, None]).view(n, k).T

        def record(name, ms, out=None):
            err = None if out is None else ((out.double() - ref).norm() / ref.norm()).item()
            rows.append({"shape": shape, "impl": name, "ms": ms, "tflops": flops / ms / 1e9, "rel_err": err})
            print(f"{shape:<18} {name:<18} {ms:8.4f} ms {flops / ms / 1e9:7.0f} TFLOP/s  err {err}", flush=True)

        wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        record("cublas-bf16", do_bench(lambda: x @ wb.T, warmup=25, rep=200, return_mode="median"))
        try:
            one = torch.ones((m, 1), device="cuda"), torch.ones((1, n), device="cuda")
            record("cublas-fp8-rowwise", do_bench(lambda: torch._scaled_mm(xq, w.T, one[0], one[1],
                                                                            out_dtype=torch.bfloat16),
                                                  warmup=25, rep=200, return_mode="median"))
        except Exception as e:  # noqa: BLE001
            print(f"{shape} cublas-fp8-rowwise: {e}".splitlines()[0])
        out = quant_matmul(x, w, ws, None, "fp8-block", True)
        record("deepfuse", do_bench(lambda: quant_matmul(x, w, ws, None, "fp8-block", True), warmup=25, rep=200,
                                    return_mode="median"), out)
        for name in args.variants.split(","):
            tma, bn, halves, scaled, warps, stages = VARIANTS[name]
            y = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)

            def run():
                _fp8_gemm[(triton.cdiv(m, 128) * triton.cdiv(n, bn),)](
                    xq, xs, w, ws, y, m, n, k, xs.stride(0), ws.stride(0), BLOCK_M=128, BLOCK_N=bn, BLOCK_K=128,
                    GROUP_M=8, TMA=tma, HALVES=halves, SCALED=scaled, num_warps=warps, num_stages=stages)
            try:
                run()
                torch.cuda.synchronize()
                record(name, do_bench(run, warmup=25, rep=200, return_mode="median"), y if scaled else None)
            except Exception as e:  # noqa: BLE001
                print(f"{shape} {name}: {type(e).__name__}: {e}".splitlines()[0][:300], flush=True)


if __name__ == "__main__":
    main()
