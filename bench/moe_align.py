"""The MoE align step (slots sorted by expert into padded segments) at V2-Lite's routing, per tiling of the fused
kernel, of the parallel one and in its torch form, each replayed as a CUDA graph. It chooses ``ALIGN_TILING``,
``ALIGN_PARALLEL_TILING`` (with ``ALIGN_CHUNK_SLOTS``) and ``ALIGN_FUSED_MAX_SLOTS`` in runtime/kernels/moe.py;
prints a table, writes JSON with --out.

    python3 bench/moe_align.py --out DIR [--tokens 1,8,32,64,128] [--experts 64] [--top-k 6] [--shared 2]
                               [--torch-only] [--parallel-only]

The torch form is timed with its sort on the narrowest key (the default) and on int64 ids ("torch, int64 key");
the parallel form (``align_parallel``: two launches, a program per chunk of slots) at its default tiling and a few
others (``--parallel-only``: those and the torch form, not the single-program kernel's 32 tilings).
"""
import argparse
import itertools

import torch

from deepfuse.runtime import autotune
from deepfuse.runtime.kernels import moe

from sweep_out import Rows  # bench/, the scripts' own directory


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--tokens", default="1,8,32,64,128")
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=6)
    parser.add_argument("--shared", type=int, default=2)
    parser.add_argument("--torch-only", action="store_true", help="the torch form alone (prefill sizes)")
    parser.add_argument("--parallel-only", action="store_true", help="the torch and parallel forms")
    args = parser.parse_args()
    e, k, shared = args.experts, args.top_k, args.shared
    rows = Rows(args.out, "moe_align")  # written as it grows
    for t in (int(x) for x in args.tokens.split(",")):
        ids = torch.stack([torch.randperm(e, device="cuda")[:k] for _ in range(t)])
        bm = moe.config_for(t * (k + shared), e + shared)["BLOCK_M"]
        every = torch.cat([ids, torch.arange(e, e + shared, device="cuda").expand(t, shared)], dim=1)
        want = moe.align(every, e + shared, bm)
        tilings = [None] + [{"SLOT_CHUNK": sc, "CHUNK": c, "num_warps": w}
                            for sc, c, w in itertools.product((16, 32, 64, 128), (32, 128), (1, 2, 4, 8))]
        candidates = [("torch", lambda: moe.align(every, e + shared, bm)),
                      ("torch, int64 key", lambda: moe.align(every, e + shared, bm, sort_key=torch.int64))]
        candidates += [] if args.torch_only or args.parallel_only else [
            (str(tl or "default"), lambda tl=tl: moe.align_fused(ids, e + shared, bm, shared=shared, tiling=tl))
            for tl in tilings]
        parallel = [None] + [{"CHUNK_SLOTS": cs, "SLOT_CHUNK": sc, "num_warps": w}
                             for cs, sc, w in itertools.product((128, 256, 512), (32, 64), (2, 4))]
        candidates += [] if args.torch_only else [
            (f"parallel {tl or 'default'}", lambda tl=tl: moe.align_parallel(ids, e + shared, bm, shared=shared,
                                                                             tiling=tl))
            for tl in parallel]
        for name, fn in candidates:
            got = fn()
            same = all(torch.equal(a, b) for a, b in zip(got, want))
            us = autotune._time(fn) * 1e3
            rows.append({"tokens": t, "block_m": bm, "form": name, "us": us, "same_as_torch": same})
            print(f"T={t:<4} bm={bm:<3} {name:<55} {us:7.2f} us  {'ok' if same else 'DIFFERS'}", flush=True)
        best = min((r for r in rows if r["tokens"] == t), key=lambda r: r["us"])
        print(f"best T={t}: {best['form']} {best['us']:.2f} us")


if __name__ == "__main__":
    main()
