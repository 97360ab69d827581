"""The routed experts' kernels at V2-Lite's MoE shape in their three weight formats: bf16, FP8 weights widened
in registers (W8A16, "fp8-block-weight") and FP8 weights with activations quantized per row and 128-wide tile
(W8A8, "fp8-block"; the PREQUANT candidates quantize x in a pre-kernel and the intermediate in the gate/up
epilogue), every tile candidate of each replayed as a CUDA graph over several routings back to back
(what ``moe.tune`` times at compile time). Prints each candidate and the best per format; writes JSON with --out.
It backs ``FP8_CANDIDATES`` in runtime/kernels/moe.py and the FP8 MoE rows of bench/RESULTS.md. At one token
each tile is also timed with the align launch the kernels skip there (``"DIRECT": False``); up to
``FUSED_MAX_TOKENS`` the bf16 candidates include the one-launch ``FUSED_CANDIDATES``.
``--grid prefill`` times, instead of the candidate lists, a product of the prefill-sized bf16 tiles (row
blocks of 64 and 128, N and K tiles, warps and stages that fit in shared memory); ``--split`` adds each
kernel's own time (gate/up and down, from the profiler) to every row, so the two kernels' best tiles can be
told apart.

    python3 bench/moe_fp8.py --out DIR [--tokens 1,8,64,512,4096] [--experts 64] [--top-k 6] [--formats 'bf16,fp8 W8A16,fp8 W8A8']
    python3 bench/moe_fp8.py --out DIR --tokens 2048 --formats bf16 --grid prefill --split
    python3 bench/moe_fp8.py --out DIR --tokens 4096 --formats "fp8 W8A8" --only PREQUANT --split
"""
import argparse
import itertools

import torch

from deepfuse.runtime import autotune
from deepfuse.runtime.kernels import moe

from sweep_out import Rows  # bench/, the scripts' own directory


SMEM_BYTES = 227 * 1024  # an H100's / H200's shared memory per block


def prefill_grid() -> list:
    """bf16 tiles for hundreds of rows per expert that fit in shared memory (the gate/up kernel holds an A
    tile and two B tiles per stage); 128-wide ones also with a 256-wide down tile."""
    grid = []
    for bm, bn, bk, (w, st) in itertools.product((64, 128), (64, 128), (32, 64, 128), ((4, 3), (4, 4), (8, 3), (8, 4))):
        if st * (bm * bk + 2 * bn * bk) * 2 > SMEM_BYTES or (bm == 64 and w == 8 and bn == 64):
            continue
        cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": w, "num_stages": st}
        grid.append(cfg)
        if bn == 128 and bk == 64:
            grid.append({**cfg, "BLOCK_N_DOWN": 256})
    return grid


