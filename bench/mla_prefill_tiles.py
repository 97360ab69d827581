"""The expanded (prefill) MLA path at V2-Lite dims, causal, batch 1, timed per tile configuration, beside
PyTorch's scaled_dot_product_attention over the same expanded keys and values (the kv_b_proj expansion is in
both times). It chooses PREFILL_CONFIG in runtime/kernels/mla.py; prints a table, writes JSON with --out.
``--mask-input`` adds, at the default tile, the same causal attention given as an additive [T, T] mask the
kernel reads (what a layer compiled on its own receives from the model around it) instead of the causal flag.
``--tma`` times every tile twice: pointer-fed and with its key and value tiles through tensor descriptors
(``"TMA": True``); ``--tiles`` limits the sweep to some tiles, BLOCK_M x BLOCK_N x warps x stages.

    python3 bench/mla_prefill_tiles.py --out DIR [--tokens 1024,4096] [--mask-input] [--tma] [--tiles 64x64x4x2,...]
"""
import argparse
import itertools

import torch
import torch.nn.functional as F

from deepfuse.fusion import rel_err
from deepfuse.runtime import autotune
from deepfuse.runtime.kernels import mla

from sweep_out import Rows  # bench/, the scripts' own directory

H, DN, R, DV, C = 16, 128, 64, 128, 512


def _sdpa(q_nope, q_pe, c_kv, k_pe, w, scale):
    """The same attention as PyTorch runs it: k and v expanded, the rope key broadcast to every head."""
    b, t = c_kv.shape[:2]
    kv = (c_kv @ w.t()).view(b, t, H, DN + DV)
    k = torch.cat([kv[..., :DN], k_pe[:, :, None, :].expand(b, t, H, R)], dim=-1)
    q = torch.cat([q_nope, q_pe], dim=-1)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), kv[..., DN:].transpose(1, 2),
                                       is_causal=True, scale=scale)
    return o.transpose(1, 2)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--tokens", default="1024,4096")
    parser.add_argument("--tflops", type=float, default=680.0, help="bf16 rate the floor is computed at")
    parser.add_argument("--mask-input", action="store_true", help="also the causal mask as a read input")
    parser.add_argument("--tma", action="store_true", help="each tile also with descriptor-fed key and value tiles")
    parser.add_argument("--tiles", default=None, help="BLOCK_M x BLOCK_N x warps x stages, comma-separated")
    args = parser.parse_args()
    tiles = ([tuple(int(v) for v in tile.split("x")) for tile in args.tiles.split(",")] if args.tiles
             else list(itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3))))
    dev, dtype, scale = "cuda", torch.bfloat16, (DN + R) ** -0.5
    rows = Rows(args.out, "mla_prefill_tiles")  # written as it grows
    for t in (int(x) for x in args.tokens.split(",")):
        sets = []
        for _ in range(3):
            q = torch.randn(1, t, H, DN + R, device=dev, dtype=dtype)
            latent = torch.randn(1, t, C + R, device=dev, dtype=dtype)
            w = torch.randn(H * (DN + DV), C, device=dev, dtype=dtype) / C ** 0.5
            sets.append((q[..., :DN], q[..., DN:], latent[..., :C], latent[..., C:], w))
        ref = mla.reference(*(x.double() for x in sets[0]), scale, True)
        flops = mla.flops(1, t, t, H, DN, R, DV, causal=True) + 2 * t * C * H * (DN + DV)
        floor_us = flops / (args.tflops * 1e12) * 1e6
        keys = torch.arange(t, device=dev)
        causal_mask = torch.zeros(t, t, device=dev).masked_fill(keys[None, :] > keys[:, None], float("-inf"))
        configs = [None, "sdpa"] + (["mask input"] if args.mask_input else []) + [
            {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": nw, "num_stages": st, **({"TMA": True} if tma else {})}
            for (bm, bn, nw, st), tma in itertools.product(tiles, (False, True) if args.tma else (False,))
        ]
        for cfg in configs:
            def one(s):
                if cfg == "sdpa":
                    return _sdpa(*s, scale)
                if cfg == "mask input":
                    return mla.mla_attention(*s, scale, False, causal_mask, path="expanded")
                return mla.mla_attention(*s, scale, True, path="expanded", config=cfg)

            def run():
                for s in sets:
                    one(s)
            try:
                out = one(sets[0])
                err = rel_err(out, ref)
                us = autotune._time(run) * 1e3 / len(sets)
            except Exception as e:  # a tile the chip rejects (shared memory, registers)
                print(f"T={t} {cfg}: {type(e).__name__}: {str(e)[:100]}")
                continue
            name = cfg if isinstance(cfg, str) else (cfg or "default")
            rows.append({"tokens": t, "config": name, "us": us, "floor_us": floor_us, "rel_err": err})
            print(f"T={t:<5} {str(name):<70} {us:8.1f} us  ({us / floor_us:4.2f}x floor)  err {err:.1e}",
                  flush=True)
        best = min((r for r in rows if r["tokens"] == t and r["config"] not in ("sdpa", "mask input")),
                   key=lambda r: r["us"])
        print(f"best T={t}: {best['config']} {best['us']:.1f} us, floor {floor_us:.1f} us")


if __name__ == "__main__":
    main()
