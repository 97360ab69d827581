"""Does warming the L2 from a latency-bound kernel make the next projection faster?

A decode step's latency-bound kernels (the MLA split merge, the routing, a norm) leave the HBM idle while the next
projection then ramps up on a few MB. Here a one-program kernel that only spins for a set time (`busy`, standing
for such a kernel) runs before cuBLAS's x @ W^T at one token, with and without asking the L2 for W
(cp.async.bulk.prefetch.L2) at its start, over copies of W past twice the L2 (each pair of launches finds W in
HBM, as a model's next layer does), replayed as a CUDA graph. Also: a launch that only prefetches, ahead of the
busy kernel or alone, and the matmul twice on one weight (the second from the L2: what a prefetch could gain at
most). Reports µs per (busy, matmul) pair; the gain is `busy+mm` less `busy(pf)+mm`.

    python3 bench/l2_prefetch.py --out DIR [--shapes 2048x2048,3072x2048] [--busy-us 3,8]

Measured on H100 (bench/RESULTS.md): no. A program that asks for 8 MB this way does not finish until the copy engine
of its SM has served it (33 µs, 0.25 TB/s), and cuBLAS's matmul after a separate prefetch launch was no faster.
Tried in deepfuse's decode launches (norms, router, MLA splits) and reverted: the decode step took 18x as long.
"""
import argparse

import torch

from deepfuse.codegen import KernelTemplate, generate
from deepfuse.runtime import autotune

from sweep_out import Rows  # bench/, the scripts' own directory

L2_PREFETCH = '''
@triton.jit
def l2_prefetch(Base, nbytes, program, programs, CHUNK: tl.constexpr, LANES: tl.constexpr):
    """Ask the L2 for bytes [0, nbytes) from Base (16-byte aligned, nbytes a multiple of 16): this program's share
    of the CHUNK-byte pieces (every programs-th group of LANES), one cp.async.bulk.prefetch.L2 each (sm_90+).
    Nothing waits for them and no register holds them: a hint, which changes no value. Returns 0, which the
    caller must fold into a store's mask (`& (token == 0)`): the instruction is declared pure, so that
    torch's analysis of which arguments a kernel writes passes over it, and a pure result nothing reads would be
    removed with the instruction."""
    base = Base.to(tl.pointer_type(tl.uint8))
    pieces = tl.cdiv(nbytes, CHUNK)
    token = 0
    for first in range(program * LANES, pieces, programs * LANES):
        piece = first + tl.arange(0, LANES)
        start = piece.to(tl.int64) * CHUNK
        inside = piece < pieces
        # a lane past the end asks for the first 16 bytes again rather than for nothing (a size of 0 is not valid)
        size = tl.where(inside, tl.minimum(nbytes - start, CHUNK), 16).to(tl.int32)
        done = tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0;", "=r,l,r",
                                         [base + tl.where(inside, start, 0), size], dtype=tl.int32, is_pure=True,
                                         pack=1)
        token += tl.sum(done, axis=0)
    return token

'''

# Bytes per prefetch instruction of the separate prefetch launch.
CHUNK = 16384

TEMPLATE = KernelTemplate("l2_prefetch_bench", '''
import triton.language as tl

${l2_prefetch}

@triton.jit
def busy_kernel(Base, nbytes, Out, iters, PREFETCH: tl.constexpr, CHUNK: tl.constexpr, LANES: tl.constexpr):
    """A latency-bound kernel's stand-in: one program, a chain of dependent multiply-adds; with PREFETCH it first
    asks the L2 for [Base, Base + nbytes)."""
    token = 0
    if PREFETCH:
        token = l2_prefetch(Base, nbytes, 0, 1, CHUNK, LANES)
    acc = tl.zeros([128], dtype=tl.float32) + tl.program_id(0)
    for _ in range(iters):
        acc = acc * 0.9990234375 + 1.0
    tl.store(Out + tl.arange(0, 128), acc, mask=token == 0)


@triton.jit
def l2_prefetch_kernel(Base, nbytes, Token, CHUNK: tl.constexpr, LANES: tl.constexpr):
    """A launch that only asks the L2 for [Base, Base + nbytes): its programs share the pieces. Token: an int32
    written by no program (l2_prefetch's token is always 0)."""
    token = l2_prefetch(Base, nbytes, tl.program_id(0), tl.num_programs(0), CHUNK, LANES)
    tl.store(Token, token, mask=token != 0)
''')


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--shapes", default="2048x2048,3072x2048")  # N x K: o_proj, q_proj
    parser.add_argument("--busy-us", default="3,8")
    parser.add_argument("--chunks", default="4096,16384,65536")
    args = parser.parse_args()
    dev = torch.device("cuda")
    gen = generate(TEMPLATE, {}, {"l2_prefetch": L2_PREFETCH}, "bench/l2_prefetch.py")
    busy, only = gen.function("busy_kernel"), gen.function("l2_prefetch_kernel")
    sink = torch.empty(128, device=dev)
    token = torch.empty(1, device=dev, dtype=torch.int32)
    rows = Rows(args.out, "l2_prefetch")

    def spin(w, iters, chunk=0):
        busy[(1,)](w, w.numel() * w.element_size(), sink, iters, PREFETCH=chunk > 0, CHUNK=max(chunk, 16), LANES=128,
                   num_warps=4)

    # iterations per µs of the busy kernel alone
    probe = torch.empty(16, device=dev)
    ms = autotune._time(lambda: spin(probe, 20000))
    per_us = 20000 / (ms * 1e3)
    print(f"busy kernel: {per_us:.0f} iterations a µs", flush=True)
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        copies = autotune.cold_clones(torch.randn(n, k, device=dev, dtype=torch.bfloat16), 16)
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        nbytes = n * k * 2

        def record(what, body):
            us = autotune._time(lambda: [body(w) for w in copies]) * 1e3 / len(copies)
            rows.append({"shape": shape, "what": what, "us": us, "copies": len(copies)})
            print(f"{shape:<10} {what:<44} {us:7.2f} us", flush=True)

        record("mm", lambda w: x @ w.T)
        # the same weight twice in a row: the second read finds it in the L2 (the gain a prefetch could give at most)
        record("mm, then mm again (L2-hot)", lambda w: (x @ w.T, x @ w.T))
        record("prefetch launch + mm", lambda w: (only[(8,)](w, nbytes, token, CHUNK=CHUNK, LANES=32,
                                                              num_warps=1), x @ w.T))
        for busy_us in (float(v) for v in args.busy_us.split(",")):
            iters = max(1, int(busy_us * per_us))
            record(f"busy {busy_us:g}", lambda w: spin(w, iters))
            record(f"busy {busy_us:g} + mm", lambda w: (spin(w, iters), x @ w.T))
            for chunk in (int(v) for v in args.chunks.split(",")):
                record(f"busy {busy_us:g} (prefetch, {chunk} B pieces)", lambda w: spin(w, iters, chunk))
                record(f"busy {busy_us:g} (prefetch, {chunk} B pieces) + mm", lambda w: (spin(w, iters, chunk),
                                                                                        x @ w.T))
            record(f"prefetch launch + busy {busy_us:g} + mm",
                   lambda w: (only[(8,)](w, nbytes, token, CHUNK=CHUNK, LANES=32, num_warps=1), spin(w, iters),
                              x @ w.T))


if __name__ == "__main__":
    main()
