"""Fused MoE experts: y[t] = sum_j w[t, j] * down_e(act(gate_e(x[t])) * up_e(x[t])), e = ids[t, j].

Three steps, no host synchronization anywhere (CUDA-graph safe):
1. ``align``: the T*k (token, slot) pairs are sorted by expert into segments padded to BLOCK_M rows, so every
   row block of the grouped GEMMs belongs to one expert (static shapes: the padded length is bounded by
   T*k + E*(BLOCK_M-1)). A generated kernel: one program walking the slots at decode sizes (``align_fused``),
   two launches of a program per chunk of slots past that (``align_parallel``); ``align`` is the same in plain
   torch. At one token (decode at batch 1) there is no align: the token's experts are distinct, so each slot is
   its own row block and the kernels read the router's ids.
2. ``moe_gate_up_act_kernel``: per row block, the expert's gate and up projections as two accumulators over the
   same A tile, and act(gate) * up in the epilogue: the [rows, 2I] intermediate never exists.
3. ``moe_down_weighted_kernel``: the down projection, the routing weight applied to the fp32 accumulator,
   rows written back to slot order; the k slots of a token are then summed in a fixed order (deterministic,
   no atomics). At one token steps 2 and 3 may also be one launch (``moe_experts_fused_kernel``, a candidate
   the autotuning times beside them).
Every expert weight byte is read once per row block that uses it: at decode sizes an active expert has one
block, so the weights are read once, which is the bandwidth floor; the grid splits N across programs so
that even a single token keeps the machine busy. Expert weights may be FP8 (e4m3 in 128 x 128 blocks with fp32
scales): the same kernels read them as stored, the activations either quantized per 1 x 128 tile in registers
(W8A8) or left in their dtype with the FP8 tiles widened (W8A16).
"""
from __future__ import annotations

import re
import textwrap
from typing import Optional

import torch
import triton

from deepfuse.codegen import KernelTemplate, cache_dir, generate, memo
from deepfuse.runtime.kernels import TRITON_DTYPES, loop_stages, size_hint
from deepfuse.runtime import autotune
from deepfuse.runtime.kernels import quant as quant_kernels
from deepfuse.runtime.kernels import routing


ACTIVATIONS = {
    "silu": "gate * tl.sigmoid(gate)",
    "gelu": "0.5 * gate * (1.0 + tl.erf(gate * 0.7071067811865476))",
    # tanh(u) = 2 * sigmoid(2u) - 1, so the tanh approximation needs no libdevice call
    "gelu_tanh": "gate * tl.sigmoid(1.5957691216057308 * (gate + 0.044715 * gate * gate * gate))",
    # squared ReLU (Nemotron-H's ungated experts)
    "relu2": "tl.maximum(gate, 0.0) * tl.maximum(gate, 0.0)",
}

# The same activations in torch, for the references and the pass's checks.
TORCH_ACTIVATIONS = {
    "silu": torch.nn.functional.silu,
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": lambda v: torch.nn.functional.gelu(v, approximate="tanh"),
    "relu2": lambda v: torch.relu(v).square(),
}

# Clamped gated units: the up value clamped both ways at a limit, u = clamp(up, -limit, limit), and
# - DeepSeek-V4's (swiglu_limit): silu(g) * u with g = min(gate, limit), "silu_clamped(limit=10.0)";
# - GPT-OSS's: (u + 1) * g * sigmoid(alpha * g), g = min(gate, limit), "swiglu_clamped(alpha=1.702, limit=7.0)";
# - Step-3.7-Flash's (swiglu_limits): min(silu(gate), limit) * u, the SiLU's output clamped,
#   "silu_out_clamped(limit=7.0)". It differs from DeepSeek-V4's only where silu(gate) passes the limit, by at most
#   limit - silu(limit) (0.0064 at 7), so the moe pass tells the two apart by where the graph clamps, not by a check.
# The constants are part of the activation's name, so each is its own generated kernel.
CLAMPED = re.compile(r"(silu|swiglu|silu_out)_clamped\((?:alpha=([-+.e\d]+), )?limit=([-+.e\d]+)\)")


def clamped_swiglu(alpha: float, limit: float) -> str:
    """The activation name of GPT-OSS's clamped SwiGLU with these constants."""
    return f"swiglu_clamped(alpha={float(alpha)!r}, limit={float(limit)!r})"


def clamped_silu(limit: float) -> str:
    """The activation name of DeepSeek-V4's clamped SiLU unit (its swiglu_limit)."""
    return f"silu_clamped(limit={float(limit)!r})"


def clamped_silu_output(limit: float) -> str:
    """The activation name of Step-3.7-Flash's unit: the SiLU's output clamped from above, the up value both ways."""
    return f"silu_out_clamped(limit={float(limit)!r})"


def _clamped(activation: str) -> Optional[tuple[str, Optional[float], float]]:
    """(form, alpha, limit) of a clamped unit, form "silu", "swiglu" or "silu_out" (alpha None but for "swiglu"), or
    None."""
    m = CLAMPED.fullmatch(activation)
    if m is None or (m.group(1) == "swiglu") != (m.group(2) is not None):
        return None
    return m.group(1), (None if m.group(2) is None else float(m.group(2))), float(m.group(3))


def clamp_limit(activation: str) -> Optional[float]:
    """The limit a clamped unit clamps at, or None for an unclamped activation."""
    clamped = _clamped(activation)
    return None if clamped is None else clamped[2]


def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS and _clamped(activation) is None:
        raise ValueError(f"moe: unsupported activation {activation!r}; supported: {', '.join(ACTIVATIONS)}, "
                         "silu_clamped(limit=L), silu_out_clamped(limit=L), swiglu_clamped(alpha=A, limit=L)")


def glu(activation: str, gate: Optional[torch.Tensor], up: torch.Tensor) -> torch.Tensor:
    """The gated unit in torch (the references' and the pass's checks' form): act(gate) * up; act(up) for
    ungated experts (no gate)."""
    if gate is None:
        return TORCH_ACTIVATIONS[activation](up)
    clamped = _clamped(activation)
    if clamped is None:
        return TORCH_ACTIVATIONS[activation](gate) * up
    form, alpha, limit = clamped
    up = up.clamp(min=-limit, max=limit)
    if form == "silu_out":
        return torch.nn.functional.silu(gate).clamp(max=limit) * up
    gate = gate.clamp(max=limit)
    if form == "silu":
        return torch.nn.functional.silu(gate) * up
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def _glu_source(activation: str, gated: bool = True) -> str:
    """Triton lines computing ``glu`` from the fp32 accumulators ``acc_gate`` and ``acc_up`` (``acc_up`` alone,
    its activation, for ungated experts)."""
    if not gated:
        return f"up = acc_up\nglu = {ACTIVATIONS[activation].replace('gate', 'up')}"
    clamped = _clamped(activation)
    if clamped is None:
        return f"gate = acc_gate\nup = acc_up\nglu = ({ACTIVATIONS[activation]}) * up"
    form, alpha, limit = clamped
    up = f"up = tl.minimum(tl.maximum(acc_up, {-limit!r}), {limit!r})\n"
    if form == "silu_out":  # the SiLU's output clamped, not its input
        return f"gate = acc_gate\n{up}glu = tl.minimum({ACTIVATIONS['silu']}, {limit!r}) * up"
    return (f"gate = tl.minimum(acc_gate, {limit!r})\n" + up
            + (f"glu = ({ACTIVATIONS['silu']}) * up" if form == "silu" else
               f"glu = (up + 1.0) * (gate * tl.sigmoid({alpha!r} * gate))"))