def kernel_times(run, runs: int = 5) -> dict:
    """Microseconds per call of each MoE kernel in ``run()``, from the profiler (eager launches)."""
    run()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            run()
        torch.cuda.synchronize()
    names = {"moe_gate_up_act_kernel": "gate_up", "moe_down_weighted_kernel": "down",
             "moe_experts_fused_kernel": "fused"}
    times = {}
    for evt in prof.key_averages():
        if evt.key in names:
            total = getattr(evt, "device_time_total", None)
            times[names[evt.key]] = (total if total is not None else evt.cuda_time_total) / runs
    return times


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--tokens", default="1,8,64,512,4096")
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=1408)
    parser.add_argument("--formats", default="bf16,fp8 W8A16,fp8 W8A8")
    parser.add_argument("--grid", choices=("candidates", "prefill"), default="candidates")
    parser.add_argument("--split", action="store_true", help="each kernel's own time too (profiler)")
    parser.add_argument("--only", default=None,
                        help="only the candidates holding this key (PREQUANT, SWAP_AB, SPLIT_N, ...)")
    args = parser.parse_args()
    e, k, h, inter = args.experts, args.top_k, args.hidden, args.intermediate
    dev = torch.device("cuda")
    w1 = torch.randn(e, 2 * inter, h, device=dev, dtype=torch.bfloat16) / h**0.5
    w2 = torch.randn(e, h, inter, device=dev, dtype=torch.bfloat16) / inter**0.5
    (q1, s1), (q2, s2) = moe.quantize_experts(w1), moe.quantize_experts(w2)
    formats = {"bf16": (w1, w2, None, False, moe.CANDIDATES),
               "fp8 W8A16": (q1, q2, (s1, s2), False, [c for c in moe.FP8_CANDIDATES if not c.get("PREQUANT")]),
               "fp8 W8A8": (q1, q2, (s1, s2), True, moe.FP8_CANDIDATES)}
    formats = {name: formats[name] for name in args.formats.split(",")}
    if args.grid == "prefill":
        if set(formats) != {"bf16"}:
            raise SystemExit("--grid prefill is a bf16 grid: pass --formats bf16")
        formats["bf16"] = (w1, w2, None, False, prefill_grid())
    rows = Rows(args.out, "moe_fp8")  # written as it grows
    for t in (int(v) for v in args.tokens.split(",")):
        x = torch.randn(t, h, device=dev, dtype=torch.bfloat16)
        routings = [torch.rand(t, e, device=dev).argsort(dim=-1)[:, :k] for _ in range(max(1, min(8, e // (t * k))))]
        weights = torch.rand(t, k, device=dev)
        want = moe.moe_experts(x, routings[0], weights, w1, w2).float()
        for name, (a, b, scales, act_quant, candidates) in formats.items():
            if name == "bf16" and args.grid == "candidates" and t <= moe.FUSED_MAX_TOKENS:
                candidates = candidates + moe.FUSED_CANDIDATES  # both projections in one launch, as tune times them
            if args.only:
                candidates = [c for c in candidates if c.get(args.only)]
            if t == 1:  # one token runs without align; each tile also aligned, to see what that saves
                candidates = candidates + [{**c, "DIRECT": False} for c in candidates]
            for cfg in candidates:
                def run(cfg=cfg):
                    for ids in routings:
                        moe.moe_experts(x, ids, weights, a, b, config=cfg, weight_scales=scales, act_quant=act_quant)
                try:
                    us = autotune._time(run) * 1e3 / len(routings)
                except Exception as err:  # a tile the hardware rejects
                    print(f"T={t:<5} {name:<10} {cfg} failed: {type(err).__name__}")
                    continue
                got = moe.moe_experts(x, routings[0], weights, a, b, config=cfg, weight_scales=scales,
                                      act_quant=act_quant).float()
                err = ((got - want).norm() / want.norm()).item()
                row = {"tokens": t, "format": name, "config": cfg, "us": us, "rel_err_vs_bf16": err}
                if args.split:
                    row.update(kernel_times(run))
                rows.append(row)
                split = "".join(f"  {key} {row[key]:8.2f}" for key in ("gate_up", "down", "fused") if key in row)
                print(f"T={t:<5} {name:<10} {us:9.2f} us{split}  err {err:.3e}  {cfg}", flush=True)
        for name in formats:
            mine = [r for r in rows if r["tokens"] == t and r["format"] == name]
            if mine:
                best = min(mine, key=lambda r: r["us"])
                print(f"best T={t} {name}: {best['us']:.2f} us {best['config']}", flush=True)
                for key in ("gate_up", "down", "fused"):
                    timed = [r for r in mine if key in r]
                    if timed:
                        best = min(timed, key=lambda r: r[key])
                        print(f"best T={t} {name} {key} alone: {best[key]:.2f} us {best['config']}", flush=True)
            aligned = [r for r in mine if r["config"].get("DIRECT") is False]
            if aligned:
                best = min(aligned, key=lambda r: r["us"])
                print(f"best T={t} {name}, aligned: {best['us']:.2f} us {best['config']}", flush=True)


if __name__ == "__main__":
    main()
