"""The FP8 block-scaled GEMM at decode sizes (activations quantized in the K loop, as the quant pass runs them up to
``quant.DECODE_MAX_M`` tokens): every candidate tile of that mode, the operand-swapped ones (``"SWAP": True``,
``quant._SWAP_KERNEL``: weight rows on the FP8 MMA's M side) among them, on V2-Lite's projection shapes, each
replayed as a CUDA graph over weight copies past twice the L2 (what the compile-time timing does), beside cuBLAS
bf16 over the same copies. Reports µs per call and the weight bytes' rate; writes JSON with --out.

    python3 bench/fp8_decode_tiles.py --out DIR [--tokens 1,16] [--shapes 21888x2048,...]
"""
import argparse

import torch

from deepfuse.fusion import rel_err
from deepfuse.runtime import autotune
from deepfuse.runtime.kernels import quant

from sweep_out import Rows  # bench/, the scripts' own directory

SHAPES = "3072x2048,576x2048,4096x512,2048x2048,21888x2048,2048x10944"  # N x K: q, kv_a, kv_b, o, MLP gate+up, down


def name(cfg: dict) -> str:
    return (f"{'swap' if cfg.get('SWAP') else 'tile'} {cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']}"
            f" w{cfg['num_warps']} s{cfg['num_stages']}" + (f" split{cfg['SPLIT_K']}" if cfg.get("SPLIT_K") else ""))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--tokens", default="1,16")
    parser.add_argument("--shapes", default=SHAPES)
    args = parser.parse_args()
    dev = torch.device("cuda")
    rows = Rows(args.out, "fp8_decode_tiles")
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        w = torch.randn(n, k, device=dev) / k ** 0.5
        wq, scale = quant.quantize_weight(w, "fp8-block")
        copies = autotune.cold_clones(wq, quant.TUNE_WEIGHT_COPIES)
        dense = autotune.cold_clones(w.to(torch.bfloat16), quant.TUNE_WEIGHT_COPIES)
        for m in (int(v) for v in args.tokens.split(",")):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            ref = quant.reference(x.double(), wq, scale, None, "fp8-block", True, compute=torch.float64)

            def record(impl, run, count, nbytes, out=None):
                us = autotune._time(run) * 1e3 / count
                err = None if out is None else rel_err(out, ref)
                rows.append({"shape": shape, "tokens": m, "impl": impl, "us": us, "tb_s": nbytes / us / 1e6,
                             "rel_err": err})
                print(f"{shape:<11} M={m:<3} {impl:<32} {us:8.2f} us {nbytes / us / 1e6:6.2f} TB/s"
                      + ("" if err is None else f"  err {err:.1e}"), flush=True)

            record("cublas bf16", lambda: [x @ d.T for d in dense], len(dense), n * k * 2)
            configs = quant._configs(m, k, "fp8-block", True, quant.DEFAULT_BLOCK, "quantize", dev)
            for cfg in configs:
                def run(cfg=cfg):
                    for c in copies:
                        quant.quant_matmul(x, c, scale, None, "fp8-block", True, prequantize=False, config=cfg)
                try:
                    out = quant.quant_matmul(x, wq, scale, None, "fp8-block", True, prequantize=False, config=cfg)
                    record(name(cfg), run, len(copies), n * k, out)
                except Exception as e:  # a tile the hardware rejects
                    print(f"{shape:<11} M={m:<3} {name(cfg):<32} failed: {type(e).__name__}: "
                          f"{str(e).splitlines()[0][:160]}", flush=True)


if __name__ == "__main__":
    main()