TEMPLATE = KernelTemplate(
    "moe_experts",
    '''
import triton
import triton.language as tl


${helpers}
# The count of each expert's routed slots stays written out in each align kernel. Inductor's analysis of what a
# kernel writes follows a helper's return value into every argument of the call: with the counts returned by a
# helper that read Ids (2076a68), the stores whose places came from them made Ids "written", and Inductor 2.11 then
# failed to schedule every compiled MoE block with an align launch (KeyError in Scheduler.compute_ancestors, H100).
# The helpers below return nothing, or take no pointer; tests/test_inductor_writes.py checks each kernel.
@triton.jit
def place_routed_slots(Ids, SortedSlots, first, end, seen, padded_start, E_POW2: tl.constexpr,
                       SLOT_CHUNK: tl.constexpr, ROUTED_K: tl.constexpr, SHARED: tl.constexpr):
    """Routed slots first .. end - 1 written to their rows, SLOT_CHUNK at a time (a pairwise comparison of
    SLOT_CHUNK^2): each after ``seen``[e] earlier slots of its expert e and those before it here (stable), in e's
    segment from padded_start[e]. Token t's routed choice j is slot t * (ROUTED_K + SHARED) + j."""
    experts = tl.arange(0, E_POW2)
    slot_lanes = tl.arange(0, SLOT_CHUNK)
    for c0 in range(first, end, SLOT_CHUNK):
        routed = c0 + slot_lanes
        ok = routed < end
        ids = tl.load(Ids + routed, mask=ok, other=E_POW2)
        match = ids[:, None] == experts[None, :]
        earlier = (ids[:, None] == ids[None, :]) & (slot_lanes[None, :] < slot_lanes[:, None])
        rank = tl.sum(earlier.to(tl.int32), axis=1) + tl.sum(tl.where(match, seen[None, :], 0), axis=1)
        start = tl.sum(tl.where(match, padded_start[None, :], 0), axis=1)
        tl.store(SortedSlots + start + rank, routed // ROUTED_K * (ROUTED_K + SHARED) + routed % ROUTED_K, mask=ok)
        seen += tl.sum(match.to(tl.int32), axis=0)


@triton.jit
def expert_segments(counts, num_tokens, BLOCK_M: tl.constexpr):
    """From the routed experts' slot counts: each expert's segment (start, end; padded to BLOCK_M rows), the
    routed rows in all, and each shared expert's segment length (every token, padded)."""
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    padded_end = tl.cumsum(padded, axis=0)
    shared_rows = (num_tokens + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    return padded_end - padded, padded_end, tl.sum(padded, axis=0), shared_rows


@triton.jit
def write_block_owners(BlockExpert, first, step, capacity, padded_end, routed_rows, shared_rows, E: tl.constexpr,
                       BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, SHARED: tl.constexpr):
    """BlockExpert[b] for the row blocks b of CHUNK-wide pieces first, first + step, ...: the routed expert whose
    segment holds the block, or the shared expert's past the routed rows (the last expert past every segment)."""
    lanes = tl.arange(0, CHUNK)
    for b0 in range(first, capacity // BLOCK_M, step):
        rows = (b0 + lanes) * BLOCK_M
        owner = tl.sum((padded_end[None, :] <= rows[:, None]).to(tl.int32), axis=1)
        if SHARED > 0:
            owner = tl.where(rows < routed_rows, owner, E + (rows - routed_rows) // tl.maximum(shared_rows, 1))
        tl.store(BlockExpert + b0 + lanes, tl.minimum(owner, E + SHARED - 1), mask=b0 + lanes < capacity // BLOCK_M)


@triton.jit
def write_shared_slots(SortedSlots, first, step, num_tokens, routed_rows, shared_rows, CHUNK: tl.constexpr,
                       ROUTED_K: tl.constexpr, SHARED: tl.constexpr):
    """Shared expert j's segment after the routed rows: every token's slot for it, in token order, for the
    CHUNK-token pieces first, first + step, ..."""
    lanes = tl.arange(0, CHUNK)
    for j in tl.static_range(SHARED):
        start = routed_rows + j * shared_rows
        for t0 in range(first, num_tokens, step):
            token = t0 + lanes
            tl.store(SortedSlots + start + token, token * (ROUTED_K + SHARED) + ROUTED_K + j, mask=token < num_tokens)


@triton.jit
def moe_align_kernel(
    Ids, SortedSlots, BlockExpert, NumPadded,
    num_routed, num_tokens, capacity,
    E: tl.constexpr, E_POW2: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, SLOT_CHUNK: tl.constexpr,
    ROUTED_K: tl.constexpr, SHARED: tl.constexpr,
):
    """One program: count slots per expert, pad each expert's segment to BLOCK_M rows, and write every slot
    to its place (stable: slots of one expert keep their order); padding rows hold the slot count. A token's
    slots are t * (ROUTED_K + SHARED) + j: its ROUTED_K choices among the E routed experts (in Ids, num_routed
    of them in all), then the SHARED shared experts E .. E + SHARED - 1, which every token takes: their segments
    follow the routed ones, in token order, and never enter the per-expert lanes. The routed slots are walked
    SLOT_CHUNK at a time (their pairwise comparison is SLOT_CHUNK^2), the row buffers CHUNK at a time."""
    num_slots = num_tokens * (ROUTED_K + SHARED)
    experts = tl.arange(0, E_POW2)
    lanes = tl.arange(0, CHUNK)
    slot_lanes = tl.arange(0, SLOT_CHUNK)
    counts = tl.zeros((E_POW2,), dtype=tl.int32)
    for c0 in range(0, num_routed, SLOT_CHUNK):
        ids = tl.load(Ids + c0 + slot_lanes, mask=c0 + slot_lanes < num_routed, other=E_POW2)
        counts += tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
    padded_start, padded_end, routed_rows, shared_rows = expert_segments(counts, num_tokens, BLOCK_M)
    tl.store(NumPadded, routed_rows + SHARED * shared_rows)
    for r0 in range(0, capacity, CHUNK):
        tl.store(SortedSlots + r0 + lanes, num_slots, mask=r0 + lanes < capacity)
    write_block_owners(BlockExpert, 0, CHUNK, capacity, padded_end, routed_rows, shared_rows, E, BLOCK_M, CHUNK,
                       SHARED)
    tl.debug_barrier()  # the padding fill above must land before the slots below overwrite it
    place_routed_slots(Ids, SortedSlots, 0, num_routed, tl.zeros((E_POW2,), dtype=tl.int32), padded_start, E_POW2,
                       SLOT_CHUNK, ROUTED_K, SHARED)
    write_shared_slots(SortedSlots, 0, CHUNK, num_tokens, routed_rows, shared_rows, CHUNK, ROUTED_K, SHARED)


@triton.jit
def moe_align_count_kernel(
    Ids, ChunkCounts, num_routed,
    E_POW2: tl.constexpr, CHUNK_SLOTS: tl.constexpr, SLOT_CHUNK: tl.constexpr,
):
    """The parallel align's first launch: ChunkCounts[c, e] = how many of chunk c's routed slots (CHUNK_SLOTS of
    them, from c * CHUNK_SLOTS on) chose expert e."""
    c = tl.program_id(0)
    experts = tl.arange(0, E_POW2)
    slot_lanes = tl.arange(0, SLOT_CHUNK)
    counts = tl.zeros((E_POW2,), dtype=tl.int32)
    for s0 in range(c * CHUNK_SLOTS, tl.minimum(c * CHUNK_SLOTS + CHUNK_SLOTS, num_routed), SLOT_CHUNK):
        ids = tl.load(Ids + s0 + slot_lanes, mask=s0 + slot_lanes < num_routed, other=E_POW2)
        counts += tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
    tl.store(ChunkCounts + c * E_POW2 + experts, counts)


@triton.jit
def moe_align_place_kernel(
    Ids, ChunkCounts, SortedSlots, BlockExpert, NumPadded,
    num_routed, num_tokens, capacity, num_chunks,
    E: tl.constexpr, E_POW2: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, CHUNK_SLOTS: tl.constexpr,
    SLOT_CHUNK: tl.constexpr, CHUNK_ROWS: tl.constexpr, ROUTED_K: tl.constexpr, SHARED: tl.constexpr,
):
    """The parallel align's second launch, one program per chunk of routed slots: what moe_align_kernel writes,
    every position written by exactly one program (no ordering between programs, no atomics). From all chunks'
    counts each program knows every expert's segment and where its own chunk's slots of each expert start in it
    (after the earlier chunks'); it places those, stably, and its share (every num_programs-th piece) of the
    padding rows, the shared experts' token-order segments and the row blocks' owners."""
    c = tl.program_id(0)
    programs = tl.num_programs(0)
    num_slots = num_tokens * (ROUTED_K + SHARED)
    experts = tl.arange(0, E_POW2)
    lanes = tl.arange(0, CHUNK)
    chunk_rows = tl.arange(0, CHUNK_ROWS)
    counts = tl.zeros((E_POW2,), dtype=tl.int32)
    before = tl.zeros((E_POW2,), dtype=tl.int32)  # this chunk's slots of an expert follow the earlier chunks'
    for r0 in range(0, num_chunks, CHUNK_ROWS):
        row = r0 + chunk_rows
        part = tl.load(ChunkCounts + row[:, None] * E_POW2 + experts[None, :], mask=(row < num_chunks)[:, None],
                       other=0)
        counts += tl.sum(part, axis=0)
        before += tl.sum(tl.where((row < c)[:, None], part, 0), axis=0)
    padded_start, padded_end, routed_rows, shared_rows = expert_segments(counts, num_tokens, BLOCK_M)
    rows_used = routed_rows + SHARED * shared_rows
    if c == 0:
        tl.store(NumPadded, rows_used)
    place_routed_slots(Ids, SortedSlots, c * CHUNK_SLOTS, tl.minimum(c * CHUNK_SLOTS + CHUNK_SLOTS, num_routed),
                       before, padded_start, E_POW2, SLOT_CHUNK, ROUTED_K, SHARED)
    # the padding rows at the end of each segment (routed expert e, then shared expert j as segment E + j) hold the
    # slot count; the program with e % programs == c writes segment e's
    pad_lanes = tl.arange(0, BLOCK_M)
    for e in range(c, E + SHARED, programs):
        if e < E:
            seg_end = tl.sum(tl.where(experts == e, padded_end, 0), axis=0)
            filled = tl.sum(tl.where(experts == e, padded_start + counts, 0), axis=0)
        else:
            seg_end = routed_rows + (e - E + 1) * shared_rows
            filled = seg_end - shared_rows + num_tokens
        tl.store(SortedSlots + filled + pad_lanes, num_slots, mask=filled + pad_lanes < seg_end)
    for r0 in range(rows_used + c * CHUNK, capacity, programs * CHUNK):  # past the rows in use
        tl.store(SortedSlots + r0 + lanes, num_slots, mask=r0 + lanes < capacity)
    write_shared_slots(SortedSlots, c * CHUNK, programs * CHUNK, num_tokens, routed_rows, shared_rows, CHUNK,
                       ROUTED_K, SHARED)
    write_block_owners(BlockExpert, c * CHUNK, programs * CHUNK, capacity, padded_end, routed_rows, shared_rows, E,
                       BLOCK_M, CHUNK, SHARED)


@triton.jit
def moe_gate_up_act_kernel(
    X, W, SharedGate, SharedUp, Out, SortedSlots, BlockExpert, NumPadded,
    stride_xm, stride_we, stride_gn, up_offset, stride_wk, stride_se, stride_sn, stride_sk, stride_om,
    num_slots, E_ROUTED, N: tl.constexpr, K: tl.constexpr,
    TOP_K: tl.constexpr, ROUTED_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, N_FASTEST: tl.constexpr, DIRECT: tl.constexpr, STAGES: tl.constexpr,
    ${gate_up_scale_args}${gate_up_bias_args}
):
    """Out[r, n] = ${computes} for the rows r of one expert's block${rows}.
    DIRECT: row block b is slot b alone (one token: its slots' experts are distinct), its expert read from
    the router's ids (BlockExpert holds them), so no align launch comes first."""
    ${program_ids}
    ${gate_up_body}
    ${gate_up_store}


@triton.jit
def moe_down_weighted_kernel(
    H, W, SharedDown, Out, SortedSlots, BlockExpert, NumPadded, TopkWeights, SharedScale,
    stride_hm, stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sk, stride_om, stride_sst, stride_sss,
    num_slots, E_ROUTED, N: tl.constexpr, K: tl.constexpr,
    TOP_K: tl.constexpr, ROUTED_K: tl.constexpr, ATOMIC: tl.constexpr, SHARED_SCALED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, N_FASTEST: tl.constexpr,
    DIRECT: tl.constexpr, STAGES: tl.constexpr,
    ${down_scale_args}${down_bias_args}
):
    """Out[slot(r), n] = w[slot(r)] * (H[r] . W[e, n]), rows back in (token, slot) order; with ATOMIC, added
    straight into the fp32 token row Out[token(r), n] instead (no per-slot buffer, no fixed order).
    TopkWeights is the router's [T, ROUTED_K] in its own dtype; a token's slots past ROUTED_K are its shared
    experts, weight 1 (no ones concatenated in front of the launch), or with SHARED_SCALED the token's
    SharedScale[t] (a gated shared MLP: Qwen-MoE's sigmoid gate), or SharedScale[t, j] per shared expert j (strides
    stride_sst, stride_sss; Inkling's router weighs them beside the routed ones). DIRECT: as in the gate/up
    kernel."""
    ${program_ids}
    ${block_rows}
    n0 = pid_n * BLOCK_N  # the tile's first column
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = H + offs_m[:, None].to(tl.int64) * stride_hm + offs_k[None, :]
    ${down_pointers}
    n_ok = offs_n[None, :] < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):  # the FP8 scales' loads pipelined too (see STAGES)
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok, other=0.0)
        ${down_product}
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * step_k
    ${down_bias}
    token = (slot // TOP_K).to(tl.int64)
    ${slot_weights}
    if ATOMIC:
        tl.atomic_add(Out + token[:, None] * stride_om + offs_n[None, :], acc * weight[:, None],
                      mask=valid[:, None] & n_ok)
    else:
        out = (acc * weight[:, None]).to(${dtype})
        tl.store(Out + slot[:, None].to(tl.int64) * stride_om + offs_n[None, :], out, mask=valid[:, None] & n_ok)


${fused_kernel}''',
)

# The gate/up kernel's body, the fused kernel's first half: a row block's act(gate) * up in ``out``.
_GATE_UP_BODY = KernelTemplate("moe_gate_up_body", '''
${block_rows}
token = (slot // TOP_K).to(tl.int64)
n0 = pid_n * BLOCK_N  # the tile's first column
offs_n = n0 + tl.arange(0, BLOCK_N)
offs_k = tl.arange(0, BLOCK_K)
${gate_up_tile}
''')
# act(gate) * up of the column tile offs_n over the whole K, in ``out`` (x's dtype) and ``n_ok``.
_GATE_UP_TILE = KernelTemplate("moe_gate_up_tile", '''
a_ptrs = X + token[:, None] * stride_xm + offs_k[None, :]
${gate_up_pointers}
${gate_zeros}
${up_zeros}
n_ok = offs_n[None, :] < N
for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):  # the FP8 scales' loads pipelined too (see STAGES)
    k_ok = offs_k < K - k0
    a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
    ${gate_load}
    ${up_load}
    ${gate_up_product}
    a_ptrs += BLOCK_K
    ${gate_step}
    ${up_step}
${pair_split}
${gate_up_bias}
${glu}
out = glu.to(${dtype})
''')

# The gate/up kernel's body and store with PREQUANT (W8A8, FP8 gated experts): the program's BLOCK_N * SPLIT_N
# intermediate columns are one 128-wide scale tile of the down projection's K, computed as SPLIT_N column tiles
# of BLOCK_N one after the other (a K loop each, the A tiles read again from L2), the earlier ones held in x's
# dtype until the tile's row maxima are known. With SPLIT_N 2 a 128-row block's two fp32 accumulators and the
# dots' results fit in registers where the 128 x 128 tiles spill (bench/kernel_resources.py --kernels
# moe_prefill_gate_up_fp8), and the intermediate keeps DeepSeek-V3's 1 x 128 tiles. Timed on H100 at T=4096, the
# spill was not what held the FP8 gate/up back: the best split tile (64 x 64, 4 warps) took 707 us, the best
# unsplit one 771, bf16's 572 (bench/RESULTS.md).
_PREQUANT_GATE_UP_BODY = KernelTemplate("moe_prequant_gate_up_body", '''
${block_rows}
token = (slot // TOP_K).to(tl.int64)
offs_k = tl.arange(0, BLOCK_K)
row_max = tl.zeros((BLOCK_M,), dtype=tl.float32)
held = tl.zeros((BLOCK_M, BLOCK_N), dtype=${dtype})  # column tile 0's act(gate) * up (SPLIT_N 2)
for part in tl.static_range(SPLIT_N):
    n0 = (pid_n * SPLIT_N + part) * BLOCK_N  # the column tile's first column
    offs_n = n0 + tl.arange(0, BLOCK_N)
    ${gate_up_tile}
    # (out is rounded to x's dtype before quantizing, as an unfused intermediate would be)
    row_max = tl.maximum(row_max, tl.max(tl.where(n_ok, tl.abs(out.to(tl.float32)), 0.0), axis=1))
    if SPLIT_N > 1 and part == 0:
        held = out
# one scale per row over the whole 128-column tile, then each column tile stored with it
h_scale = row_scales_e4m3(row_max)
if SPLIT_N > 1:
    first_n = pid_n * SPLIT_N * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(Out + offs_m[:, None] * stride_om + first_n[None, :],
             to_e4m3(held.to(tl.float32), h_scale, EXACT_FP8_ROUNDING), mask=valid[:, None] & (first_n[None, :] < N))
tl.store(Out + offs_m[:, None] * stride_om + offs_n[None, :], to_e4m3(out.to(tl.float32), h_scale, EXACT_FP8_ROUNDING),
         mask=valid[:, None] & n_ok)
tl.store(OutScale + offs_m.to(tl.int64) * stride_osm + pid_n, h_scale, mask=valid)
''')

