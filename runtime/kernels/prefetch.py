"""Warming the L2 with a weight a later kernel of the step will read.

At decode sizes many kernels of a step are latency-bound and leave the HBM idle (an MLA split merge, a routing
kernel, a norm: one to 65 programs), while the next projection's kernel spends a good part of its time ramping
up to full bandwidth on a few MB (cuBLAS's o_proj at one token: 5.9 us for 8 MB on H100, 1.4 TB/s). A
latency-bound kernel can ask the memory system for those bytes while it runs: Hopper's
``cp.async.bulk.prefetch.L2`` takes an address and a byte count, holds no register and is waited for by no one,
so a handful of instructions in one thread move megabytes into the L2 (50 MB on H100) behind the kernel's own
work. Whether the kernel that then reads them gains is what bench/l2_prefetch.py measures.

``L2_PREFETCH_SOURCE`` is the Triton helper as text, for generated kernels to include; ``kernels()`` generates it
with a launch that does nothing else (``l2_prefetch_kernel``).
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
import triton
import triton.language as tl

from deepfuse.codegen import KernelTemplate, generate

# Bytes per prefetch instruction: a multiple of 16 (the instruction's unit); 16 KB keeps the count small (an 8 MB
# weight is 512 of them) without leaning on how large a single request may be.
CHUNK = 16384

L2_PREFETCH_SOURCE = '''
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


@triton.jit
def l2_prefetch_each(Prefetch0, prefetch_bytes0, Prefetch1, prefetch_bytes1, Prefetch2, prefetch_bytes2,
                     Prefetch3, prefetch_bytes3, program, programs, PREFETCH: tl.constexpr):
    """l2_prefetch of the first PREFETCH (0 to 4) of these spans, shared among a launch's programs; the token as
    l2_prefetch's."""
    token = 0
    if PREFETCH >= 1:
        token += l2_prefetch(Prefetch0, prefetch_bytes0, program, programs, 16384, 32)
    if PREFETCH >= 2:
        token += l2_prefetch(Prefetch1, prefetch_bytes1, program, programs, 16384, 32)
    if PREFETCH >= 3:
        token += l2_prefetch(Prefetch2, prefetch_bytes2, program, programs, 16384, 32)
    if PREFETCH >= 4:
        token += l2_prefetch(Prefetch3, prefetch_bytes3, program, programs, 16384, 32)
    return token
'''

# The arguments l2_prefetch_each takes, as a kernel's signature lists them.
KERNEL_ARGS = ("Prefetch0, prefetch_bytes0, Prefetch1, prefetch_bytes1, Prefetch2, prefetch_bytes2, Prefetch3, "
               "prefetch_bytes3, PREFETCH: tl.constexpr")
MAX_TENSORS = 4
# What one latency-bound launch asks the L2 for at most: half of H100's 50 MB, so the lines are still there when
# the kernels after it read them (what else the step reads in between is small at decode sizes).
BUDGET_BYTES = 24 << 20
# Rows (tokens) up to which a launch counts as latency-bound for this: a decode step's norms, routing and attention
# splits at a few sequences.
MAX_ROWS = 16

TEMPLATE = KernelTemplate(
    "l2_prefetch",
    """
import triton
import triton.language as tl

${l2_prefetch}

@triton.jit
def l2_prefetch_kernel(Base, nbytes, Token, CHUNK: tl.constexpr, LANES: tl.constexpr):
    \"\"\"A launch that only asks the L2 for [Base, Base + nbytes): its programs share the pieces. Token: an int32
    written by no program (l2_prefetch's token is always 0).\"\"\"
    token = l2_prefetch(Base, nbytes, tl.program_id(0), tl.num_programs(0), CHUNK, LANES)
    tl.store(Token, token, mask=token != 0)
""",
)


def kernels():
    """The generated file holding ``l2_prefetch`` and ``l2_prefetch_kernel``."""
    return generate(TEMPLATE, {}, {"l2_prefetch": L2_PREFETCH_SOURCE},
                    "Pattern family: none (a memory-system hint).\n"
                    "Computes: nothing; asks the L2 for a weight a later kernel reads.")


def enabled() -> bool:
    """Opt-in (``DEEPFUSE_L2_PREFETCH=1``) until a decode step measures faster with it (bench/RESULTS.md)."""
    return os.environ.get("DEEPFUSE_L2_PREFETCH") == "1"


def supported(device: torch.device) -> bool:
    """The bulk prefetch is Hopper's (compute capability 9) and later."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def prefetchable(t: torch.Tensor) -> bool:
    """Whether ``l2_prefetch`` can take ``t``'s storage span as it lies: contiguous, its start 16 bytes past an
    allocation's (which torch's CUDA allocator aligns to 512) and its size whole 16-byte units. Read off the
    layout, not the address, so a traced (fake) tensor answers too."""
    nbytes = t.numel() * t.element_size()
    return (t.is_contiguous() and (t.storage_offset() * t.element_size()) % 16 == 0 and nbytes % 16 == 0
            and nbytes > 0)


def launch_args(tensors: Sequence[torch.Tensor], like: torch.Tensor, interpret: bool) -> dict:
    """The keyword arguments of l2_prefetch_each for a launch: the ``tensors`` it can take (``prefetchable``, at most
    MAX_TENSORS), none in the interpreter or before Hopper; ``like`` fills the unused pointer slots."""
    taken = [] if interpret or not supported(like.device) else [t for t in tensors if prefetchable(t)][:MAX_TENSORS]
    args: dict = {"PREFETCH": len(taken)}
    for i in range(MAX_TENSORS):
        t = taken[i] if i < len(taken) else like
        args[f"Prefetch{i}"] = t
        args[f"prefetch_bytes{i}"] = t.numel() * t.element_size() if i < len(taken) else 0
    return args
