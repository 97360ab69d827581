"""Would one launch over the projections that read the same hidden state pay at decode sizes? The attention's
first projections of a decode step (V2-Lite: q_proj 2048 -> 3072 and kv_a_proj_with_mqa 2048 -> 576; V3:
q_a_proj 7168 -> 1536 and kv_a_proj_with_mqa 7168 -> 576) each timed alone with cuBLAS, both back to back,
and once as one matmul over the two weights stacked (the bound a horizontal fusion could reach with cuBLAS's
kernels), plus deepfuse's decode_linear kernel per projection and its linear_group kernel (one launch over both
weights where they lie, each tile; and over the first weight alone, against cuBLAS's), and both projections as FP8 W8A8 layers (``quant_matmul`` each, and one FP8
linear_group launch). Each form replayed as a CUDA graph over weight copies past twice the L2
(as the linear pass's compile-time timing does). Prints a table, writes JSON with --out. The 63415ab batch-1
profile had the three attention projections at 5.83, 5.83 and 5.65 us per layer although kv_a_proj reads only
2.4 MB (bench/RESULTS.md).

    python3 bench/decode_projections.py --out DIR [--tokens 1,4,16] [--bandwidth 4.3e12]
"""
import argparse

import torch

from deepfuse.runtime import autotune
from deepfuse.runtime.kernels import linear_group, quant

from sweep_out import Rows  # bench/, the scripts' own directory

PAIRS = {  # model: (hidden, first projection's outputs, second's)
    "v2-lite": (2048, 3072, 576),
    "v3": (7168, 1536, 576),
    "o_proj": (2048, 2048, 2048),  # V2-Lite's o_proj, alone (the "first alone" rows), and two of them
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--tokens", default="1,4,16")
    parser.add_argument("--bandwidth", type=float, default=4.3e12, help="bytes/s the floor is computed at")
    args = parser.parse_args()
    device, dtype, bandwidth = torch.device("cuda"), torch.bfloat16, args.bandwidth
    rows = Rows(args.out, "decode_projections")  # written as it grows
    for model, (k, n1, n2) in PAIRS.items():
        stacked = autotune.cold_copies(torch.empty(n1 + n2, k, dtype=dtype), device, cap=64)
        firsts, seconds = [w[:n1] for w in stacked], [w[n1:] for w in stacked]  # the same bytes, two weights
        for t in (int(v) for v in args.tokens.split(",")):
            x = torch.randn(t, k, device=device, dtype=dtype)
            forms = {
                "cublas, first alone": lambda: [torch.mm(x, w.t()) for w in firsts],
                "cublas, second alone": lambda: [torch.mm(x, w.t()) for w in seconds],
                "cublas, both": lambda: [(torch.mm(x, a.t()), torch.mm(x, b.t())) for a, b in zip(firsts, seconds)],
                "cublas, stacked (one launch)": lambda: [torch.mm(x, w.t()) for w in stacked],
                "decode_linear, both": lambda: [(quant.decode_linear(x, a), quant.decode_linear(x, b))
                                                for a, b in zip(firsts, seconds)],
            }
            for cfg in linear_group.CONFIGS:  # one launch over both weights where they lie, and over the first alone
                tile = f"{cfg['BLOCK_N']}/{cfg['BLOCK_K']}/{cfg['num_warps']}w{cfg['num_stages']}s"
                forms[f"linear_group {tile}"] = (
                    lambda cfg=cfg: [linear_group.linear_group(x, [a, b], config=cfg) for a, b in zip(firsts, seconds)])
                forms[f"linear_group {tile}, first alone"] = (
                    lambda cfg=cfg: [linear_group.linear_group(x, [a], config=cfg) for a in firsts])
            # The same projections as FP8 W8A8 layers (128 x 128 blocks): quant_matmul per projection, then one
            # linear_group launch over both FP8 weights.
            fp8 = [[quant.quantize_weight(w, "fp8-block") for w in (a, b)] for a, b in zip(firsts, seconds)]
            forms["fp8 quant_matmul, both"] = lambda: [
                [quant.quant_matmul(x, q, sc, None, "fp8-block", True) for q, sc in pair] for pair in fp8]
            for cfg in linear_group.FP8_CONFIGS:
                forms[f"fp8 linear_group {cfg['BLOCK_N']}/{cfg['num_warps']}w{cfg['num_stages']}s"] = (
                    lambda cfg=cfg: [linear_group.linear_group(x, [q for q, _ in pair], config=cfg,
                                                               weight_scales=[sc for _, sc in pair]) for pair in fp8])
            floor_us = (n1 + n2) * k * 2 / bandwidth * 1e6
            for form, fn in forms.items():
                us = autotune._time(fn) * 1e3 / len(stacked)
                rows.append({"model": model, "tokens": t, "form": form, "us": us, "floor_both_us": floor_us})
                print(f"{model:<8} T={t:<3} {form:<30} {us:7.2f} us  (both weights' floor {floor_us:.2f} us)",
                      flush=True)


if __name__ == "__main__":
    main()