# FUSED (one token, float weights): both projections in one launch. Each program holds the act(gate) * up of its
# BLOCK_N intermediate columns (the gate/up kernel's body) and takes them straight through the down projection:
# their share of every hidden output, for its rows, written as fp32 partials that the caller sums in a fixed order
# (deterministic). No intermediate round trip, no second launch: at one token the experts are two weight streams
# behind a launch each, and the launch gap is what a fused step saves.
_FUSED_KERNEL = KernelTemplate("moe_experts_fused", '''
@triton.jit
def moe_experts_fused_kernel(
    X, W, SharedGate, SharedUp, WDown, SharedDown, Partials, SortedSlots, BlockExpert, NumPadded, TopkWeights,
    SharedScale,
    stride_xm, stride_we, stride_gn, up_offset, stride_wk, stride_se, stride_sn, stride_sk,
    stride_de, stride_dn, stride_dk, stride_dse, stride_dsn, stride_dsk, stride_pm, stride_sst, stride_sss,
    num_slots, E_ROUTED, N: tl.constexpr, K: tl.constexpr,
    TOP_K: tl.constexpr, ROUTED_K: tl.constexpr, SHARED_SCALED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
    N_FASTEST: tl.constexpr, DIRECT: tl.constexpr, STAGES: tl.constexpr,
    ${gate_up_bias_args}${down_bias_args}
):
    """Partials[slot(r), pid_n, :] = w[slot(r)] * (h[r] . W_down[e, :, n]) over the program's BLOCK_N intermediate
    columns n and the K hidden outputs (BLOCK_H at a time), where
        h[r, n] = ${computes}.
    Summed over a token's slots and the column blocks (its partial rows, in order), they are the token's output.
    Rows and DIRECT: as in the gate/up kernel; w as the down kernel reads it."""
    ${program_ids}
    ${gate_up_body}
    ${slot_weights}
    # the down projection: this program's intermediate columns are its K rows
    offs_h = tl.arange(0, BLOCK_H)
    ${fused_down_pointers}
    p_ptrs = Partials + (slot[:, None].to(tl.int64) * tl.cdiv(N, BLOCK_N) + pid_n) * stride_pm + offs_h[None, :]
    i_ok = offs_n[:, None] < N
    for h0 in range(0, K, BLOCK_H):
        h_ok = offs_h[None, :] < K - h0
        wd = tl.load(d_ptrs, mask=i_ok & h_ok, other=0.0)
        part = tl.dot(out, wd)
        ${fused_down_bias}
        tl.store(p_ptrs, part * weight[:, None], mask=valid[:, None] & h_ok)
        d_ptrs += BLOCK_H * step_h
        p_ptrs += BLOCK_H
''')
_FUSED_DOWN_POINTERS = """\
d_ptrs = WDown + expert * stride_de + offs_h[None, :] * stride_dn + offs_n[:, None] * stride_dk
step_h = stride_dn"""
_FUSED_SHARED_DOWN_POINTERS = """\
# a shared expert: its N columns of the shared MLP's down weights
d_ptrs = SharedDown + (expert - E_ROUTED) * stride_dse + offs_h[None, :] * stride_dsn + offs_n[:, None] * stride_dsk
step_h = stride_dsn"""
# The down bias, once per token and expert: in the first column block's partials.
_FUSED_DOWN_BIAS = """\
if pid_n == 0:
    bias = tl.load(DownBias + expert * stride_dbe + (h0 + offs_h) * stride_dbn, mask=h0 + offs_h < K, other=0.0)
    part += bias.to(tl.float32)[None, :]"""

# The fp32 routing weight of each row's slot (0 for padding rows), in the down and the fused kernels. Written into
# each rather than returned by a helper that reads pointers (see the align kernels' comment on why such helpers
# are avoided; tests/test_inductor_writes.py).
_SLOT_WEIGHTS = """\
choice = slot % TOP_K
weight = tl.load(TopkWeights + token * ROUTED_K + choice, mask=valid & (choice < ROUTED_K), other=1.0)
weight = weight.to(tl.float32)
if SHARED_SCALED:
    scale = tl.load(SharedScale + token * stride_sst + (choice - ROUTED_K) * stride_sss,
                    mask=valid & (choice >= ROUTED_K), other=1.0)
    weight = tl.where(choice < ROUTED_K, weight, scale.to(tl.float32))
weight = tl.where(valid, weight, 0.0)"""

# The program's row block and N block, by the grid's order.
_PROGRAM_IDS = """\
if N_FASTEST:  # decode: the active row blocks' programs launch first and spread over the SMs
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
else:  # prefill: the row blocks of one weight tile launch together (the tile stays in L2)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)"""

# A row block's expert and slots. Aligned: what the align launch wrote (SortedSlots, BlockExpert, NumPadded).
# DIRECT (one token): block b is slot b in its first row, the other rows idle; a routed slot's expert is the
# router's id (BlockExpert is topk_ids), shared slot j past ROUTED_K is shared expert E_ROUTED + j - ROUTED_K.
_BLOCK_ROWS = """\
offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
if DIRECT:
    choice = pid_m % TOP_K
    routed_id = tl.load(BlockExpert + (pid_m // TOP_K) * ROUTED_K + tl.minimum(choice, ROUTED_K - 1))
    expert = tl.where(choice < ROUTED_K, routed_id.to(tl.int64), E_ROUTED + choice - ROUTED_K).to(tl.int64)
    slot = tl.where(tl.arange(0, BLOCK_M) == 0, pid_m, num_slots)
else:
    if pid_m * BLOCK_M >= tl.load(NumPadded):
        return
    expert = tl.load(BlockExpert + pid_m).to(tl.int64)
    slot = tl.load(SortedSlots + offs_m)
valid = slot < num_slots"""

ROUTER_TOPK_MAX_EXPERTS = routing.MAX_EXPERTS  # one program holds a token's whole score row

# The expert weights a row block reads. With shared experts, an expert id past the routed ones (E_ROUTED) is
# a slice of the shared MLP: the shared MLP of intermediate S*I is S experts of intermediate I, every token
# routed to each with weight 1, and its gate, up and down tensors are read where they are, shared expert j's
# part j * stride_se from the first's (I rows of gate/up [S*I, H], I columns of down [H, S*I]; or stacked shared
# experts' [S, I, H] and [S, H, I], Inkling's).
_ROUTED_POINTERS = {
    "gate_up": """\
g_ptrs = W + expert * stride_we + offs_n[None, :] * stride_gn + offs_k[:, None] * stride_wk
u_ptrs = g_ptrs + up_offset""",
    "up": "u_ptrs = W + expert * stride_we + offs_n[None, :] * stride_gn + offs_k[:, None] * stride_wk",
    "down": "b_ptrs = W + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk",
}
_SHARED_POINTERS = {
    "gate_up": """\
# a shared expert: its N rows of the shared MLP's gate and up weights
rows = (expert - E_ROUTED) * stride_se + offs_n[None, :] * stride_sn
g_ptrs = SharedGate + rows + offs_k[:, None] * stride_sk
u_ptrs = SharedUp + rows + offs_k[:, None] * stride_sk""",
    "up": """\
# a shared expert: its N rows of the shared MLP's up weights
u_ptrs = SharedUp + (expert - E_ROUTED) * stride_se + offs_n[None, :] * stride_sn + offs_k[:, None] * stride_sk""",
    "down": """\
# a shared expert: its K columns of the shared MLP's down weights
b_ptrs = SharedDown + (expert - E_ROUTED) * stride_se + offs_n[None, :] * stride_sn + offs_k[:, None] * stride_sk""",
}


# PAIRED (float, gated, interleaved gate/up rows each stored contiguous along N: GPT-OSS's [E, H, 2I]): the gate and
# up columns of an N block lie side by side, 2 * BLOCK_N of them, so one contiguous [BLOCK_K, 2 * BLOCK_N] tile and
# one dot carry both, split into gate and up in the epilogue. Read as two tiles of every other column instead, the
# loads are strided and uncoalesced (GPT-OSS's block took 2.7 ms at 64 tokens on H100, HF + Inductor 0.70).
_PAIRED = {
    "gate_up_pointers": """\
# the gate and up columns interleaved, up_offset (one row's stride) apart: the N block's 2 * BLOCK_N of them
offs_pair = 2 * pid_n * BLOCK_N + tl.arange(0, 2 * BLOCK_N)
w_ptrs = W + expert * stride_we + offs_pair[None, :] * up_offset + offs_k[:, None] * stride_wk
step_k = stride_wk""",
    "gate_zeros": "acc_pair = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)",
    "up_zeros": "pair_ok = offs_pair[None, :] < 2 * N",
    "gate_load": "",
    "up_load": "w = tl.load(w_ptrs, mask=k_ok[:, None] & pair_ok, other=0.0)",
    "gate_up_product": "acc_pair = tl.dot(a, w, acc_pair)",
    "gate_step": "",
    "up_step": "w_ptrs += BLOCK_K * step_k",
    "pair_split": "acc_gate, acc_up = tl.split(tl.reshape(acc_pair, (BLOCK_M, BLOCK_N, 2)))  # columns 2n, 2n + 1",
}


def _per_tile_scales(per_column: str, kind: str) -> str:
    """An FP8 product (``kind`` "product") or scale-pointer setup ("pointers") written with one weight scale per
    output column, as the kernels read it in either case: with UNIFORM_W_SCALE (the tile's columns all in one
    128-row scale block) one scalar load per K tile and one FMA per accumulator element, the row scales times it;
    otherwise a scale per column, multiplied out as an outer product with the row scales. The scalar form is the
    per-column text rewritten: the tile's first column ``n0`` for ``offs_n`` in the pointers, unmasked loads, and
    ``(a[:, None] * w[None, :])`` as ``(a * w)[:, None]``, ``w[None, :]`` as ``w``."""
    if kind == "pointers":
        uniform = re.sub(r"\boffs_n\b", "n0", per_column)
    else:
        uniform = re.sub(r"tl\.load\((\w+) \+ \(k0 // 128\) \* scale_k, mask=offs_n < N, other=0\.0\)",
                         r"tl.load(\1 + (k0 // 128) * scale_k)", per_column)
        uniform = re.sub(r"\((\w+)\[:, None\] \* (\w+)\[None, :\]\)", r"(\1 * \2)[:, None]", uniform)
        uniform = re.sub(r"(\w+_scale)\[None, :\]", r"\1", uniform)
    return ("if UNIFORM_W_SCALE:  # the tile in one scale block: a scalar per K tile\n"
            + textwrap.indent(uniform, "    ") + "\nelse:\n" + textwrap.indent(per_column, "    "))


# The K-loop product, by the experts' weight format. FP8 (e4m3 weights with fp32 scales per 128 x 128 block,
# DeepSeek-V3's recipe): in "fp8-block" (W8A8) the activation tile (BLOCK_K = 128 wide) is quantized per row in
# registers, the FP8 dot accumulates in fp32 and both scales multiply its result, one weight scale per output
# column's block; in "fp8-block-weight" (W8A16: what a graph that dequantizes its expert weights computes) the
# FP8 tile is widened to the activations' dtype (exactly: e4m3 fits in fp16 and bf16) and its block scale
# multiplies the tile's fp32 product.
_PRODUCTS = {
    "float": {"gate_up": "acc_gate = tl.dot(a, g, acc_gate)\nacc_up = tl.dot(a, u, acc_up)",
              "up": "acc_up = tl.dot(a, u, acc_up)", "down": "acc = tl.dot(a, b, acc)"},
    # SWAP_AB: each dot taken transposed, (w^T . a^T)^T, so the weight tile's BLOCK_N columns take the FP8 MMA's M
    # side. With the BLOCK_M token rows there (16 at decode), below the 64 of Hopper's FP8 warpgroup MMA, every
    # weight tile is widened to fp16 for the older MMA. At one token on H100: 33.7 against 35.0 us (bench/RESULTS.md).
    "fp8-block": {
        "gate_up": """\
aq, a_scale = quantize_rows_e4m3(a, EXACT_FP8_ROUNDING)
g_scale = tl.load(gs_ptrs + (k0 // 128) * scale_k, mask=offs_n < N, other=0.0)
u_scale = tl.load(us_ptrs + (k0 // 128) * scale_k, mask=offs_n < N, other=0.0)
if SWAP_AB:
    acc_gate += tl.trans(tl.dot(tl.trans(g), tl.trans(aq))) * (a_scale[:, None] * g_scale[None, :])
    acc_up += tl.trans(tl.dot(tl.trans(u), tl.trans(aq))) * (a_scale[:, None] * u_scale[None, :])
else:
    acc_gate += tl.dot(aq, g) * (a_scale[:, None] * g_scale[None, :])
    acc_up += tl.dot(aq, u) * (a_scale[:, None] * u_scale[None, :])""",
        "down": """\
aq, a_scale = quantize_rows_e4m3(a, EXACT_FP8_ROUNDING)
b_scale = tl.load(bs_ptrs + (k0 // 128) * scale_k, mask=offs_n < N, other=0.0)
if SWAP_AB:
    acc += tl.trans(tl.dot(tl.trans(b), tl.trans(aq))) * (a_scale[:, None] * b_scale[None, :])
else:
    acc += tl.dot(aq, b) * (a_scale[:, None] * b_scale[None, :])""",
    },
    "fp8-block-prequant": {  # the A tiles FP8 already, with their per-row scales: one load each, no quantizing
        "gate_up": """\
a_scale = tl.load(AScale + token * stride_asm + k0 // 128, mask=valid, other=0.0)
g_scale = tl.load(gs_ptrs + (k0 // 128) * scale_k, mask=offs_n < N, other=0.0)
u_scale = tl.load(us_ptrs + (k0 // 128) * scale_k, mask=offs_n < N, other=0.0)
acc_gate += tl.dot(a, g) * (a_scale[:, None] * g_scale[None, :])
acc_up += tl.dot(a, u) * (a_scale[:, None] * u_scale[None, :])""",
        "down": """\
a_scale = tl.load(AScale + offs_m.to(tl.int64) * stride_asm + k0 // 128, mask=valid, other=0.0)
b_scale = tl.load(bs_ptrs + (k0 // 128) * scale_k, mask=offs_n < N, other=0.0)
acc += tl.dot(a, b) * (a_scale[:, None] * b_scale[None, :])""",
    },
    "fp8-block-weight": {
        "gate_up": """\
g_scale = tl.load(gs_ptrs + (k0 // 128) * scale_k, mask=offs_n < N, other=0.0)
u_scale = tl.load(us_ptrs + (k0 // 128) * scale_k, mask=offs_n < N, other=0.0)
acc_gate += tl.dot(a, g.to(a.dtype), input_precision=${precision}) * g_scale[None, :]
acc_up += tl.dot(a, u.to(a.dtype), input_precision=${precision}) * u_scale[None, :]""",
        "down": """\
b_scale = tl.load(bs_ptrs + (k0 // 128) * scale_k, mask=offs_n < N, other=0.0)
acc += tl.dot(a, b.to(a.dtype), input_precision=${precision}) * b_scale[None, :]""",
    },
}
_PRODUCTS.update({fmt: {kind: _per_tile_scales(text, "product") for kind, text in forms.items()}
                  for fmt, forms in _PRODUCTS.items() if fmt != "float"})


