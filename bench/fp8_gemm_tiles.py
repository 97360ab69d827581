"""The prequantized block-scaled FP8 GEMM's candidate tiles, each timed alone: pointer-fed (the quant kernel's K
loop) and descriptor-fed (Hopper's tensor-memory copies, ``_TMA_KERNEL``), beside cuBLAS.

    python bench/fp8_gemm_tiles.py --out DIR [--shapes 8192x8192x8192,4096x21888x2048,...]

Per shape M x N x K, on the same inputs (activations with outliers, a weight quantized in 128 x 128 blocks):
- cuBLAS bf16 ``torch.mm`` over the float weight, and cuBLAS row-wise FP8 ``torch._scaled_mm`` (one scale per row
  and per column, activations already quantized: its time has no quantization in it); cuBLAS block-scaled FP8
  (``F.scaled_mm`` with 1 x 128 and 128 x 128 scales: the same math as the quant kernels, checked against the same
  reference) where torch has it, timed the same way;
- ``act_quant``: the activation pre-kernel alone;
- every candidate of ``quant.configs_for(M, tma=True)`` through ``quant_matmul(..., prequantize=True,
  config=...)``: the pre-kernel and the GEMM, each checked against float64 math on the dequantized operands
  (with DEEPFUSE_FP8_RESCALE=1 the opt-in RESCALE tiles among them);
- ``autotuned``: what ``quant_matmul`` picks (what the quant pass runs), the descriptor-fed tiles among its
  candidates on Hopper (unless DEEPFUSE_FP8_TMA=0);
- ``gemm alone``: each descriptor-fed tile without the pre-kernel (its output made once beforehand), as cuBLAS's
  row-wise FP8 is timed.
Median ms of do_bench over one input set (at these sizes every operand is larger than L2 or reused within one
call); TFLOP/s = 2MNK / time. Writes fp8_gemm_tiles.json to --out, a row at a time.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from sweep_out import Rows  # noqa: E402


def tile_name(cfg: dict) -> str:
    feed = "tma" if cfg.get("TMA") else "ptr"
    forms = "".join(f" {f.lower()}" for f in ("RESCALE", "M_HALVES") if cfg.get(f))
    return f"{feed} {cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} w{cfg['num_warps']} s{cfg['num_stages']}{forms}"


def cublas_block_scaled(x, wq, scale, quant):
    """cuBLAS's block-scaled FP8 GEMM (``torch.nn.functional.scaled_mm``: 1 x 128 activation tiles, 128 x 128 weight
    blocks, DeepSeek-V3's recipe) over activations quantized once, as the row-wise row is timed: a callable, or why
    this torch or GPU has none."""
    try:
        from torch.nn.functional import ScalingType, scaled_mm
    except ImportError as e:
        return f"torch {torch.__version__} has no block-scaled scaled_mm ({e})"
    xq, xs = quant.prequantize_activations(x)
    xs = xs.t().contiguous().t()  # [M, K/128] with M fastest, as cuBLAS reads 1 x 128 scales

    def call():
        return scaled_mm(xq, wq.t(), xs, ScalingType.BlockWise1x128, scale, ScalingType.BlockWise128x128,
                         output_dtype=torch.bfloat16)

    try:
        call()
    except Exception as e:  # noqa: BLE001  (not on this GPU, or not these layouts)
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return call


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None)
    parser.add_argument("--shapes",
                        default="8192x8192x8192,4096x21888x2048,4096x3072x2048,4096x2048x2048,128x3072x2048")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/fp8_gemm_tiles.py measures the GPU: it needs CUDA")
    from triton.testing import do_bench

    from deepfuse.fusion import rel_err
    from deepfuse.runtime.kernels import quant

    rows = Rows(args.out, "fp8_gemm_tiles")
    bench = lambda fn: do_bench(fn, warmup=25, rep=200, return_mode="median")  # noqa: E731
    for shape in args.shapes.split(","):
        m, n, k = (int(v) for v in shape.split("x"))
        flops = 2 * m * n * k
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        x.view(-1)[torch.randint(0, x.numel(), (m * k // 300 + 1,), device="cuda")] *= 100
        w = torch.randn(n, k, device="cuda") / k ** 0.5
        wq, scale = quant.quantize_weight(w, "fp8-block")
        ref = quant.reference(x.double(), wq, scale, None, "fp8-block", True, compute=torch.float64)

        def record(name, ms, out=None):
            err = None if out is None else rel_err(out, ref)
            rows.append({"shape": shape, "impl": name, "ms": ms, "tflops": flops / ms / 1e9, "rel_err": err})
            print(f"{shape:<16} {name:<28} {ms:8.4f} ms {flops / ms / 1e9:7.0f} TFLOP/s"
                  + ("" if err is None else f"  err {err:.1e}"), flush=True)

        wb = w.to(torch.bfloat16)
        record("cublas bf16", bench(lambda: x @ wb.T))
        s_x, s_w = x.float().abs().amax(1, keepdim=True) / 448, w.abs().amax(1, keepdim=True) / 448
        xq_row, wq_row = (x.float() / s_x).to(torch.float8_e4m3fn), (w / s_w).to(torch.float8_e4m3fn)
        record("cublas fp8 row-wise", bench(lambda: torch._scaled_mm(xq_row, wq_row.T, scale_a=s_x, scale_b=s_w.T,
                                                                     out_dtype=torch.bfloat16)))
        record("act_quant", bench(lambda: quant.prequantize_activations(x)))
        block_scaled = cublas_block_scaled(x, wq, scale, quant)
        if isinstance(block_scaled, str):
            print(f"{shape:<16} {'cublas fp8 block-scaled':<28} not run: {block_scaled}", flush=True)
        else:  # (the same numbers as the quant kernels: error against the same float64 reference)
            record("cublas fp8 block-scaled", bench(block_scaled), block_scaled())
        for cfg in quant.configs_for(m, tma=True):
            call = lambda: quant.quant_matmul(x, wq, scale, None, "fp8-block", True, prequantize=True,  # noqa: E731
                                              config=cfg)
            try:
                out = call()
                record(tile_name(cfg), bench(call), out)
            except Exception as e:  # a tile the hardware rejects (shared memory, say)
                print(f"{shape:<16} {tile_name(cfg):<28} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        call = lambda: quant.quant_matmul(x, wq, scale, None, "fp8-block", True)  # noqa: E731
        out = call()
        record("autotuned", bench(call), out)
        # The GEMM alone, as cuBLAS's row-wise row above is timed: the pre-kernel's output made once and handed to
        # every call (quant_matmul's own pre-kernel step replaced by it for these rows only).
        pre = quant.prequantize_activations(x)
        real = quant.prequantize_activations
        quant.prequantize_activations = lambda *a, **kw: pre
        try:
            for cfg in quant.configs_for(m, tma=True):
                if not cfg.get("TMA"):
                    continue
                call = lambda: quant.quant_matmul(x, wq, scale, None, "fp8-block", True,  # noqa: E731
                                                  prequantize=True, config=cfg)
                record("gemm alone " + tile_name(cfg), bench(call), call())
        finally:
            quant.prequantize_activations = real


if __name__ == "__main__":
    main()
