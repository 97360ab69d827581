"""The absorbed MLA decode step's launches at V2-Lite dims, timed per tile configuration (each replayed as a
CUDA graph, as decode steps run), beside the three launches' HBM floor. It chooses the defaults in
runtime/kernels/mla.py (DECODE_CONFIG and the split count); prints a table, writes JSON with --out. ``--fp8``:
over an FP8 latent (c_kv float8_e4m3fn with a scale per token, as ``LatentKVCache(fp8=True)`` stores it), the
tile, warp, stage and split sweep at every batch, with the tiles widened to bf16 and to fp16 (``FP8_AS_FP16``).
Over a bf16 latent: the tile and split sweep at one query, and at larger batches the default split count beside
the fill rule alone and 128 splits.

``--mask``: with an additive mask, as the bundled model's decode over its static cache passes one (HAS_MASK;
``--tail N`` more cache rows past the context, hidden by it), and the one-query sweep over loop stages too.

    python3 bench/mla_decode_tiles.py --out DIR [--batches 1,4,8,32] [--context 2048] [--fp8] [--sets 4]
        [--mask [--tail N]]
"""
import argparse
import itertools

import torch

from deepfuse.fusion import rel_err
from deepfuse.runtime import autotune
from deepfuse.runtime.kernels import mla
from deepfuse.runtime.latent_cache import bytes_per_token, dequantize_latent, quantize_latent

from sweep_out import Rows  # bench/, the scripts' own directory

H, DN, R, DV, C = 16, 128, 64, 128, 512


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--batches", default="1,4,8,32")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--bandwidth", type=float, default=4.3e12, help="bytes/s the floor is computed at")
    parser.add_argument("--fp8", action="store_true", help="an FP8 latent with per-token scales")
    parser.add_argument("--sets", type=int, default=4,
                        help="caches and weights rotated through (enough that they pass the L2 together)")
    parser.add_argument("--mask", action="store_true", help="an additive mask over the cache (the e2e decode's)")
    parser.add_argument("--tail", type=int, default=0, help="with --mask: cache rows past the context, masked")
    args = parser.parse_args()
    dev, dtype, t = "cuda", torch.bfloat16, args.context + (args.tail if args.mask else 0)
    name = "mla_decode_tiles" + ("_fp8" if args.fp8 else "") + ("_mask" if args.mask else "")
    rows = Rows(args.out, name)  # written as it grows
    for b in (int(x) for x in args.batches.split(",")):
        # Several caches and weights, rotated: one set would sit in L2 from the second replay on.
        sets = []
        for _ in range(args.sets):
            q = torch.randn(b, 1, H, DN + R, device=dev, dtype=dtype)
            latent = torch.randn(b, t, C + R, device=dev, dtype=dtype)
            w = torch.randn(H * (DN + DV), C, device=dev, dtype=dtype) / C ** 0.5
            c_kv, kv_scale = latent[..., :C], {}
            if args.fp8:
                c_kv, scale = quantize_latent(c_kv)
                kv_scale = {"kv_scale": scale}
            if args.mask:  # the static cache's rows past the context hidden, as the model's decode mask does
                mask = torch.zeros(b, 1, 1, t, device=dev)
                mask[..., args.context:] = float("-inf")
                kv_scale = {**kv_scale, "mask": mask}
            sets.append(((q[..., :DN], q[..., DN:], c_kv, latent[..., C:], w), kv_scale))
        (q_nope, q_pe, c_kv, k_pe, w), kv_scale = sets[0]
        token_bytes = bytes_per_token(c_kv, k_pe, kv_scale.get("kv_scale"))
        if args.fp8:
            c_kv = dequantize_latent(c_kv, kv_scale["kv_scale"].double(), torch.float64)
        ref = torch.cat([  # eight sequences at a time: batch 64's float64 keys at 32k would take 32 GiB at once
            mla.reference(*(x[i:i + 8].double() for x in (q_nope, q_pe, c_kv, k_pe)), w.double(), 0.1, True,
                          **({"mask": kv_scale["mask"][i:i + 8]} if args.mask else {}))
            for i in range(0, b, 8)])
        floor_us = (b * t * token_bytes + H * (DN + DV) * C * 2) / args.bandwidth * 1e6
        # The default, then tiles and split counts. A split count of None is mla.decode_splits's.
        if args.fp8:  # both widenings (to bf16, and to fp16: FP8_AS_FP16) at 64 and 128 splits
            configs = [None] + [
                {"BLOCK_H": 16, "BLOCK_T": bt, "num_warps": nw, "num_stages": st, "SPLITS": sp, "FP8_AS_FP16": as_fp16}
                for as_fp16, bt, nw, st, sp in itertools.product((False, True), (32, 64), (4, 8), (2, 3), (64, 128))
            ]
        elif b == 1 and args.mask:  # the split count and, since the loop's loads pipeline (f5cbaae), its stages
            configs = [None] + [
                {"BLOCK_H": 16, "BLOCK_T": bt, "num_warps": nw, "num_stages": st, "SPLITS": sp}
                for bt, nw, st, sp in itertools.product((32, 64), (4, 8), (3, 4), (None, 8, 16, 32))
            ]
        elif b == 1:  # the split count matters most at one query
            configs = [None] + [
                {"BLOCK_H": 16, "BLOCK_T": bt, "num_warps": nw, "num_stages": 2, "SPLITS": sp}
                for bt, nw, sp in itertools.product((32, 64), (4, 8), (None, 16, 32, 128))
            ]
        else:  # and beside the fill rule alone (the split count before decode_splits bounded a split's rows)
            fill = -(-2 * torch.cuda.get_device_properties(0).multi_processor_count // b)
            configs = [None] + [
                {"BLOCK_H": 16, "BLOCK_T": bt, "num_warps": nw, "num_stages": 2, "SPLITS": sp}
                for bt, nw, sp in itertools.product((32, 64), (4, 8), (None, min(64, fill), 128))
            ]
        for cfg in configs:
            def run():
                for s, kw in sets:
                    mla.mla_attention(*s, 0.1, True, path="absorbed", config=cfg, **kw)
            try:
                out = mla.mla_attention(*sets[0][0], 0.1, True, path="absorbed", config=cfg, **sets[0][1])
                err = rel_err(out, ref)
                us = autotune._time(run) * 1e3 / len(sets)
            except Exception as e:  # a tile the chip rejects
                print(f"b{b} {cfg}: {type(e).__name__}: {str(e)[:100]}")
                continue
            rows.append({"batch": b, "context": t, "fp8": args.fp8, "config": cfg or "default", "us": us,
                         "floor_us": floor_us, "rel_err": err})
            print(f"b{b:<3} {str(cfg or 'default'):<90} {us:7.2f} us  ({us / floor_us:4.2f}x floor)  err {err:.1e}",
                  flush=True)
        best = min((r for r in rows if r["batch"] == b), key=lambda r: r["us"])
        print(f"best b{b}: {best['config']} {best['us']:.2f} us, floor {floor_us:.2f} us")


if __name__ == "__main__":
    main()