_SCALE_POINTERS = {  # the weight scales of this program's output columns: [E, rows / 128, K / 128]
    "gate_up": """\
gs_ptrs = WScale + expert * stride_sse + (offs_n // 128) * stride_ssn
us_ptrs = WScale + expert * stride_sse + ((N + offs_n) // 128) * stride_ssn""",
    "down": "bs_ptrs = WScale + expert * stride_sse + (offs_n // 128) * stride_ssn",
}
# FP8 shared experts: the shared MLP's own scale grids, gate/up [S*I / 128, H / 128] and down [H / 128, S*I / 128]
# (I a multiple of 128, so a shared expert's K columns start on a scale block).
_SHARED_SCALE_POINTERS = {
    "gate_up": """\
gs_ptrs = SharedGateScale + (((expert - E_ROUTED) * N + offs_n) // 128) * stride_shn
us_ptrs = SharedUpScale + (((expert - E_ROUTED) * N + offs_n) // 128) * stride_shn""",
    "down": "bs_ptrs = SharedDownScale + (offs_n // 128) * stride_shn + ((expert - E_ROUTED) * K // 128) * stride_shk",
}
_SCALE_POINTERS = {kind: _per_tile_scales(text, "pointers") for kind, text in _SCALE_POINTERS.items()}
_SHARED_SCALE_POINTERS = {kind: _per_tile_scales(text, "pointers") for kind, text in _SHARED_SCALE_POINTERS.items()}
# Per-expert biases (GPT-OSS), added to the fp32 accumulators before the activation and before the routing weight:
# the gate/up bias [E, 2I] laid out as the weight rows are (halves or interleaved), the down bias [E, H].
_BIASES = {
    "gate_up": """\
bias_ptrs = GateUpBias + expert * stride_gbe + offs_n * stride_gbn
acc_gate += tl.load(bias_ptrs, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
acc_up += tl.load(bias_ptrs + bias_up_offset, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]""",
    "up": """\
bias_ptrs = GateUpBias + expert * stride_gbe + offs_n * stride_gbn
acc_up += tl.load(bias_ptrs, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]""",
    "down": """\
bias = tl.load(DownBias + expert * stride_dbe + offs_n * stride_dbn, mask=offs_n < N, other=0.0)
acc += bias.to(tl.float32)[None, :]""",
}

# The intermediate's store (prequantized W8A8 stores it in FP8 in its own body, _PREQUANT_GATE_UP_BODY).
_GATE_UP_STORE = "tl.store(Out + offs_m[:, None] * stride_om + offs_n[None, :], out, mask=valid[:, None] & n_ok)"
_FP8_HELPERS = f"""\
{quant_kernels.ROUND_TO_E4M3}

@triton.jit
def row_scales_e4m3(amax):
    \"\"\"The fp32 scale of each row whose largest magnitude is ``amax``: amax / {quant_kernels.FP8_MAX!r}.\"\"\"
    return tl.maximum(amax, {quant_kernels.AMAX_FLOOR!r}) / {quant_kernels.FP8_MAX!r}


@triton.jit
def to_e4m3(af, scale, EXACT_FP8_ROUNDING: tl.constexpr):
    \"\"\"An fp32 [rows, cols] tile divided by its rows' ``scale``, as FP8 values.\"\"\"
    q = af / scale[:, None]
    if EXACT_FP8_ROUNDING:
        q = round_to_e4m3(q)
    return q.to(tl.float8e4nv)


@triton.jit
def quantize_rows_e4m3(a, EXACT_FP8_ROUNDING: tl.constexpr):
    \"\"\"A [rows, 128] tile as FP8 values and one fp32 scale per row, s = max|a| / {quant_kernels.FP8_MAX!r}
    (DeepSeek-V3's 1 x 128 activation tiles).\"\"\"
    af = a.to(tl.float32)
    scale = row_scales_e4m3(tl.max(tl.abs(af), axis=1))
    return to_e4m3(af, scale, EXACT_FP8_ROUNDING), scale


# The experts' kernels.
"""
WEIGHT_FORMATS = tuple(_PRODUCTS)
FP8_BLOCK = 128  # the weight scale block (both dims) and the activation tile: BLOCK_K is 128 for FP8 weights


def _scale_args(kind: str, fp8: bool, prequant: bool, shared: bool, w8a8: bool) -> str:
    if not fp8:
        return ""
    shared_scales = {"gate_up": " SharedGateScale, SharedUpScale,", "down": " SharedDownScale,"}[kind]
    return ("WScale, stride_sse, stride_ssn, stride_ssk, EXACT_FP8_ROUNDING: tl.constexpr,"
            " UNIFORM_W_SCALE: tl.constexpr,"
            + (" AScale, stride_asm," if prequant else " SWAP_AB: tl.constexpr," if w8a8 else "")
            + (" OutScale, stride_osm, SPLIT_N: tl.constexpr," if prequant and kind == "gate_up" else "")
            + (f"{shared_scales} stride_shn, stride_shk," if shared else ""))


def _pointers(kind: str, shared: bool, fp8: bool) -> str:
    """The weight (and FP8 scale) pointers of the program's expert; ``step_k`` the weights' K stride, ``scale_k``
    the scales'."""
    if not shared:
        return (_ROUTED_POINTERS[kind] + "\nstep_k = stride_wk"
                + (f"\n{_SCALE_POINTERS[kind]}\nscale_k = stride_ssk" if fp8 else ""))
    routed = _ROUTED_POINTERS[kind] + (f"\n{_SCALE_POINTERS[kind]}" if fp8 else "")
    own = _SHARED_POINTERS[kind] + (f"\n{_SHARED_SCALE_POINTERS[kind]}" if fp8 else "")
    return ("if expert < E_ROUTED:\n" + textwrap.indent(routed, "    ") + "\nelse:\n" + textwrap.indent(own, "    ")
            + "\nstep_k = tl.where(expert < E_ROUTED, stride_wk, stride_sk)  # the routed or the shared weights'"
            + ("\nscale_k = tl.where(expert < E_ROUTED, stride_ssk, stride_shk)  # the routed or the shared grid's"
               if fp8 else ""))


_generated = memo()


def kernels_for(dtype: torch.dtype, activation: str, origin: str = "", shared: bool = False,
                weight_format: str = "float", biases: bool = False, gated: bool = True, paired: bool = False):
    """The generated experts kernels of this specialization. ``biases``: each expert's gate/up and down biases
    ([E, 2I] and [E, H], GPT-OSS) are added to the fp32 accumulators (float weights, no shared experts).
    ``gated=False``: ungated experts, down(act(up(x))) (Nemotron-H's), in float weights. ``paired``: gate and up
    rows interleaved and each stored contiguous along N (``_PAIRED``; float weights, no shared experts)."""
    check_activation(activation)
    if biases and (shared or weight_format != "float"):
        raise ValueError("moe: expert biases are supported with float weights and no shared experts")
    if weight_format not in _PRODUCTS:
        raise ValueError(f"moe: expert weight format {weight_format!r} is not supported "
                         f"(formats: {', '.join(WEIGHT_FORMATS)})")
    if not gated and (weight_format != "float" or _clamped(activation) is not None):
        raise ValueError("moe: ungated experts take float weights and an unclamped activation")
    if paired and (not gated or shared or weight_format != "float"):
        raise ValueError("moe: paired gate/up columns are a form of gated float experts without shared experts")
    key = (str(cache_dir()), dtype, activation, shared, weight_format, biases, gated, paired)
    if key not in _generated:
        fp8 = weight_format != "float"
        prequant = weight_format == "fp8-block-prequant"
        w8a8 = weight_format in ("fp8-block", "fp8-block-prequant")
        spec = {"dtype": str(dtype), "activation": activation, **({} if gated else {"gated": False}),
                **({"shared_experts": True} if shared else {}),
                **({"weight_format": weight_format} if fp8 else {}), **({"biases": True} if biases else {}),
                **({"paired": True} if paired else {})}
        header = (
            "Pattern family: moe (routed experts" + (" and shared experts" if shared else "") + ").\n"
            f"Computes: out = sum_j w_j * down_e({'act(gate_e(x)) * up_e(x)' if gated else 'act(up_e(x))'}) with "
            f"act = {activation}, over tokens\n"
            + ("(each projection plus its expert's bias), " if biases else "")
            + "sorted into block-aligned per-expert segments; "
            + ("gate and up share the A tile, " if gated and not paired else
               "gate and up columns interleaved, one tile and one dot for both, " if paired else
               "ungated experts (no gate projection), ")
            + "the routing weight\nscales the fp32 accumulator of the down projection"
            + ("; at one token both projections may also run in one launch\n(moe_experts_fused_kernel), "
               "its fp32 partials summed in order by the caller.\n" if not fp8 else ".\n")
            + ("The shared MLP runs as always-chosen experts (weight 1, or the token's gate factor) in the same "
               "launches" + (", its FP8 weights read with their own block scales" if fp8 else "") + ".\n"
               if shared else "")
            + ("Expert weights in FP8 (e4m3, fp32 scales per 128 x 128 block); activations quantized per row and\n"
               "128-wide K tile in the K loop, FP8 dots accumulated in fp32 with both scales applied (SWAP_AB: each\n"
               "dot taken transposed, the weight tile on the MMA's M side, for a few token rows).\n"
               if w8a8 and not prequant else "")
            + ("Expert weights in FP8 (e4m3, fp32 scales per 128 x 128 block); x quantized per row and 128-wide tile\n"
               "by a pre-kernel, the intermediate written in FP8 with its 1 x 128 scales by the gate/up epilogue;\n"
               "FP8 dots accumulated in fp32 with both scales applied.\n" if prequant else "")
            + ("Expert weights in FP8 (e4m3, fp32 scales per 128 x 128 block), widened in registers; activations in\n"
               "their own dtype; each K tile's product scaled by its weight block's scale.\n" if fp8 and not w8a8 else "")
            + (f"First generated for: {origin}" if origin else "")
        )
        precision = '"ieee"' if dtype == torch.float32 else "None"  # fp32 activations: fp32 products
        first = "gate_up" if gated else "up"  # the first projection's pointers, product and bias
        slots = {"glu": _glu_source(activation, gated), "dtype": TRITON_DTYPES[dtype],
                 "computes": ("act(x[tok(r)] . W[e, n]) * (x[tok(r)] . W[e, N + n])" if gated else
                              "act(x[tok(r)] . W[e, n]) (ungated: W the up rows)"),
                 "rows": (" (the up rows up_offset elements after the gate rows,\n    each stride_gn apart: the "
                          "halves, or GPT-OSS's interleaved rows)" if gated else ""),
                 "gate_zeros": "acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)" if gated else "",
                 "gate_load": "g = tl.load(g_ptrs, mask=k_ok[:, None] & n_ok, other=0.0)" if gated else "",
                 "gate_step": "g_ptrs += BLOCK_K * step_k" if gated else "",
                 "up_zeros": "acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)",
                 "up_load": "u = tl.load(u_ptrs, mask=k_ok[:, None] & n_ok, other=0.0)",
                 "up_step": "u_ptrs += BLOCK_K * step_k",
                 "pair_split": "",
                 "gate_up_bias": _BIASES[first] if biases else "", "down_bias": _BIASES["down"] if biases else "",
                 "gate_up_bias_args": "GateUpBias, stride_gbe, stride_gbn, bias_up_offset," if biases else "",
                 "down_bias_args": "DownBias, stride_dbe, stride_dbn," if biases else "",
                 "gate_up_pointers": _pointers(first, shared, fp8),
                 "down_pointers": _pointers("down", shared, fp8),
                 "gate_up_product": _PRODUCTS[weight_format][first].replace("${precision}", precision),
                 "down_product": _PRODUCTS[weight_format]["down"].replace("${precision}", precision),
                 "gate_up_scale_args": _scale_args("gate_up", fp8, prequant, shared, w8a8),
                 "down_scale_args": _scale_args("down", fp8, prequant, shared, w8a8),
                 "gate_up_store": "" if prequant else _GATE_UP_STORE,
                 "program_ids": _PROGRAM_IDS, "block_rows": _BLOCK_ROWS, "slot_weights": _SLOT_WEIGHTS,
                 "helpers": _FP8_HELPERS if w8a8 else "",
                 **(_PAIRED if paired else {})}
        slots["gate_up_tile"] = _GATE_UP_TILE.render(slots)
        slots["gate_up_body"] = (_PREQUANT_GATE_UP_BODY if prequant else _GATE_UP_BODY).render(slots)
        slots["fused_kernel"] = "" if fp8 else _FUSED_KERNEL.render({
            **slots, "fused_down_pointers": _FUSED_DOWN_POINTERS if not shared else (
                "if expert < E_ROUTED:\n" + textwrap.indent(_FUSED_DOWN_POINTERS, "    ") + "\nelse:\n"
                + textwrap.indent(_FUSED_SHARED_DOWN_POINTERS, "    ")),
            "fused_down_bias": _FUSED_DOWN_BIAS if biases else ""})
        _generated[key] = generate(TEMPLATE, spec, slots, header)
    return _generated[key]


def router_topk(scores: torch.Tensor, k: int, interpret: bool = False, origin: str = ""):
    """``torch.topk(scores, k, dim=-1)`` over a router's [T, E] scores (E <= ROUTER_TOPK_MAX_EXPERTS) in one
    launch, where aten takes two (a radix select and a sort of the k): the routing kernel with the scores taken
    as they are. Returns (values, int64 indices), sorted descending, ties to the lower index. Traceable like the
    experts kernels."""
    t, e = scores.shape
    if not 0 < k <= e or e > ROUTER_TOPK_MAX_EXPERTS or scores.dtype not in TRITON_DTYPES:
        raise ValueError(f"router_topk: k={k} of {e} experts in {scores.dtype} is not supported "
                         f"(1 <= k <= experts <= {ROUTER_TOPK_MAX_EXPERTS}; fp16, bf16 or fp32)")
    return routing.route(scores, None, routing.RoutingSpec(k, scoring="none"), scores.dtype, interpret, origin)


def config_for(num_slots: int, num_experts: int) -> dict:
    """Tile sizes by the expected rows per expert: small blocks at decode (few rows, weights streamed once),
    large ones in prefill (tensor-core bound)."""
    rows_per_expert = num_slots / max(num_experts, 1)
    if rows_per_expert <= 1:  # decode: one row block per active expert; narrow down tiles for more programs
        return {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_N_DOWN": 32, "BLOCK_K": 128, "N_FASTEST": True,
                "num_warps": 4, "num_stages": 4}
    if rows_per_expert <= 16:
        return {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4}
    if rows_per_expert <= 64:
        return {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4}
    if rows_per_expert <= 256:
        return {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4}
    return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}


# Candidates timed per (GPU, token bucket) at compile time: small row blocks stream weights at decode sizes,
# large ones feed the tensor cores in prefill; two accumulators in the gate/up kernel cap the tile area.
# BLOCK_N_DOWN (default BLOCK_N) is the down kernel's own N tile, N_FASTEST (default False) its program order:
# at a few tokens only a handful of row blocks are active, and narrower N tiles launched first keep every SM
# streaming weights.
CANDIDATES = [
    {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": w, "num_stages": st}
    for bm, bn, bk, w, st in [
        (16, 64, 128, 4, 4), (16, 128, 128, 4, 3), (16, 64, 256, 4, 3), (32, 64, 128, 4, 4),
        (64, 64, 64, 4, 4), (64, 128, 64, 4, 3), (64, 128, 64, 8, 4), (128, 64, 64, 4, 4),
        (128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (64, 64, 128, 4, 3),
    ]
] + [
    {"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_N_DOWN": bnd, "BLOCK_K": bk, "N_FASTEST": True, "num_warps": 4,
     "num_stages": st}
    for bn, bnd, bk, st in [(64, 32, 128, 4), (32, 32, 128, 4), (64, 16, 128, 4), (32, 16, 256, 3), (64, 64, 128, 4)]
] + [
    # prefill: a fourth stage, and the down kernel's N tile twice the gate/up one (one accumulator there, two
    # in gate/up). V2-Lite's shape at 2048 tokens on H200 (bench/moe_fp8.py --grid prefill --split): 656 us
    # against 708 for the 8-warp, 3-stage 128 / 128 / 64 tile these did not beat before.
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 4},
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_N_DOWN": 256, "BLOCK_K": 64, "num_warps": 8, "num_stages": 4},
]


# The one-launch experts (FUSED), timed beside CANDIDATES up to FUSED_MAX_TOKENS tokens (float weights): BLOCK_N
# intermediate columns a program, its down projection BLOCK_H hidden outputs a step. On H100 at V2-Lite's shape
# (bench/moe_fp8.py, routed experts alone) it tied the two launches at one token (45.45 against 45.20 us: ~2 us less
# kernel time, as much more to sum its fp32 partials, 1.1 MB of them) and lost at four (157.1 against 152.8); these
# three of the six tiles timed came within 5%.
FUSED_MAX_TOKENS = 1
FUSED_CANDIDATES = [
    {"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_H": bh, "BLOCK_K": 128, "N_FASTEST": True, "FUSED": True, "num_warps": w,
     "num_stages": 4}
    for bn, bh, w in [(64, 128, 4), (64, 128, 8), (64, 64, 4)]
]


# The FP8 experts' candidates: BLOCK_K is the 128-wide scale block; the FP8 tiles take half a bf16 tile's shared
# memory, so wider N tiles and more stages fit.
FP8_CANDIDATES = [
    {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": FP8_BLOCK, "num_warps": w, "num_stages": st}
    for bm, bn, w, st in [
        (16, 64, 4, 4), (16, 128, 4, 4), (32, 64, 4, 4), (32, 128, 4, 4), (64, 64, 4, 4), (64, 128, 4, 3),
        (64, 128, 8, 4), (128, 64, 4, 3), (128, 128, 8, 3), (128, 128, 8, 2), (64, 256, 8, 3),
    ]
] + [
    {"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_N_DOWN": bnd, "BLOCK_K": FP8_BLOCK, "N_FASTEST": True, "num_warps": w,
     "num_stages": st}
    for bn, bnd, w, st in [(64, 32, 4, 4), (32, 32, 4, 4), (64, 16, 4, 4), (128, 64, 4, 4), (64, 32, 2, 4),
                           # deeper pipelines: an FP8 tile is half a bf16 one, so a decode program needs more of
                           # them in flight to cover the memory latency
                           (32, 32, 4, 6), (32, 32, 4, 8), (64, 32, 4, 6), (64, 64, 4, 8), (32, 16, 4, 8)]
] + [  # W8A8 at decode sizes with the products transposed (SWAP_AB): N tiles of 64 and up on the FP8 MMA's M side
    {"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_N_DOWN": bnd, "BLOCK_K": FP8_BLOCK, "N_FASTEST": True, "SWAP_AB": True,
     "num_warps": 4, "num_stages": st}
    for bn, bnd, st in [(64, 64, 4), (64, 64, 6), (128, 64, 4), (64, 128, 4)]
] + [  # W8A8 with the activations quantized once (x by a pre-kernel, the intermediate by the gate/up epilogue)
    {"BLOCK_M": bm, "BLOCK_N": FP8_BLOCK, "BLOCK_N_DOWN": bnd, "BLOCK_K": FP8_BLOCK, "PREQUANT": True,
     "num_warps": w, "num_stages": st}
    for bm, bnd, w, st in [(64, 128, 4, 3), (64, 128, 8, 4), (128, 128, 8, 3), (128, 128, 8, 4), (128, 256, 8, 3),
                           (16, 128, 4, 4), (32, 128, 4, 4)]
] + [  # the same, each program's 128 intermediate columns as two column tiles of 64 (SPLIT_N, fewer registers).
    # At T=4096 on H100 its gate/up took 707 us against 771 for the best unsplit tile (64 x 128, 8 warps); the
    # 128-row split tiles (825 us) were dropped (bench/RESULTS.md, d813223)
    {"BLOCK_M": 64, "BLOCK_N": 64, "SPLIT_N": 2, "BLOCK_N_DOWN": 128, "BLOCK_K": FP8_BLOCK, "PREQUANT": True,
     "num_warps": 4, "num_stages": 4}
]


def tune(tokens: int, hidden: int, inter: int, experts: int, k: int, dtype, device, activation="silu",
         shared: int = 0, weight_format: str = "float", transposed: tuple[bool, bool] = (False, False),
         biases: bool = False, interleaved: bool = False, gated: bool = True) -> dict:
    """The fastest candidate for this shape's token bucket on this GPU (cached on disk), timed on random
    routing over real-shaped random weights (and ``shared`` shared experts of the same size), in the experts'
    ``weight_format`` ("float", or FP8 as "fp8-block" W8A8 and "fp8-block-weight" W8A16) and stored layout
    (``transposed``: gate/up stored [E, H, 2I], down [E, I, H]; the tiles read those along N), with expert
    ``biases`` and ``interleaved`` gate/up rows as the model has them, or ungated (``gated=False``). Off the GPU: the
    tile table."""
    fp8 = weight_format != "float"
    if torch.device(device).type != "cuda":
        cfg = config_for(tokens * (k + shared), experts + shared)
        return {**cfg, "BLOCK_K": FP8_BLOCK} if fp8 else cfg
    gen = kernels_for(dtype, activation, shared=shared > 0, weight_format=weight_format, biases=biases, gated=gated,
                      paired=_paired(interleaved, gated, fp8, rows_contiguous=transposed[0]))
    rows = 2 * inter if gated else inter  # of the first projection

    @autotune.once
    def inputs():  # made only if the choice is timed: V2-Lite's experts are a gigabyte of random weights
        x = torch.randn(tokens, hidden, device=device, dtype=dtype)
        # Several routings, run back to back: at decode sizes one routing's experts would sit in L2 after the
        # first run, and L2 is not where a model's next layer finds its weights.
        routings = [torch.rand(tokens, experts, device=device).argsort(dim=-1)[:, :k]
                    for _ in range(max(1, min(8, experts // max(tokens * k, 1))))]
        weights = torch.rand(tokens, k, device=device)
        w_gate_up = torch.randn(experts, rows, hidden, device=device, dtype=dtype) / hidden**0.5
        w_down = torch.randn(experts, hidden, inter, device=device, dtype=dtype) / inter**0.5
        scales = None
        if fp8:
            (w_gate_up, s1), (w_down, s2) = quantize_experts(w_gate_up), quantize_experts(w_down)
            scales = (s1, s2)
        # stored transposed: the same values, each expert's matrix kept the other way round
        w_gate_up, w_down = (w.transpose(1, 2).contiguous().transpose(1, 2) if flip else w
                             for w, flip in zip((w_gate_up, w_down), transposed))
        shared_weights = shared_scales = None
        if shared:
            shared_weights = (torch.randn(shared * inter, hidden, device=device, dtype=dtype) / hidden**0.5,
                              torch.randn(shared * inter, hidden, device=device, dtype=dtype) / hidden**0.5,
                              torch.randn(hidden, shared * inter, device=device, dtype=dtype) / inter**0.5)
            if fp8:  # FP8 shared experts beside FP8 routed ones, as the moe pass runs them
                parts = [quant_kernels.quantize_weight(w, "fp8-block") for w in shared_weights]
                shared_weights, shared_scales = tuple(q for q, _ in parts), tuple(s for _, s in parts)
            if not gated:
                shared_weights = (None, *shared_weights[1:])
        bias = (torch.zeros(experts, rows, device=device, dtype=dtype),
                torch.zeros(experts, hidden, device=device, dtype=dtype)) if biases else None
        return x, routings, weights, w_gate_up, w_down, scales, shared_weights, shared_scales, bias

    def run(cfg):
        x, routings, weights, w_gate_up, w_down, scales, shared_weights, shared_scales, bias = inputs()
        for ids in routings:
            moe_experts(x, ids, weights, w_gate_up, w_down, activation, config=cfg, shared=shared_weights,
                        weight_scales=scales, act_quant=weight_format == "fp8-block", shared_scales=shared_scales,
                        biases=bias, interleaved=interleaved, gated=gated)

    key = (f"{gen.key}-E{experts}-H{hidden}-I{inter}-k{k}" + (f"-S{shared}" if shared else "")
           + "".join(f"-{name}T" for name, flip in zip(("gate_up", "down"), transposed) if flip)
           + ("-interleaved" if interleaved else ""))
    w8a8_only = ("PREQUANT", "SWAP_AB")  # W8A16 takes neither: its tiles are these tiles without them
    candidates = ([c for c in FP8_CANDIDATES if weight_format == "fp8-block" or not any(c.get(f) for f in w8a8_only)]
                  if fp8 else CANDIDATES + (FUSED_CANDIDATES if tokens <= FUSED_MAX_TOKENS else []))
    return autotune.choose(key, tokens, candidates, run, torch.device(device))


# The fused align's tiles: SLOT_CHUNK routed slots compared pairwise per step (a SLOT_CHUNK^2 tile in registers),
# CHUNK rows of the outputs written per step, over num_warps warps. The best of a 32-point sweep
# (bench/moe_align.py, H200, V2-Lite routing with 2 shared experts): at 32 tokens 14.7 us against 25.0 for the
# former 128/128/4 warps, at 128 tokens 39.0 against 56.3, even at 1 and 8 (timed as a one-launch CUDA graph,
# about 8 us of it the replay's own).
ALIGN_TILING = {"SLOT_CHUNK": 32, "CHUNK": 128, "num_warps": 1}
# Up to this many slots the single-program align; past it the parallel one. bench/moe_align.py (V2-Lite routing with
# 2 shared experts, 8 slots a token, CUDA-graph replays of ~8 us alone): the parallel form took 15.4 us at 64 tokens
# on H100, 15.5 at 512, 18.1 at 2048, 21.5 at 4096 (the torch form it replaced 66-82); the single program took 14.7
# at 32 tokens and 39.0 at 128 on H200 (2026-12-02), its walk growing with the slots.
ALIGN_FUSED_MAX_SLOTS = 256
# Shared experts in the grouped launches, up to this many tokens; beyond, cuBLAS's dense GEMMs run the shared
# MLP faster than the grouped kernels do. Measured on H100 (V2-Lite block, bench/RESULTS.md): T=1 0.089 ms fused
# against 0.101 unfused, T=64 and T=512 even, T=4096 1.77 against 1.63 ms.
SHARED_FUSED_MAX_TOKENS = 512


def _align_operands(topk_ids: torch.Tensor, num_experts: int, block_m: int, shared: int):
    """What the generated aligns take and fill: the routed ids flat (int32 or int64, read as they are: a cast would be
    one more launch per layer), the token count, k, the routed slots, the static row bound P (``align``'s), and the
    outputs to fill, sorted_slots [P], block_expert [P / block_m] and num_padded [1]."""
    flat = topk_ids.reshape(-1)
    tokens, k = topk_ids.shape
    capacity = (tokens * (k + shared) + num_experts * (block_m - 1) + block_m - 1) // block_m * block_m
    outputs = tuple(torch.empty((n,), dtype=torch.int32, device=flat.device)
                    for n in (capacity, capacity // block_m, 1))
    return flat, tokens, k, flat.shape[0], capacity, outputs


def align_fused(topk_ids: torch.Tensor, num_experts: int, block_m: int, interpret: bool = False, shared: int = 0,
                tiling: Optional[dict] = None):
    """``align`` as one generated kernel launch (same outputs). With ``shared`` experts (the last ids below
    ``num_experts``), ``topk_ids`` holds the routed choices alone: ``align`` of them with the shared ids
    appended to every token's row. ``tiling`` overrides ``ALIGN_TILING`` (bench/moe_align.py sweeps it)."""
    flat, tokens, k, num_routed, capacity, (sorted_slots, block_expert, num_padded) = _align_operands(
        topk_ids, num_experts, block_m, shared)
    fn = kernels_for(torch.float32, "silu").function("moe_align_kernel", interpret=interpret)
    if not interpret:
        fn = torch.library.wrap_triton(fn)
    routed = num_experts - shared
    tile = {**ALIGN_TILING, **(tiling or {})}
    slot_chunk = min(tile["SLOT_CHUNK"], max(16, triton.next_power_of_2(size_hint(num_routed))))
    fn[(1,)](flat, sorted_slots, block_expert, num_padded, num_routed, tokens, capacity,
             E=routed, E_POW2=triton.next_power_of_2(routed), BLOCK_M=block_m, CHUNK=tile["CHUNK"],
             SLOT_CHUNK=slot_chunk, ROUTED_K=k, SHARED=shared,
             **({} if interpret else {"num_warps": tile["num_warps"]}))
    return sorted_slots, block_expert, num_padded


# The parallel align: CHUNK_SLOTS routed slots a program, at least ALIGN_CHUNK_SLOTS and more where that would make
# more than about ALIGN_PROGRAMS programs (each reads every chunk's counts). The best of 12 tilings at 64 to 4096
# tokens on H100 (bench/moe_align.py --parallel-only): 128 slots a chunk, 64 compared pairwise a step, 2 warps
# (4 at 64 tokens: 15.4 against 16.7 us); 256 slots a chunk lost at every size (at 4096 tokens, 192 chunks of 128:
# 21.5 us, 96 of 256: 22.4-23.2).
ALIGN_CHUNK_SLOTS = 128
ALIGN_PROGRAMS = 256
ALIGN_PARALLEL_TILING = {"SLOT_CHUNK": 64, "CHUNK": 128, "CHUNK_ROWS": 16, "num_warps": 2}


def align_parallel(topk_ids: torch.Tensor, num_experts: int, block_m: int, interpret: bool = False, shared: int = 0,
                   tiling: Optional[dict] = None):
    """``align_fused``'s outputs in two launches of one program per chunk of routed slots: each chunk's count per
    expert, then every slot placed (stably) by its chunk's program, which reads all chunks' counts; no program's
    writes meet another's. For prefill sizes, where the single program of ``align_fused`` walks too many slots and
    the torch form takes a sort and a dozen small launches. ``tiling`` overrides ``ALIGN_PARALLEL_TILING`` and may
    set ``CHUNK_SLOTS``."""
    flat, tokens, k, num_routed, capacity, (sorted_slots, block_expert, num_padded) = _align_operands(
        topk_ids, num_experts, block_m, shared)
    routed = num_experts - shared
    e_pow2 = triton.next_power_of_2(routed)
    tile = {**ALIGN_PARALLEL_TILING, **(tiling or {})}
    chunk_slots = tile.pop("CHUNK_SLOTS", max(ALIGN_CHUNK_SLOTS,
                                              triton.next_power_of_2(-(-size_hint(num_routed) // ALIGN_PROGRAMS))))
    slot_chunk = min(tile["SLOT_CHUNK"], chunk_slots)
    chunks = (num_routed + chunk_slots) // chunk_slots  # at least one program (no tokens: it writes the padding)
    chunk_counts = torch.empty((chunks, e_pow2), dtype=torch.int32, device=flat.device)
    gen = kernels_for(torch.float32, "silu")
    count, place = (gen.function(name, interpret=interpret)
                    for name in ("moe_align_count_kernel", "moe_align_place_kernel"))
    if not interpret:
        count, place = torch.library.wrap_triton(count), torch.library.wrap_triton(place)
    launch = {} if interpret else {"num_warps": tile["num_warps"]}
    count[(chunks,)](flat, chunk_counts, num_routed, E_POW2=e_pow2, CHUNK_SLOTS=chunk_slots, SLOT_CHUNK=slot_chunk,
                     **launch)
    place[(chunks,)](flat, chunk_counts, sorted_slots, block_expert, num_padded, num_routed, tokens, capacity, chunks,
                     E=routed, E_POW2=e_pow2, BLOCK_M=block_m, CHUNK=tile["CHUNK"], CHUNK_SLOTS=chunk_slots,
                     SLOT_CHUNK=slot_chunk, CHUNK_ROWS=tile["CHUNK_ROWS"], ROUTED_K=k, SHARED=shared, **launch)
    return sorted_slots, block_expert, num_padded


def align(topk_ids: torch.Tensor, num_experts: int, block_m: int, sort_key: Optional[torch.dtype] = None):
    """Sort the (token, slot) pairs by expert into segments padded to ``block_m``. ``sort_key``: the dtype the
    ids are sorted in (default the narrowest that holds them; bench/moe_align.py compares int64's).

    Returns ``sorted_slots`` [P] (a slot index t*k + j, or T*k for padding), ``block_expert`` [P / block_m]
    and ``num_padded`` [1] (rows in use). P = the static bound T*k + E*(block_m - 1), rounded up to block_m.
    """
    flat = topk_ids.reshape(-1)
    num_slots = flat.shape[0]
    device = flat.device
    ids = flat.to(torch.int64)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device).scatter_add_(0, ids, torch.ones_like(ids))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    padded_start = padded_end - padded
    start = torch.cumsum(counts, 0) - counts
    # Sorted on the narrowest key that holds an expert id: a radix sort makes one pass per key byte, and int64
    # ids took eight (a prefill's align on H200: 1.7 ms of the 27-layer step, bench/RESULTS.md). Stable, so the
    # order is the same.
    key = flat.to(sort_key or (torch.uint8 if num_experts <= 256 else torch.int16 if num_experts <= 32768
                               else torch.int64))
    order = torch.argsort(key, stable=True)
    sorted_expert = ids[order]
    rank = torch.arange(num_slots, device=device) - start[sorted_expert]
    capacity = (num_slots + num_experts * (block_m - 1) + block_m - 1) // block_m * block_m
    sorted_slots = torch.full((capacity,), num_slots, dtype=torch.int32, device=device)
    sorted_slots = sorted_slots.scatter(0, padded_start[sorted_expert] + rank, order.to(torch.int32))
    block_start = torch.arange(0, capacity, block_m, device=device)
    block_expert = torch.searchsorted(padded_end, block_start, right=True).clamp_(max=num_experts - 1)
    num_padded = padded_end[-1:].to(torch.int32)
    return sorted_slots, block_expert.to(torch.int32), num_padded


def moe_experts(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    activation: str = "silu",
    interpret: bool = False,
    config: Optional[dict] = None,
    origin: str = "",
    deterministic: bool = True,
    shared: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
    shared_scale: Optional[torch.Tensor] = None,
    weight_scales: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    act_quant: bool = True,
    shared_scales: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
    biases: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    interleaved: bool = False,
    gated: bool = True,
) -> torch.Tensor:
    """x [T, H], topk_ids/topk_weights [T, k], w_gate_up [E, 2I, H], w_down [E, H, I] -> [T, H] in x.dtype.
    ``deterministic``: the k contributions of a token are summed in a fixed order (True), or atomically
    added into an fp32 buffer by the down kernel (False: no per-slot buffer or sum pass; order not fixed).
    ``shared``: a shared MLP's (gate [S*I, H], up [S*I, H], down [H, S*I]) weights, added to every token's
    output: S more experts every token is routed to with weight 1, in the same launches; or S stacked shared
    experts (gate [S, I, H], up [S, I, H], down [S, H, I]: Inkling's), float weights only.
    ``shared_scale``: [T] or [T, 1], the shared MLP's output multiplied by it per token instead (a gated shared
    expert, as Qwen-MoE's sigmoid(x . w_gate)); with stacked shared experts also [T, S], each one's own factor
    per token (Inkling's router weighs them beside the routed ones).
    ``weight_scales``: the experts' weights are FP8 (float8_e4m3fn, from ``quantize_experts``) and these their
    fp32 scales per 128 x 128 block, [E, 2I/128, H/128] and [E, H/128, I/128] (rounded up); activations are
    quantized per row and 128-wide K tile inside the K loops (W8A8), or with ``act_quant=False`` left in their
    dtype, the FP8 tiles widened to it (W8A16: a dequantize-then-matmul graph's math). Shared experts next to
    FP8 ones are FP8 too: ``shared`` in float8_e4m3fn and ``shared_scales`` their fp32 block scales, gate/up
    [S*I/128, H/128] and down [H/128, S*I/128] (the intermediate a multiple of 128), in the same math.
    ``interleaved``: w_gate_up's rows alternate gate, up (GPT-OSS: gate = rows 0::2, up = rows 1::2), not gate
    then up halves. ``biases``: each expert's (gate/up [E, 2I], in w_gate_up's row order, and down [E, H])
    biases, added before the activation and before the routing weight (float weights, no shared experts).
    ``gated=False``: ungated experts, down(act(up(x))) (Nemotron-H's): w_gate_up is the up weights [E, I, H] alone,
    a shared MLP's gate None (float weights, an unclamped activation).

    Traceable: under make_fx the launches become Inductor's user-defined-Triton-kernel nodes."""
    _check(x, topk_ids, topk_weights, w_gate_up, w_down, shared, shared_scale, weight_scales, shared_scales, biases,
           interleaved, gated)
    fp8 = weight_scales is not None
    t, hidden = x.shape
    routed, two_i, _ = w_gate_up.shape
    inter = two_i // 2 if gated else two_i
    n_shared = 0
    if shared is not None:
        stacked = shared[1].dim() == 3  # [S, I, H] and [S, H, I], not [S*I, H] and [H, S*I]
        n_shared = shared[1].shape[0] if stacked else shared[1].shape[0] // inter
        shared_gate, shared_up, shared_down = shared  # read where they are, in either layout
        if not gated:
            shared_gate = shared_up  # (never read: no gate rows)
        if shared_gate.stride() != shared_up.stride():  # the kernel steps through both with one set of strides
            shared_gate, shared_up = shared_gate.contiguous(), shared_up.contiguous()
    num_experts = routed + n_shared
    k = topk_ids.shape[1] + n_shared  # slots per token
    num_slots = t * k
    cfg = dict(config or config_for(num_slots, num_experts))
    if fp8:  # the activation tile is the quantization group
        cfg["BLOCK_K"] = FP8_BLOCK
    # PREQUANT (W8A8 only): x quantized by a pre-kernel and the intermediate written in FP8 by the gate/up
    # epilogue, one 128-wide scale tile per program (BLOCK_N * SPLIT_N columns: SPLIT_N column tiles one after
    # the other), instead of every N-tile program quantizing its A tiles again in the K loop.
    prequant = cfg.pop("PREQUANT", False) and fp8 and act_quant
    split_n = cfg.pop("SPLIT_N", 1)
    split_n = split_n if prequant else 1
    weight_format = ("fp8-block-prequant" if prequant else "fp8-block" if act_quant
                     else "fp8-block-weight") if fp8 else "float"
    # SWAP_AB (W8A8 quantizing in the K loop only): the products taken transposed, the weight tile on the FP8 MMA's
    # M side; elsewhere the same tile as it is
    swap_ab = cfg.pop("SWAP_AB", False) and weight_format == "fp8-block"
    if prequant and cfg["BLOCK_N"] * split_n != FP8_BLOCK:
        raise ValueError(f"moe: PREQUANT takes BLOCK_N * SPLIT_N = {FP8_BLOCK} (one scale tile of the "
                         f"intermediate), got BLOCK_N {cfg['BLOCK_N']}, SPLIT_N {split_n}")
    bm, bn, bk = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N"), cfg.pop("BLOCK_K")
    bn_down, n_fastest = cfg.pop("BLOCK_N_DOWN", bn), cfg.pop("N_FASTEST", False)
    # FUSED (float weights, a static token count up to FUSED_MAX_TOKENS): both projections in one launch, BLOCK_H
    # hidden outputs at a time; its fp32 partials are T * (k + S) * I / BLOCK_N rows of the hidden size
    block_h = cfg.pop("BLOCK_H", 128)
    fused = (cfg.pop("FUSED", False) and not fp8 and isinstance(t, int) and 0 < t <= FUSED_MAX_TOKENS)
    may_skip_align = cfg.pop("DIRECT", True)  # False: align even one token (what the benches compare against)
    launch_opts = {} if interpret else cfg
    stages = loop_stages(cfg)  # the FP8 kernels' scale loads pipelined with the tiles (loop_stages)
    x = x if x.stride(-1) == 1 else x.contiguous()
    # The weights are read through their strides, never copied: a model storing its experts [E, H, 2I] (Llama 4)
    # passes transposed views here, and a copy would move every expert's bytes twice per call.
    routed_k = topk_ids.shape[1]
    weights = topk_weights.reshape(-1)  # read in its own dtype by the down kernel
    scale_strides = (0, 0)  # a shared slot's factor: SharedScale[t * stride_sst + j * stride_sss]
    if shared_scale is not None:
        if shared_scale.dim() == 2 and shared_scale.shape[1] == n_shared > 1:  # one per token and shared expert
            scale_strides = tuple(shared_scale.stride())
        else:
            shared_scale = shared_scale.reshape(-1)
            scale_strides = (shared_scale.stride(0), 0)
    # One token (decode at batch 1): its slots' experts are distinct, so each slot is its own row block and
    # the kernels read the router's ids themselves (no align launch, no dependent launch before gate/up).
    # The fused align is one program walking the slots: a few microseconds at decode sizes, where the ~10
    # launches of the torch form dominate, but serial; beyond that the torch form (parallel kernels) wins.
    direct = may_skip_align and isinstance(t, int) and t == 1
    if direct:
        flat_ids = topk_ids.reshape(-1)
        sorted_slots, block_expert, num_padded = flat_ids, flat_ids, flat_ids  # only BlockExpert is read
        capacity = num_slots * bm  # a row block per slot
    else:
        # one program walking the slots at decode sizes, a program per chunk of them past that
        aligned = align_fused if size_hint(num_slots) <= ALIGN_FUSED_MAX_SLOTS else align_parallel
        sorted_slots, block_expert, num_padded = aligned(topk_ids, num_experts, bm, interpret, n_shared)
        capacity = sorted_slots.shape[0]
    n_fastest = n_fastest and size_hint(capacity) // bm < 65536  # the row blocks on the grid's y axis: its limit
    gen = kernels_for(x.dtype, activation, origin, shared=shared is not None, weight_format=weight_format,
                      biases=biases is not None, gated=gated,
                      paired=_paired(interleaved, gated, fp8, rows_contiguous=w_gate_up.stride(1) == 1))
    a, a_scales, h_scales = x, None, None  # the gate/up kernel's A operand
    if prequant:
        a, a_scales = quant_kernels.prequantize_activations(x, FP8_BLOCK, interpret)
        h_scales = torch.empty((capacity, triton.cdiv(inter, FP8_BLOCK)), dtype=torch.float32, device=x.device)
    if shared is None:  # never read: the kernels take these pointers (and strides) only for shared experts
        shared_gate = shared_up = shared_down = w_down[0]
    # (shared expert, row, column) strides: a 2D shared MLP's expert j is its j-th block of I rows (gate/up) or
    # columns (down)
    gate_strides = (tuple(shared_gate.stride()) if shared_gate.dim() == 3
                    else (inter * shared_gate.stride(0), *shared_gate.stride()))
    down_strides = (tuple(shared_down.stride()) if shared_down.dim() == 3
                    else (inter * shared_down.stride(1), *shared_down.stride()))

    def scale_args(i):  # the FP8 kernels' weight-scale arguments
        if not fp8:
            return {}
        ws = weight_scales[i]
        # a column tile in one 128-row scale block: its width divides 128, and (gate/up) the up rows, N rows after
        # the gate rows, and a shared expert's, start on a tile boundary too
        tile = bn if i == 0 else bn_down
        uniform = FP8_BLOCK % tile == 0 and (i == 1 or inter % tile == 0)
        args = {"WScale": ws, "stride_sse": ws.stride(0), "stride_ssn": ws.stride(1), "stride_ssk": ws.stride(2),
                "EXACT_FP8_ROUNDING": interpret, "UNIFORM_W_SCALE": uniform,
                **({"SWAP_AB": swap_ab} if weight_format == "fp8-block" else {})}
        if shared is not None:  # the shared MLP's own scale grids
            own = shared_scales[:2] if i == 0 else shared_scales[2:]
            args.update(dict(zip(("SharedGateScale", "SharedUpScale") if i == 0 else ("SharedDownScale",), own)))
            args.update({"stride_shn": own[0].stride(0), "stride_shk": own[0].stride(1)})
        if prequant:  # the A operand's scales: x's for gate/up, the intermediate's for down (which gate/up writes)
            scales = a_scales if i == 0 else h_scales
            args.update({"AScale": scales, "stride_asm": scales.stride(0)})
            if i == 0:
                args.update({"OutScale": h_scales, "stride_osm": h_scales.stride(0), "SPLIT_N": split_n})
        return args
    def gate_up_rows(stride):  # (the gate rows' stride, the up rows' offset from them), in elements
        if not gated:  # the up rows alone
            return stride, 0
        return (2 * stride, stride) if interleaved else (stride, inter * stride)

    def bias_args(i):  # the biased kernels' bias arguments
        if biases is None:
            return {}
        b = biases[i]
        if i == 0:
            row, up = gate_up_rows(b.stride(1))
            return {"GateUpBias": b, "stride_gbe": b.stride(0), "stride_gbn": row, "bias_up_offset": up}
        return {"DownBias": b, "stride_dbe": b.stride(0), "stride_dbn": b.stride(1)}
    gate_up = gen.function("moe_gate_up_act_kernel", interpret=interpret)
    down = gen.function("moe_down_weighted_kernel", interpret=interpret)
    if not interpret:
        gate_up, down = torch.library.wrap_triton(gate_up), torch.library.wrap_triton(down)
    def grid(n_tiles):
        return (n_tiles, capacity // bm) if n_fastest else (capacity // bm, n_tiles)

    if fused:  # both projections in one launch; the partials summed in (slot, column block) order
        experts_fn = gen.function("moe_experts_fused_kernel", interpret=interpret)
        experts_fn = experts_fn if interpret else torch.library.wrap_triton(experts_fn)
        blocks_n = triton.cdiv(inter, bn)
        partials = torch.empty((num_slots, blocks_n, hidden), dtype=torch.float32, device=x.device)
        experts_fn[grid(blocks_n)](
            a, w_gate_up, shared_gate, shared_up, w_down, shared_down, partials, sorted_slots, block_expert,
            num_padded, weights, weights if shared_scale is None else shared_scale,
            a.stride(0), w_gate_up.stride(0), *gate_up_rows(w_gate_up.stride(1)), w_gate_up.stride(2),
            *gate_strides, *w_down.stride(), *down_strides, partials.stride(1), *scale_strides, num_slots, routed,
            N=inter, K=hidden, TOP_K=k, ROUTED_K=routed_k, SHARED_SCALED=shared_scale is not None, BLOCK_M=bm,
            BLOCK_N=bn, BLOCK_K=bk, BLOCK_H=block_h, N_FASTEST=n_fastest, DIRECT=direct, STAGES=stages,
            **bias_args(0), **bias_args(1), **launch_opts,
        )
        return partials.view(t, k * blocks_n, hidden).sum(dim=1).to(x.dtype)
    inter_out = torch.empty((capacity, inter), dtype=torch.float8_e4m3fn if prequant else x.dtype, device=x.device)
    gate_up[grid(triton.cdiv(inter, bn * split_n))](
        a, w_gate_up, shared_gate, shared_up, inter_out, sorted_slots, block_expert, num_padded,
        a.stride(0), w_gate_up.stride(0), *gate_up_rows(w_gate_up.stride(1)), w_gate_up.stride(2),
        *gate_strides, inter_out.stride(0), num_slots, routed, N=inter, K=hidden, TOP_K=k, ROUTED_K=routed_k,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, N_FASTEST=n_fastest, DIRECT=direct, STAGES=stages, **scale_args(0),
        **bias_args(0), **launch_opts,
    )
    if deterministic:
        out = torch.empty((num_slots, hidden), dtype=x.dtype, device=x.device)
    else:
        out = torch.zeros((t, hidden), dtype=torch.float32, device=x.device)
    down[grid(triton.cdiv(hidden, bn_down))](
        inter_out, w_down, shared_down, out, sorted_slots, block_expert, num_padded, weights,
        weights if shared_scale is None else shared_scale,
        inter_out.stride(0), w_down.stride(0), w_down.stride(1), w_down.stride(2), *down_strides,
        out.stride(0), *scale_strides, num_slots, routed, N=hidden, K=inter, TOP_K=k, ROUTED_K=routed_k,
        ATOMIC=not deterministic, SHARED_SCALED=shared_scale is not None, BLOCK_M=bm, BLOCK_N=bn_down, BLOCK_K=bk,
        N_FASTEST=n_fastest, DIRECT=direct, STAGES=stages, **scale_args(1), **bias_args(1), **launch_opts,
    )
    if not deterministic:
        return out.to(x.dtype)
    # The k contributions of a token, summed in slot order in fp32: deterministic, no atomics.
    return out.view(t, k, hidden).sum(dim=1, dtype=torch.float32).to(x.dtype)


def _paired(interleaved: bool, gated: bool, fp8: bool, rows_contiguous: bool) -> bool:
    """Whether the gate/up kernel reads each N block's gate and up columns as one tile (``_PAIRED``): float gated
    experts whose interleaved gate/up rows are stored contiguous (stride 1 along them: [E, H, 2I])."""
    return interleaved and gated and not fp8 and rows_contiguous


def _check(x, topk_ids, topk_weights, w_gate_up, w_down, shared=None, shared_scale=None, weight_scales=None,
           shared_scales=None, biases=None, interleaved=False, gated=True):
    if x.dim() != 2:
        raise ValueError(f"moe: x must be [tokens, hidden], got {tuple(x.shape)}")
    if not gated:
        _check_ungated(x, w_gate_up, w_down, shared, weight_scales, biases, interleaved)
        return _check_routing(x, topk_ids, topk_weights, shared, shared_scale)
    if (biases is not None or interleaved) and (weight_scales is not None or shared is not None):
        raise ValueError("moe: expert biases and interleaved gate/up rows are supported with float weights and no "
                         "shared experts")
    if biases is not None:
        e, two_i, h = w_gate_up.shape
        got = tuple(tuple(b.shape) for b in biases)
        if got != ((e, two_i), (e, h)) or any(b.dtype != x.dtype for b in biases):
            raise ValueError(f"moe: expert biases must be [{e}, {two_i}] (gate/up) and [{e}, {h}] (down) in x's "
                             f"dtype, got {got} ({', '.join(str(b.dtype) for b in biases)})")
    w_dtype, w_what = ((torch.float8_e4m3fn, "float8_e4m3fn (FP8 experts)") if weight_scales is not None
                       else (x.dtype, "in x's float dtype"))
    if x.dtype not in TRITON_DTYPES or w_gate_up.dtype != w_dtype or w_down.dtype != w_dtype:
        raise TypeError(f"moe: expert weights must be {w_what} (x {x.dtype}, gate_up {w_gate_up.dtype}, "
                        f"down {w_down.dtype})")
    e, two_i, h = w_gate_up.shape
    if weight_scales is not None:
        if shared is not None and shared_scales is None:
            raise ValueError("moe: shared experts next to FP8 experts are FP8 too: pass their shared_scales")
        want = ((e, -(-two_i // FP8_BLOCK), -(-h // FP8_BLOCK)), (e, -(-h // FP8_BLOCK), -(-(two_i // 2) // FP8_BLOCK)))
        got = tuple(tuple(s.shape) for s in weight_scales)
        if got != want or any(s.dtype != torch.float32 for s in weight_scales):
            raise ValueError(f"moe: FP8 weight scales must be fp32 {want[0]} and {want[1]} (one per 128 x 128 "
                             f"block), got {got}")
    if h != x.shape[1] or two_i % 2 or tuple(w_down.shape) != (e, h, two_i // 2):
        raise ValueError(f"moe: expert weight shapes {tuple(w_gate_up.shape)} / {tuple(w_down.shape)} do not fit "
                         f"hidden size {x.shape[1]}")
    if shared is not None:
        gate, up, down = shared
        si, inter = gate.shape[0], two_i // 2
        if gate.dim() == 3:  # stacked: [S, I, H] and [S, H, I]
            if (tuple(gate.shape) != (si, inter, h) or tuple(up.shape) != (si, inter, h)
                    or tuple(down.shape) != (si, h, inter) or si == 0 or weight_scales is not None):
                raise ValueError(f"moe: stacked shared expert weights {tuple(gate.shape)} / {tuple(up.shape)} / "
                                 f"{tuple(down.shape)} are not gate/up [S, I, H] and down [S, H, I] for I={inter} "
                                 "(float experts only)")
        elif (tuple(up.shape) != (si, h) or tuple(gate.shape) != (si, h) or tuple(down.shape) != (h, si)
                or si % inter or si == 0):
            raise ValueError(f"moe: shared expert weights {tuple(gate.shape)} / {tuple(up.shape)} / "
                             f"{tuple(down.shape)} are not gate/up [S*I, H] and down [H, S*I] for I={inter}")
        if weight_scales is None and shared_scales is not None:
            raise ValueError("moe: shared_scales without FP8 routed experts (weight_scales)")
        if shared_scales is None and any(w.dtype != x.dtype for w in shared):
            raise TypeError("moe: shared expert weights must share x's dtype")
        if shared_scales is not None:
            inter, blocks = two_i // 2, lambda n: -(-n // FP8_BLOCK)  # noqa: E731
            want = ((blocks(si), blocks(h)), (blocks(si), blocks(h)), (blocks(h), blocks(si)))
            got = tuple(tuple(s.shape) for s in shared_scales)
            if any(w.dtype != torch.float8_e4m3fn for w in shared) or inter % FP8_BLOCK:
                raise TypeError(f"moe: FP8 shared experts must be float8_e4m3fn with an intermediate size a multiple "
                                f"of {FP8_BLOCK} (got {[str(w.dtype) for w in shared]}, I={inter})")
            if got != want or any(s.dtype != torch.float32 for s in shared_scales):
                raise ValueError(f"moe: FP8 shared expert scales must be fp32 {want} (one per 128 x 128 block), "
                                 f"got {got}")
    _check_routing(x, topk_ids, topk_weights, shared, shared_scale)


def _check_ungated(x, w_up, w_down, shared, weight_scales, biases, interleaved):
    if weight_scales is not None or interleaved:
        raise ValueError("moe: ungated experts take float weights (no FP8 scales) and no gate rows to interleave")
    if x.dtype not in TRITON_DTYPES or w_up.dtype != x.dtype or w_down.dtype != x.dtype:
        raise TypeError(f"moe: expert weights must be in x's float dtype (x {x.dtype}, up {w_up.dtype}, "
                        f"down {w_down.dtype})")
    e, inter, h = w_up.shape
    if h != x.shape[1] or tuple(w_down.shape) != (e, h, inter):
        raise ValueError(f"moe: ungated expert weight shapes {tuple(w_up.shape)} / {tuple(w_down.shape)} are not up "
                         f"[E, I, H] and down [E, H, I] for hidden size {x.shape[1]}")
    if biases is not None:
        got = tuple(tuple(b.shape) for b in biases)
        if shared is not None or got != ((e, inter), (e, h)) or any(b.dtype != x.dtype for b in biases):
            raise ValueError(f"moe: ungated expert biases must be [{e}, {inter}] (up) and [{e}, {h}] (down) in x's "
                             f"dtype, with no shared experts, got {got}")
    if shared is not None:
        gate, up, down = shared
        si = up.shape[0]
        if (gate is not None or tuple(up.shape) != (si, h) or tuple(down.shape) != (h, si) or si % inter
                or si == 0 or up.dtype != x.dtype or down.dtype != x.dtype):
            raise ValueError(f"moe: an ungated shared MLP is up [S*I, H] and down [H, S*I] in x's dtype for I={inter}, "
                             f"no gate; got {None if gate is None else tuple(gate.shape)} / {tuple(up.shape)} / "
                             f"{tuple(down.shape)}")


def _check_routing(x, topk_ids, topk_weights, shared, shared_scale):
    if topk_ids.shape != topk_weights.shape or topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0]:
        raise ValueError("moe: topk_ids and topk_weights must both be [tokens, k]")
    if shared_scale is not None:
        if shared is None:
            raise ValueError("moe: a shared_scale without shared expert weights")
        up = shared[1]
        experts = up.shape[0] if up.dim() == 3 else 1  # one factor per token, or per token and stacked expert
        if (shared_scale.dim() not in (1, 2) or shared_scale.shape[0] != x.shape[0]
                or shared_scale.shape[1:] not in ((), (1,), (experts,))):
            raise ValueError(f"moe: shared_scale must be [tokens] or [tokens, 1]" + (
                f" or [tokens, {experts}] (one per stacked shared expert)" if experts > 1 else "")
                + f", got {tuple(shared_scale.shape)} for {x.shape[0]} tokens")
        if shared_scale.dtype not in TRITON_DTYPES:
            raise TypeError(f"moe: shared_scale in {shared_scale.dtype}: fp16, bf16 or fp32")


def quantize_experts(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked expert weights [E, N, K] -> (float8_e4m3fn [E, N, K], fp32 scales [E, N/128, K/128] rounded up):
    each expert's matrix in 128 x 128 blocks, as ``quant.quantize_weight`` does a linear's."""
    parts = [quant_kernels.quantize_weight(w[e], "fp8-block", (FP8_BLOCK, FP8_BLOCK)) for e in range(w.shape[0])]
    return torch.stack([q for q, _ in parts]), torch.stack([s for _, s in parts])


def dequantize_experts(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``quantize_experts`` inverted: FP8 weights [..., N, K] and their block scales [..., N/128, K/128] ->
    ``dtype``, each matrix as ``quant.dequantize_weight`` does a linear's."""
    flat_q, flat_s = q.reshape(-1, *q.shape[-2:]), scale.reshape(-1, *scale.shape[-2:])
    parts = [quant_kernels.dequantize_weight(a, b, "fp8-block", (FP8_BLOCK, FP8_BLOCK), dtype)
             for a, b in zip(flat_q, flat_s)]
    return torch.stack(parts).reshape(q.shape)


def reference_fp8(x, topk_ids, topk_weights, w_gate_up, w_down, weight_scales, activation: str = "silu",
                  compute: torch.dtype = torch.float64, act_quant: bool = True, shared=None,
                  shared_scales=None, shared_scale=None) -> torch.Tensor:
    """The FP8 experts written out in ``compute``: weights dequantized (and the FP8 shared MLP's, ``shared``
    with ``shared_scales``), then ``reference_act_quant`` (both projections' inputs quantized with
    ``act_quant``, as they are without)."""
    w1, w2 = (dequantize_experts(w, s, compute) for w, s in ((w_gate_up, weight_scales[0]), (w_down, weight_scales[1])))
    if shared is not None:
        shared = tuple(quant_kernels.dequantize_weight(w, s, "fp8-block", (FP8_BLOCK, FP8_BLOCK), compute)
                       for w, s in zip(shared, shared_scales))
    return reference_act_quant(x, topk_ids, topk_weights, w1, w2, activation, compute, act_quant, shared,
                               shared_scale)


def reference_act_quant(x, topk_ids, topk_weights, w_gate_up, w_down, activation: str = "silu",
                        compute: torch.dtype = torch.float64, act_quant: bool = True, shared=None,
                        shared_scale=None) -> torch.Tensor:
    """The routed experts in ``compute`` with both projections' inputs quantized per row and 128-wide tile
    (the intermediate first rounded to x's dtype, as the kernels store it; with ``act_quant`` only), summed as
    ``reference`` sums them; plus the shared MLP (gate, up, down weights) if given, quantized alike, times
    ``shared_scale`` per token if given."""
    act = TORCH_ACTIVATIONS[activation]
    fake_quant = _fake_quant(compute) if act_quant else (lambda v: v.to(compute))
    w1, w2 = w_gate_up.to(compute), w_down.to(compute)
    xq = fake_quant(x)
    out = torch.zeros(x.shape, dtype=compute, device=x.device)
    for e in range(w1.shape[0]):
        token, slot = torch.where(topk_ids == e)
        if token.numel() == 0:
            continue
        gate, up = (xq[token] @ w1[e].t()).chunk(2, dim=-1)
        h = fake_quant((act(gate) * up).to(x.dtype))
        out.index_add_(0, token, (h @ w2[e].t()) * topk_weights[token, slot, None].to(compute))
    if shared is not None:
        out += _shared_act_quant(x, xq, shared, act, fake_quant, compute, shared_scale)
    return out.to(x.dtype)


def _fake_quant(compute: torch.dtype):
    """Activations quantized per row and 128-wide tile, dequantized into ``compute`` (the references' form)."""
    return lambda v: quant_kernels.dequantize_activation(*quant_kernels.quantize_activation(v, FP8_BLOCK), FP8_BLOCK,
                                                         compute)


def _shared_act_quant(x, xq, shared, act, fake_quant, compute, shared_scale=None):
    """The shared MLP of ``reference_act_quant``: its inputs as the routed experts' (``xq``), the intermediate
    rounded to x's dtype and quantized, times ``shared_scale`` per token if given; in ``compute``."""
    gate, up, down = (w.to(compute) for w in shared)
    y = fake_quant((act(xq @ gate.t()) * (xq @ up.t())).to(x.dtype)) @ down.t()
    return y if shared_scale is None else y * shared_scale.reshape(-1, 1).to(compute)


def reference_shared_act_quant(x, gate, up, down, activation: str = "silu", compute: torch.dtype = torch.float64,
                               shared_scale=None) -> torch.Tensor:
    """A shared MLP alone, as ``reference_act_quant`` adds it (W8A8 activations), in ``compute``."""
    fake_quant = _fake_quant(compute)
    return _shared_act_quant(x, fake_quant(x), (gate, up, down), TORCH_ACTIVATIONS[activation], fake_quant, compute,
                             shared_scale)


def reference(x, topk_ids, topk_weights, w_gate_up, w_down, activation: str = "silu", shared=None,
              shared_scale=None, biases=None, interleaved: bool = False, gated: bool = True) -> torch.Tensor:
    """Plain torch, one expert at a time, as the models write it (fp32 accumulation of the k slots), plus the
    shared MLP (gate, up, down weights) if given, times ``shared_scale`` per token if given; each projection plus
    its expert's bias with ``biases`` (gate/up [E, 2I], down [E, H]), gate and up rows alternating with
    ``interleaved``; ungated experts (w_gate_up the up weights alone, a shared MLP's gate None) with
    ``gated=False``."""
    t, hidden = x.shape
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = torch.zeros(t, hidden, dtype=acc, device=x.device)
    for e in range(w_gate_up.shape[0]):
        token, slot = torch.where(topk_ids == e)
        if token.numel() == 0:
            continue
        b1, b2 = (None, None) if biases is None else (b[e].to(x.dtype) for b in biases)
        both = torch.nn.functional.linear(x[token], w_gate_up[e].to(x.dtype), b1)
        gate, up = ((None, both) if not gated else (both[:, 0::2], both[:, 1::2]) if interleaved else
                    both.chunk(2, dim=-1))
        y = torch.nn.functional.linear(glu(activation, gate, up), w_down[e].to(x.dtype), b2)
        out.index_add_(0, token, y.to(acc) * topk_weights[token, slot, None].to(acc))
    if shared is not None:
        gate, up, down = (None if w is None else w.to(x.dtype) for w in shared)
        if up.dim() == 2:  # one MLP of intermediate S*I; stacked: each expert's MLP weighted on its own
            gate, up, down = (None if w is None else w[None] for w in (gate, up, down))
        per_expert = shared_scale is not None and shared_scale.dim() == 2 and shared_scale.shape[1] == up.shape[0]
        scale = (torch.ones(t, up.shape[0], dtype=acc, device=x.device) if shared_scale is None
                 else shared_scale.reshape(t, up.shape[0] if per_expert else 1).to(acc).expand(t, up.shape[0]))
        for j in range(up.shape[0]):
            y = torch.nn.functional.linear(glu(activation, None if gate is None else torch.nn.functional.linear(
                x, gate[j]), torch.nn.functional.linear(x, up[j])), down[j]).to(acc)
            out += y * scale[:, j, None]
    return out.to(x.dtype)
