"""Multi-head Latent Attention over the latent KV cache.

    out[b, s, h] = sum_t softmax_t(scale * (q_nope . k_nope[t] + q_pe . k_pe[t]) + mask) v[t]
    with k_nope[t] = W_UK[h] c_kv[t], v[t] = W_UV[h] c_kv[t]  (W_UK, W_UV: the two halves of kv_b_proj)

The cache holds, per token, only c_kv [C] and the head-shared roped key k_pe [R]. Two ways to attend:

* absorbed (decode, short queries): W_UK moves to the query side (q_lat = q_nope W_UK, [H, C]) and W_UV to
  the output side, so attention runs directly over the latent: every head of a query reads the same c_kv
  row, and each latent byte is read once per (query, head block). Four launches:
  ``mla_absorb_query_kernel`` (q_lat), ``mla_decode_partial_kernel`` (the context split across programs,
  flash-decoding), ``mla_decode_reduce_kernel`` (the splits merged by their log-sum-exp) and
  ``mla_absorb_output_kernel`` (W_UV). The cache is never expanded.
* expanded (prefill): k_nope and v come from one matmul of the latent with kv_b_proj; the flash-attention
  kernel ``mla_prefill_kernel`` takes the nope and rope parts of q and k as separate operands, so the
  [.., 192] key is never concatenated, and k_pe is read once per key block for every head.

Causality is bottom-right aligned (query i of S sits at position T - S + i), which is both prefill's and
decode's mask. A general additive mask (any broadcast of [B, H, S, T]) is supported too.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton

from deepfuse.codegen import KernelTemplate, cache_dir, generate, memo
from deepfuse.runtime.kernels import TRITON_DTYPES, loop_stages, size_hint
from deepfuse.runtime.kernels import quant as quant_kernels
from deepfuse.runtime.latent_cache import FP8, dequantize_latent


TEMPLATE = KernelTemplate(
    "mla_attention",
    '''
import triton
import triton.language as tl


@triton.jit
def mla_absorb_query_kernel(
    QNope, W, QLat, stride_qb, stride_qs, stride_qh, stride_wh, stride_wd, stride_wc, S, BS,
    DN: tl.constexpr, C: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """W_UK into the query: QLat[q, h, c-block] = q_nope[q, h] . W_UK[h][:, c-block] for a block of queries
    (tensor-core tile of BLOCK_Q rows). One program per (query block, head, latent block): at one query the
    head's 2 MB of W_UK is spread over H * C / BLOCK_C programs, each reading its slice once. The slice is read
    in BLOCK_D-row steps of a pipelined loop, so its loads are asynchronous copies all in flight together; read
    whole, sm_90a's SASS issued them as three dependent groups of loads and shared-memory stores."""
    pid_q = tl.program_id(0)
    h = tl.program_id(1)
    pid_c = tl.program_id(2)
    rows = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    r_ok = rows < BS
    b = (rows // S).to(tl.int64)
    s = rows % S
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    q_lat = tl.zeros((BLOCK_Q, BLOCK_C), dtype=tl.float32)
    for d0 in range(0, DN, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        q = tl.load(QNope + b[:, None] * stride_qb + s[:, None] * stride_qs + h * stride_qh + offs_d[None, :],
                    mask=r_ok[:, None] & (offs_d[None, :] < DN), other=0.0)
        w_uk = tl.load(W + h * stride_wh + offs_d[:, None] * stride_wd + offs_c[None, :] * stride_wc,
                       mask=(offs_d[:, None] < DN) & (offs_c[None, :] < C), other=0.0)
        q_lat = tl.dot(q, w_uk, q_lat, input_precision=${precision})
    tl.store(QLat + (rows[:, None].to(tl.int64) * tl.num_programs(1) + h) * C + offs_c[None, :], q_lat.to(${dtype}),
             mask=r_ok[:, None] & (offs_c[None, :] < C))


@triton.jit
def mla_decode_partial_kernel(
    QLat, QPe, KV, KVScale, KPe, Mask, PartOut, PartLse,
    stride_qlb, stride_qls, stride_qlh, stride_qpb, stride_qps, stride_qph,
    stride_kvb, stride_kvt, stride_ksb, stride_kst, stride_kpb, stride_kpt,
    stride_mb, stride_mh, stride_ms, stride_mt,
    S, T, H, scale, causal_offset,
    C: tl.constexpr, C_POW2: tl.constexpr, R: tl.constexpr, R_POW2: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr, NUM_SPLITS: tl.constexpr,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, KV_FP8: tl.constexpr, FP8_AS_FP16: tl.constexpr,
    STAGES: tl.constexpr,
):
    """One (query, head block, context split): attention over the latent rows of the split, all heads of the
    block together (each c_kv row is loaded once for them). Writes the split's normalized output and LSE.
    KV_FP8: the latent rows are float8_e4m3fn with one fp32 scale per token (KVScale [B, T]), read at a byte
    per value. A tile is widened to the queries' dtype (exact: every e4m3 value is a bf16 and an fp16 one) and
    its scales are applied outside the products, to the fp32 scores and to the probabilities before P.V:
    q.(s_t kv_t) = s_t (q.kv_t) and sum_t p_t (s_t kv_t) = sum_t (p_t s_t) kv_t. That is 16% faster than
    dequantizing the tile in fp32 (BLOCK_T x C fp32 values in registers) at batch 64, context 32768 on an H200,
    but the FP8 cache is still 2.2x slower than bf16's there (bench/RESULTS.md, 4605532): open.
    FP8_AS_FP16 (a candidate, off by default): the tile is widened to fp16 instead, one hardware unpack with no
    fp16 -> bf16 conversion after it (256 per thread and tile at 32 x 512, bench/kernel_resources.py --sass).
    The queries enter the score dot as fp16 scaled by a power of two per head, their largest value brought to
    2^14, so fp16's range holds any bf16 query. P.V reads the tile's rows times their scales over the tile's
    largest scale in fp16 (at most 448) and P unscaled, and scales the product back in fp32: no overflow at any
    latent size. A row whose scale is below about 3e-8 of its tile's largest loses precision to fp16's
    subnormals (more than bf16's rounding), never range. Timed on an H200 at batch 64, context 32768 and the
    default tile: the first form, which read tile x scales in fp16 unguarded, took 1073 us against 1148 for
    the bf16 widening; a form with a per-tile branch to the queries' dtype took 1171 against 1138 (it spilled
    and halved the async copies, bench/kernel_resources.py). This form is not timed yet (bench/RESULTS.md)."""
    scale = tl.cast(scale, tl.float32)  # Inductor passes Python floats as fp64
    pid_bs = tl.program_id(0)
    pid_h = tl.program_id(1)
    split = tl.program_id(2)
    b = (pid_bs // S).to(tl.int64)
    s = pid_bs % S
    heads = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = heads < H
    offs_c = tl.arange(0, C_POW2)
    offs_r = tl.arange(0, R_POW2)
    q_lat = tl.load(QLat + b * stride_qlb + s * stride_qls + heads[:, None] * stride_qlh + offs_c[None, :],
                    mask=h_ok[:, None] & (offs_c[None, :] < C), other=0.0)
    q_pe = tl.load(QPe + b * stride_qpb + s * stride_qps + heads[:, None] * stride_qph + offs_r[None, :],
                   mask=h_ok[:, None] & (offs_r[None, :] < R), other=0.0)
    if FP8_AS_FP16:  # q * 2^k in fp16, its largest value per head near 2^14; 2^-k comes back on the scores
        q_max = tl.maximum(tl.max(tl.abs(q_lat.to(tl.float32)), axis=1), 1e-30)
        q_pow2 = tl.exp2(14.0 - tl.floor(tl.log2(q_max)))
        q16 = (q_lat.to(tl.float32) * q_pow2[:, None]).to(tl.float16)
        q_unscale = 1.0 / q_pow2
    t_end = T
    if CAUSAL:
        t_end = tl.minimum(T, causal_offset + s + 1)
    per_split = tl.cdiv(tl.cdiv(T, NUM_SPLITS), BLOCK_T) * BLOCK_T
    t_lo = split * per_split
    t_hi = tl.minimum(t_lo + per_split, t_end)
    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, C_POW2), dtype=tl.float32)
    c_ok = offs_c[None, :] < C
    r_ok = offs_r[None, :] < R
    for t0 in tl.range(t_lo, t_hi, BLOCK_T, num_stages=STAGES):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_ok = offs_t < t_hi
        rows_ok = t_ok
        if HAS_MASK:
            # Rows no head attends to are not read (zeros): an unwritten row's NaN never enters, and a tile the
            # mask hides entirely (a static cache's unwritten tail) reads nothing but its mask. Such a tile is
            # not skipped by a branch: loads under one are not pipelined, and each then waited a memory round
            # trip in every step (bench/kernel_resources.py, "loads waited in loops").
            madd = tl.load(Mask + b * stride_mb + heads[:, None] * stride_mh + s * stride_ms
                           + offs_t[None, :] * stride_mt, mask=h_ok[:, None] & t_ok[None, :], other=float("-inf"))
            rows_ok = t_ok & (tl.max(madd, axis=0) > float("-inf"))
        kv_ptrs = KV + b * stride_kvb + offs_t[:, None] * stride_kvt + offs_c[None, :]
        kv = tl.load(kv_ptrs, mask=rows_ok[:, None] & c_ok, other=0.0)
        k_pe = tl.load(KPe + b * stride_kpb + offs_t[:, None] * stride_kpt + offs_r[None, :],
                       mask=rows_ok[:, None] & r_ok, other=0.0)
        if KV_FP8:
            kv_scale = tl.load(KVScale + b * stride_ksb + offs_t * stride_kst, mask=rows_ok, other=0.0)
            # The tile again (from L2) for P.V: an FP8 tile widened in registers for both dots is not pipelined,
            # one load for each dot is (bench/kernel_resources.py); the second read is not merged with the first.
            kv_v = tl.load(kv_ptrs, mask=rows_ok[:, None] & c_ok, other=0.0, cache_modifier=".cg")
            if FP8_AS_FP16:
                kv16 = kv.to(tl.float16)
                scores = (tl.dot(q16, tl.trans(kv16), input_precision=${precision})
                          * (q_unscale[:, None] * kv_scale[None, :]))
            else:
                scores = (tl.dot(q_lat, tl.trans(kv.to(q_lat.dtype)), input_precision=${precision})
                          * kv_scale[None, :])
        else:
            scores = tl.dot(q_lat, tl.trans(kv), input_precision=${precision})
        scores = tl.dot(q_pe, tl.trans(k_pe), scores, input_precision=${precision}) * scale
        if HAS_MASK:
            scores += madd
        scores = tl.where(t_ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(scores - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if KV_FP8 and FP8_AS_FP16:
            # Each row times its scale over the tile's largest scale (a power of two), so every value is
            # at most 448 in fp16, whatever the latent's size; the dot's result is scaled back in fp32.
            s_ref = tl.exp2(tl.ceil(tl.log2(tl.maximum(tl.max(kv_scale, axis=0), 1e-30))))
            v16 = kv_v.to(tl.float16) * (kv_scale / s_ref).to(tl.float16)[:, None]
            acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), v16, input_precision=${precision}) * s_ref
        elif KV_FP8:
            p = p * kv_scale[None, :]
            acc = tl.dot(p.to(q_lat.dtype), kv_v.to(q_lat.dtype), acc * alpha[:, None], input_precision=${precision})
        else:
            acc = tl.dot(p.to(kv.dtype), kv, acc * alpha[:, None], input_precision=${precision})
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log(l_i))
    row = pid_bs.to(tl.int64) * H + heads
    tl.store(PartOut + (row[:, None] * NUM_SPLITS + split) * C_POW2 + offs_c[None, :], out, mask=h_ok[:, None])
    tl.store(PartLse + row * NUM_SPLITS + split, lse, mask=h_ok)


@triton.jit
def mla_decode_reduce_kernel(
    PartOut, PartLse, Out, H, stride_ob, stride_os, stride_oh, S,
    C: tl.constexpr, C_POW2: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_POW2: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Merge the context splits of one (query, head, latent slice): weights exp(lse_split - lse_max),
    renormalized. The slices spread one query's partials over more programs. The partials are loaded with the
    LSEs, before the max: compiled for sm_90a every load then issues before the first barrier, where loaded
    after the max they issued behind its two (a second memory round trip in a kernel that is all latency at
    decode sizes; 96 registers at 64 splits against 43, no spills)."""
    pid_bs = tl.program_id(0)
    h = tl.program_id(1)
    row = pid_bs.to(tl.int64) * H + h
    splits = tl.arange(0, SPLITS_POW2)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    lse = tl.load(PartLse + row * NUM_SPLITS + splits, mask=splits < NUM_SPLITS, other=float("-inf"))
    part = tl.load(PartOut + (row * NUM_SPLITS + splits[:, None]) * C_POW2 + offs_c[None, :],
                   mask=splits[:, None] < NUM_SPLITS, other=0.0)
    m = tl.max(lse, axis=0)
    w = tl.exp(lse - m)
    out = tl.sum(part * w[:, None], axis=0) / tl.sum(w, axis=0)
    b = pid_bs // S
    s = pid_bs % S
    tl.store(Out + b.to(tl.int64) * stride_ob + s * stride_os + h * stride_oh + offs_c, out.to(${dtype}),
             mask=offs_c < C)


@triton.jit
def mla_absorb_output_kernel(
    OutLat, W, Out, stride_wh, stride_wd, stride_wc, BS, H, DN,
    DV: tl.constexpr, C: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """W_UV into the output: Out[q, h, v-block] = OutLat[q, h] . W_UV[h][v-block, :] for a block of queries
    (OutLat [queries, H, C] and Out [queries, H, DV] contiguous; W_UV[h] = rows DN.. of kv_b_proj's head h).
    One program per (query block, head, output block): at one query each head's W_UV is spread over DV /
    BLOCK_V programs, each reading its rows once, BLOCK_C latent columns a step, every step in flight."""
    pid_q = tl.program_id(0)
    h = tl.program_id(1)
    rows = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    r_ok = rows < BS
    offs_v = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)
    lat_rows = (rows.to(tl.int64) * H + h) * C
    out = tl.zeros((BLOCK_Q, BLOCK_V), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        lat = tl.load(OutLat + lat_rows[:, None] + offs_c[None, :], mask=r_ok[:, None] & (offs_c[None, :] < C),
                      other=0.0)
        w_uv = tl.load(W + h * stride_wh + (DN + offs_v[None, :]) * stride_wd + offs_c[:, None] * stride_wc,
                       mask=(offs_c[:, None] < C) & (offs_v[None, :] < DV), other=0.0)
        out = tl.dot(lat, w_uv, out, input_precision=${precision})
    tl.store(Out + (rows[:, None].to(tl.int64) * H + h) * DV + offs_v[None, :], out.to(${dtype}),
             mask=r_ok[:, None] & (offs_v[None, :] < DV))


@triton.jit
def mla_prefill_tile(
    acc, m_i, l_i, q_nope, q_pe, KN, KP, V, Mask, rows, r_ok, t0, t_end, scale, causal_offset,
    stride_knt, stride_kpt, stride_vt, stride_mt, offs_dn, offs_r, offs_dv,
    DN: tl.constexpr, R: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, EDGE: tl.constexpr, TMA: tl.constexpr,
):
    """One key tile [t0, t0 + BLOCK_N) of the online softmax. KN, KP, V, Mask point at this (batch, head)'s
    rows (Mask: one pointer per query row, [BLOCK_M, 1]); with TMA, KN, KP and V are tensor descriptors over
    them instead (the copy engine zero-fills keys past T). EDGE: the tile may hold keys past t_end or, causally,
    past a row's own position, so those are masked; an interior tile (every key visible to every row) is read
    and used without a mask."""
    offs_t = t0 + tl.arange(0, BLOCK_N)
    t_ok = offs_t < t_end
    live = True
    if HAS_MASK:  # a tile the mask hides entirely (a causal mask's upper triangle, say) is never computed
        madd = tl.load(Mask + offs_t[None, :] * stride_mt, mask=r_ok[:, None] & t_ok[None, :], other=float("-inf"))
        live = tl.max(tl.max(madd, axis=1), axis=0) > float("-inf")
    if live:
        if TMA:
            k_nope = KN.load([t0, 0]).T
            k_pe = KP.load([t0, 0]).T
        elif EDGE:
            k_nope = tl.load(KN + offs_t[None, :] * stride_knt + offs_dn[:, None],
                             mask=t_ok[None, :] & (offs_dn[:, None] < DN), other=0.0)
            k_pe = tl.load(KP + offs_t[None, :] * stride_kpt + offs_r[:, None],
                           mask=t_ok[None, :] & (offs_r[:, None] < R), other=0.0)
        else:
            k_nope = tl.load(KN + offs_t[None, :] * stride_knt + offs_dn[:, None], mask=offs_dn[:, None] < DN,
                             other=0.0)
            k_pe = tl.load(KP + offs_t[None, :] * stride_kpt + offs_r[:, None], mask=offs_r[:, None] < R, other=0.0)
        scores = tl.dot(q_nope, k_nope, input_precision=${precision})
        scores = tl.dot(q_pe, k_pe, scores, input_precision=${precision}) * scale
        if HAS_MASK:
            scores += madd * 1.4426950408889634
        if EDGE:
            keep = t_ok[None, :]
            if CAUSAL:
                keep = keep & (offs_t[None, :] <= causal_offset + rows[:, None])
            scores = tl.where(keep, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(scores - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if TMA:
            v = V.load([t0, 0])
        elif EDGE:
            v = tl.load(V + offs_t[:, None] * stride_vt + offs_dv[None, :],
                        mask=t_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
        else:
            v = tl.load(V + offs_t[:, None] * stride_vt + offs_dv[None, :], mask=offs_dv[None, :] < DV, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=${precision})
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def mla_prefill_kernel(
    QN, QP, KN, KP, V, Mask, TileRanges, Out,
    stride_qnb, stride_qns, stride_qnh, stride_qpb, stride_qps, stride_qph,
    stride_knb, stride_knt, stride_knh, stride_kpb, stride_kpt,
    stride_vb, stride_vt, stride_vh, stride_ob, stride_os, stride_oh,
    stride_mb, stride_mh, stride_ms, stride_mt, stride_rb, stride_rh, stride_rm,
    S, T, H, scale, causal_offset,
    DN: tl.constexpr, DN_POW2: tl.constexpr, R: tl.constexpr, R_POW2: tl.constexpr,
    DV: tl.constexpr, DV_POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, TMA: tl.constexpr,
):
    """Flash attention for one (query block, batch, head): scores = q_nope . k_nope + q_pe . k_pe (two dots,
    no concatenated key), online softmax in base 2 (the scale carries log2(e): exp2 is the hardware's), P . V;
    the fp32 accumulator is normalized once at the end. The key tiles run in loops of two kinds: interior
    ones, which every row of the block sees whole (below the causal diagonal, inside T), with no masking, and
    edge ones (the diagonal, T's last partial tile) with it. With an additive mask, TileRanges holds this
    query block's (first visible, first interior, end of interior, end of visible) key tiles, read off the
    mask by ``mask_tile_ranges``: the tiles it hides are skipped, its all-zero ones are interior (no mask
    read), the others are edge tiles that read it. TMA: the key and value tiles through tensor descriptors over
    this (batch, head)'s rows (no per-element addresses in registers; the copy engine zero-fills past T)."""
    scale = tl.cast(scale, tl.float32) * 1.4426950408889634  # Python floats come as fp64; log2(e) folded in
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = rows < S
    offs_dn = tl.arange(0, DN_POW2)
    offs_r = tl.arange(0, R_POW2)
    offs_dv = tl.arange(0, DV_POW2)
    q_nope = tl.load(QN + b * stride_qnb + rows[:, None] * stride_qns + h * stride_qnh + offs_dn[None, :],
                     mask=r_ok[:, None] & (offs_dn[None, :] < DN), other=0.0)
    q_pe = tl.load(QP + b * stride_qpb + rows[:, None] * stride_qps + h * stride_qph + offs_r[None, :],
                   mask=r_ok[:, None] & (offs_r[None, :] < R), other=0.0)
    kn = KN + b * stride_knb + h * stride_knh
    kp = KP + b * stride_kpb
    vv = V + b * stride_vb + h * stride_vh
    if TMA:
        kn = tl.make_tensor_descriptor(kn, shape=[T, DN], strides=[stride_knt, 1], block_shape=[BLOCK_N, DN_POW2])
        kp = tl.make_tensor_descriptor(kp, shape=[T, R], strides=[stride_kpt, 1], block_shape=[BLOCK_N, R_POW2])
        vv = tl.make_tensor_descriptor(vv, shape=[T, DV], strides=[stride_vt, 1], block_shape=[BLOCK_N, DV_POW2])
    mk = Mask + b * stride_mb + h * stride_mh + rows[:, None] * stride_ms  # [BLOCK_M, 1] row pointers
    t_end = T
    t_interior = T  # keys every row of this block sees: the first row's causal reach, inside T
    if CAUSAL:
        t_end = tl.minimum(T, causal_offset + (pid_m + 1) * BLOCK_M)
        t_interior = tl.minimum(T, causal_offset + pid_m * BLOCK_M + 1)
    t_interior = tl.maximum(t_interior, 0) // BLOCK_N * BLOCK_N
    t_start = 0  # the first key tile any row sees
    i_start = 0  # the interior tiles: [i_start, t_interior)
    if HAS_MASK:  # the mask's own ranges, within the causal ones
        ranges = TileRanges + b * stride_rb + h * stride_rh + pid_m * stride_rm
        t_start = tl.load(ranges) * BLOCK_N
        i_start = tl.load(ranges + 1) * BLOCK_N
        t_interior = tl.maximum(tl.minimum(tl.load(ranges + 2) * BLOCK_N, t_interior), i_start)
        t_end = tl.minimum(tl.load(ranges + 3) * BLOCK_N, t_end)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, DV_POW2), dtype=tl.float32)
    if HAS_MASK:  # the mask's edge tiles before its interior ones (a sliding window's or a padding's start)
        for t0 in range(t_start, tl.minimum(i_start, t_end), BLOCK_N):
            acc, m_i, l_i = mla_prefill_tile(
                acc, m_i, l_i, q_nope, q_pe, kn, kp, vv, mk, rows, r_ok, t0, t_end, scale, causal_offset,
                stride_knt, stride_kpt, stride_vt, stride_mt, offs_dn, offs_r, offs_dv,
                DN, R, DV, BLOCK_N, True, CAUSAL, True, TMA)
    for t0 in range(i_start, t_interior, BLOCK_N):
        acc, m_i, l_i = mla_prefill_tile(
            acc, m_i, l_i, q_nope, q_pe, kn, kp, vv, mk, rows, r_ok, t0, t_end, scale, causal_offset,
            stride_knt, stride_kpt, stride_vt, stride_mt, offs_dn, offs_r, offs_dv,
            DN, R, DV, BLOCK_N, False, CAUSAL, False, TMA)
    for t0 in range(tl.maximum(t_interior, t_start), t_end, BLOCK_N):
        acc, m_i, l_i = mla_prefill_tile(
            acc, m_i, l_i, q_nope, q_pe, kn, kp, vv, mk, rows, r_ok, t0, t_end, scale, causal_offset,
            stride_knt, stride_kpt, stride_vt, stride_mt, offs_dn, offs_r, offs_dv,
            DN, R, DV, BLOCK_N, HAS_MASK, CAUSAL, True, TMA)
    out = acc / l_i[:, None]
    tl.store(Out + b * stride_ob + rows[:, None] * stride_os + h * stride_oh + offs_dv[None, :], out.to(${dtype}),
             mask=r_ok[:, None] & (offs_dv[None, :] < DV))
''',
)

_generated = memo()


def kernels_for(dtype: torch.dtype, origin: str = ""):
    if dtype not in TRITON_DTYPES:
        raise TypeError(f"mla: unsupported dtype {dtype}; supported: float16, bfloat16, float32")
    key = (str(cache_dir()), dtype)
    if key not in _generated:
        header = (
            "Pattern family: mla (Multi-head Latent Attention).\n"
            "Computes: softmax(scale * (q_nope . W_UK c_kv + q_pe . k_pe) + mask) . W_UV c_kv, either absorbed\n"
            "(attention directly over the latent cache, context split across programs, then merged) or\n"
            "expanded (flash attention with the nope and rope parts of q and k as separate operands).\n"
            + (f"First generated for: {origin}" if origin else "")
        )
        # fp32 stays fp32 in the tensor cores' dot (no TF32), so fp32 models keep fp32 accuracy.
        slots = {"dtype": TRITON_DTYPES[dtype], "precision": '"ieee"' if dtype == torch.float32 else "None"}
        _generated[key] = generate(TEMPLATE, {"dtype": str(dtype)}, slots, header)
    return _generated[key]


ABSORB_MAX_QUERIES = 16  # queries per sequence up to which the absorbed path runs (decode, speculative steps)

DECODE_CONFIG = {"BLOCK_H": 16, "num_warps": 4, "num_stages": 2}  # and BLOCK_T by the latent width
# W_UK absorbed into the query: queries in tensor-core tiles of 16 rows (the smallest tl.dot takes), latent
# slices small enough that one decode query still spreads each head's W_UK over several programs (V2-Lite: 16
# heads x 8 programs).
ABSORB_BLOCK_Q = 16
# The split merge's latent slice: one query's 16 heads x 64 splits x 512 fp32 partials (2 MB) took 4.2 us per
# layer in 16 programs (H200, batch 1); slices of 128 give each program a quarter of a head's partials.
REDUCE_BLOCK_C = 128
ABSORB_BLOCK_C = 64
# W_UK's slice in 32-row steps, all four of V2's (nope 128) in flight at once: num_stages 5 prefetches four
# before the first wait (sm_90a SASS; at 4 the fourth issued only once the first had landed).
ABSORB_BLOCK_D = 32
ABSORB_STAGES = 5
# W_UV on the output side: 16 of a head's output rows a program (V2-Lite: 16 heads x 8 programs at one query),
# over the latent 128 columns a step.
ABSORB_BLOCK_V = 16
ABSORB_OUT_BLOCK_C = 128


MAX_SPLITS = 128
SPLIT_MAX_ROWS = 512


def decode_splits(queries, head_blocks: int, context, sm_count: int, block_t: int) -> int:
    """The absorbed decode's split count over the context: enough programs to fill the GPU twice over, and
    splits of at most SPLIT_MAX_ROWS rows once the context is long; at most MAX_SPLITS, and no split shorter
    than a tile of block_t rows.

    Fewer, longer splits move fewer fp32 partials but were slower. Batch 1, context 2048 on H100: 16 splits of
    128 rows took 16.7 + 2.4 us per layer (partial + reduce) against 10.2 + 4.2 us for 64 splits of 32
    (a660f1c against fd3e370). Batch 64, context 32768 on H200 (FP8 latent, bench/mla_decode_tiles.py): the
    fill rule's 5 splits (320 programs, 2.4 waves) took 1479 us against 1130 for 64 splits of 512 rows, and
    128 splits 1205. Batch 1 there (bf16 latent): 64 splits took 55.0 us, 128 splits 37.9 (BLOCK_T 32)."""
    fill = triton.cdiv(2 * sm_count, max(1, size_hint(queries)) * head_blocks)
    tiles = max(1, triton.cdiv(size_hint(context), block_t))
    want = min(MAX_SPLITS, tiles, max(fill, triton.cdiv(size_hint(context), SPLIT_MAX_ROWS)))  # all >= 1
    # A split is a whole number of tiles: launch only the splits that hold rows. 64 splits over 2049 rows of
    # 32 are 64-row splits, 33 of them holding rows; the split count is 33 then, not 64.
    return triton.cdiv(tiles, triton.cdiv(tiles, want))


def choose_path(queries: int) -> str:
    return "absorbed" if size_hint(queries) <= ABSORB_MAX_QUERIES else "expanded"


# The prefill tile: the best of a 24-point sweep (BLOCK_M 64/128, BLOCK_N 32/64/128, 4/8 warps, 2/3 stages) of
# this kernel alone at V2-Lite dims, T=4096, H100: 0.40 ms. Autotuning it per query bucket at compile time
# measured slower end to end (0.68 vs 0.62 ms per layer), so it is fixed until the kernel itself improves.
# "TMA": True brings the key and value tiles in through tensor descriptors: compiled for sm_90a this tile then
# holds 141 registers a thread, not 255 (bench/kernel_resources.py), but on H100 it ran 4% slower at T=4096 (291.1
# against 280.7 us) and slower at every tile but the 8-warp 64 / 64 (bench/mla_prefill_tiles.py --tma,
# bench/RESULTS.md), so it is an option, not the default.
PREFILL_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _mask_4d(mask: Optional[torch.Tensor], b, h, s, t):
    """An additive fp32 mask broadcast to [B, H, S, T] (strides 0 where broadcast), or None. A bool mask
    means True = attend (SDPA's convention)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(~mask, float("-inf"))
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    return mask.to(torch.float32).expand(b, h, s, t)


def mask_tile_ranges(mask4: torch.Tensor, block_m: int, block_n: int) -> torch.Tensor:
    """What an additive mask [B, H, S, T] (``_mask_4d``'s) leaves of each (query block, key tile) of the
    prefill kernel, as int32 [B, H, S / block_m, 4] (computed once over a broadcast batch or head dim and
    expanded there, stride 0): per query block the first key tile with a visible key, the first interior tile (every key
    visible to every row with an additive 0: read without the mask) at or after it, the end of the interior
    run from there, and the end of the visible tiles. Tiles outside the visible range are hidden from every
    row, so skipping them is exact; the others are read with the mask. Computed from the mask's values on
    every call: a regionally compiled model's mask is an input, and no shape says it is causal. A NaN in the
    mask is visible and not zero, so it reaches the scores as it would unfused."""
    b, h, s, t = mask4.shape
    m = mask4[:1] if mask4.stride(0) == 0 else mask4
    m = m[:, :1] if mask4.stride(1) == 0 else m
    n_m, n_t = triton.cdiv(s, block_m), triton.cdiv(t, block_n)
    pad = (0, n_t * block_n - t, 0, n_m * block_m - s)
    tiles = (m.shape[0], m.shape[1], n_m, block_m, n_t, block_n)
    # Rows past S count as hidden (for the visible range) and as zero (for the interior): they are never
    # stored. Keys past T are hidden and not zero: T's partial last tile is never interior (read unbounded).
    visible = torch.nn.functional.pad((m != float("-inf")).to(torch.uint8), pad, value=0)
    visible = visible.view(tiles).amax(dim=(3, 5)) > 0
    zero = torch.nn.functional.pad((m == 0).to(torch.uint8), (0, pad[1], 0, 0), value=0)
    zero = torch.nn.functional.pad(zero, (0, 0, 0, pad[3]), value=1)
    zero = zero.view(tiles).amin(dim=(3, 5)) > 0
    index = torch.arange(n_t, device=m.device)
    any_visible = visible.any(dim=-1)
    first = torch.where(any_visible, visible.to(torch.int32).argmax(dim=-1), 0)
    end = torch.where(any_visible, n_t - visible.flip(-1).to(torch.int32).argmax(dim=-1), 0)
    inside = zero & (index >= first[..., None]) & (index < end[..., None])
    i_start = torch.where(inside.any(dim=-1), inside.to(torch.int32).argmax(dim=-1), end)
    broken = (index >= i_start[..., None]) & ~zero  # the first tile past the interior run
    i_end = torch.minimum(torch.where(broken.any(dim=-1), broken.to(torch.int32).argmax(dim=-1), n_t), end)
    ranges = torch.stack([first, i_start, i_end, end], dim=-1).to(torch.int32)
    return ranges.expand(b, h, n_m, 4)


def mla_attention(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    c_kv: torch.Tensor,
    k_pe: torch.Tensor,
    w_kv_b: torch.Tensor,
    scale: float,
    causal: bool,
    mask: Optional[torch.Tensor] = None,
    kv_scale: Optional[torch.Tensor] = None,
    path: str = "auto",
    interpret: bool = False,
    config: Optional[dict] = None,
    origin: str = "",
) -> torch.Tensor:
    """q_nope [B, S, H, DN], q_pe [B, S, H, R], c_kv [B, T, C], k_pe [B, T, R], w_kv_b [H*(DN+DV), C]
    (kv_b_proj.weight) -> [B, S, H, DV] in q's dtype. Any strides with a unit last dim; traceable (the
    launches become Inductor user-kernel nodes under make_fx). An FP8 latent cache: c_kv float8_e4m3fn with
    ``kv_scale`` [B, T] or [B, T, 1] fp32, one scale per token (``deepfuse.runtime.latent_cache``)."""
    _check(q_nope, q_pe, c_kv, k_pe, w_kv_b, kv_scale)
    b, s, h, dn = q_nope.shape
    t, c = c_kv.shape[1], c_kv.shape[2]
    r = q_pe.shape[-1]
    dv = w_kv_b.shape[0] // h - dn
    dtype = q_nope.dtype
    w = w_kv_b.view(h, dn + dv, c)
    if path == "auto":
        path = choose_path(s)
    gen = kernels_for(dtype, origin)
    mask4 = _mask_4d(mask, b, h, s, t)
    has_mask = mask4 is not None
    m_args = (mask4.stride() if has_mask else (0, 0, 0, 0))
    mask_ptr = mask4 if has_mask else q_nope
    c_kv, k_pe = _unit_last(c_kv), _unit_last(k_pe)
    q_pe = _unit_last(q_pe)
    fp8 = kv_scale is not None
    if fp8:
        kv_scale = kv_scale.reshape(b, t)
    if path == "absorbed":
        cfg = dict(config or {**DECODE_CONFIG, "BLOCK_T": 32 if c > 256 else 64})
        bh, bt = cfg.pop("BLOCK_H"), cfg.pop("BLOCK_T")
        as_fp16 = cfg.pop("FP8_AS_FP16", False)  # an FP8 latent's candidate widening (see the partial kernel)
        queries = b * s
        if not queries:
            return torch.empty((b, s, h, dv), dtype=dtype, device=q_nope.device)
        q_blocks = triton.cdiv(queries, ABSORB_BLOCK_Q)
        dn_pow2, c_pow2, r_pow2 = (max(16, triton.next_power_of_2(n)) for n in (dn, c, r))
        absorb = gen.function("mla_absorb_query_kernel", interpret=interpret)
        partial = gen.function("mla_decode_partial_kernel", interpret=interpret)
        reduce = gen.function("mla_decode_reduce_kernel", interpret=interpret)
        if not interpret:
            absorb, partial, reduce = (torch.library.wrap_triton(f) for f in (absorb, partial, reduce))
        w = w.to(dtype)
        # W_UK absorbed into the query: q_lat[b, s, h] = q_nope[b, s, h] @ W_UK[h]  ([DN] x [DN, C]). At one query
        # this kernel takes 3.1 us per layer, cuBLAS's batched GEMV took 3.2 (H200, bench/RESULTS.md): even, but
        # the launch is ours to fuse into (the rope of q_pe, the scale) where cuBLAS's is not.
        q_lat = torch.empty((b, s, h, c), dtype=dtype, device=q_nope.device)
        absorb[(q_blocks, h, triton.cdiv(c, ABSORB_BLOCK_C))](
            q_nope, w, q_lat, q_nope.stride(0), q_nope.stride(1), q_nope.stride(2), *w.stride(), s, queries,
            DN=dn, C=c, BLOCK_Q=ABSORB_BLOCK_Q, BLOCK_C=ABSORB_BLOCK_C, BLOCK_D=min(ABSORB_BLOCK_D, dn_pow2),
            **({} if interpret else {"num_stages": ABSORB_STAGES}),
        )
        head_blocks = triton.cdiv(h, bh)
        splits = cfg.pop("SPLITS", None) or decode_splits(queries, head_blocks, t, _sm_count(q_nope.device), bt)
        launch_opts = {} if interpret else cfg
        # the partial kernel's loop stages: a mask's tile is loaded a step before the rows it gates, so masked
        # launches take 3 at least (at 2 the mask's load waited in every step; sm_90a, bench/kernel_resources.py)
        stages = max(loop_stages(cfg), 3 if has_mask else 1)
        part_out = torch.empty((queries * h * splits, c_pow2), dtype=torch.float32, device=q_nope.device)
        part_lse = torch.empty((queries * h * splits,), dtype=torch.float32, device=q_nope.device)
        partial[(queries, head_blocks, splits)](
            q_lat, q_pe, c_kv, kv_scale if fp8 else q_lat, k_pe, mask_ptr, part_out, part_lse,
            q_lat.stride(0), q_lat.stride(1), q_lat.stride(2), q_pe.stride(0), q_pe.stride(1), q_pe.stride(2),
            c_kv.stride(0), c_kv.stride(1), *(kv_scale.stride() if fp8 else (0, 0)), k_pe.stride(0), k_pe.stride(1),
            *m_args, s, t, h, scale, t - s,
            C=c, C_POW2=c_pow2, R=r, R_POW2=r_pow2, BLOCK_H=bh, BLOCK_T=bt, NUM_SPLITS=splits,
            HAS_MASK=has_mask, CAUSAL=causal, KV_FP8=fp8, FP8_AS_FP16=fp8 and as_fp16,
            STAGES=stages, **launch_opts,
        )
        out_lat = torch.empty((b, s, h, c), dtype=dtype, device=q_nope.device)
        block_c = min(REDUCE_BLOCK_C, c_pow2)
        reduce[(queries, h, c_pow2 // block_c)](
            part_out, part_lse, out_lat, h, out_lat.stride(0), out_lat.stride(1), out_lat.stride(2), s,
            C=c, C_POW2=c_pow2, NUM_SPLITS=splits, SPLITS_POW2=max(2, triton.next_power_of_2(splits)),
            BLOCK_C=block_c,
        )
        # W_UV absorbed into the output: out[b, s, h] = out_lat[b, s, h] @ W_UV[h]^T  ([C] x [C, DV]), in the
        # absorption's own tiling (cuBLAS's batched GEMV took 3.6 us a layer at one query on H100). A one-pass
        # merge with W_UV (one program per query, head and 32 outputs) measured slower even at one query: 11.0
        # against 4.3 + 3.5 us per layer (H200, batch 1, context 2048; bench/RESULTS.md).
        out = torch.empty((b, s, h, dv), dtype=dtype, device=q_nope.device)
        absorb_out = gen.function("mla_absorb_output_kernel", interpret=interpret)
        absorb_out = absorb_out if interpret else torch.library.wrap_triton(absorb_out)
        absorb_out[(q_blocks, h, triton.cdiv(dv, ABSORB_BLOCK_V))](
            out_lat, w, out, *w.stride(), queries, h, dn, DV=dv, C=c, BLOCK_Q=ABSORB_BLOCK_Q, BLOCK_V=ABSORB_BLOCK_V,
            BLOCK_C=min(ABSORB_OUT_BLOCK_C, c_pow2), **({} if interpret else {"num_stages": ABSORB_STAGES}),
        )
        return out
    if path != "expanded":
        raise ValueError(f"mla: path must be 'auto', 'absorbed' or 'expanded', got {path!r}")
    cfg = dict(config or PREFILL_CONFIG)
    bm, bn = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
    tma = cfg.pop("TMA", False)  # the key and value tiles through tensor descriptors, where these tensors allow
    launch_opts = {} if interpret else cfg
    if fp8:  # the prefill expands the latent anyway: dequantized first, as the model's own code does
        c_kv = dequantize_latent(c_kv, kv_scale[..., None], dtype)
    kv = torch.matmul(c_kv, w_kv_b.to(dtype).t()).view(b, t, h, dn + dv)  # k_nope | v for every head
    k_nope, v = kv[..., :dn], kv[..., dn:]
    out = torch.empty((b, s, h, dv), dtype=dtype, device=q_nope.device)
    q_nope = _unit_last(q_nope)
    tma = tma and _descriptors_fit(k_nope, k_pe, v)
    prefill = gen.function("mla_prefill_kernel", interpret=interpret)
    if not interpret:
        prefill = torch.library.wrap_triton(prefill)
        if tma:
            quant_kernels.ensure_allocator()
    if has_mask:
        ranges = mask_tile_ranges(mask4, bm, bn)
        r_args = (ranges.stride(0), ranges.stride(1), ranges.stride(2))
    else:
        ranges, r_args = q_nope, (0, 0, 0)
    prefill[(triton.cdiv(s, bm), b * h)](
        q_nope, q_pe, k_nope, k_pe, v, mask_ptr, ranges, out,
        q_nope.stride(0), q_nope.stride(1), q_nope.stride(2), q_pe.stride(0), q_pe.stride(1), q_pe.stride(2),
        k_nope.stride(0), k_nope.stride(1), k_nope.stride(2), k_pe.stride(0), k_pe.stride(1),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2), *m_args, *r_args,
        s, t, h, scale, t - s,
        DN=dn, DN_POW2=max(16, triton.next_power_of_2(dn)), R=r, R_POW2=max(16, triton.next_power_of_2(r)),
        DV=dv, DV_POW2=max(16, triton.next_power_of_2(dv)), BLOCK_M=bm, BLOCK_N=bn,
        HAS_MASK=has_mask, CAUSAL=causal, TMA=tma, **launch_opts,
    )
    return out


def _descriptors_fit(*tensors: torch.Tensor) -> bool:
    """Whether tensor descriptors take these [B, T, (H,) D] keys and values: unit last stride, 16-byte strides and
    starts (a (batch, head)'s rows start where the descriptor's base does)."""
    return all(t.stride(-1) == 1 and all(st * t.element_size() % 16 == 0 for st in t.stride()[:-1])
               and quant_kernels.aligned(t) for t in tensors)


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _check(q_nope, q_pe, c_kv, k_pe, w_kv_b, kv_scale=None):
    if q_nope.dim() != 4 or q_pe.dim() != 4 or q_nope.shape[:3] != q_pe.shape[:3]:
        raise ValueError(f"mla: q_nope and q_pe must be [B, S, H, d], got {tuple(q_nope.shape)}, {tuple(q_pe.shape)}")
    b, _, h, dn = q_nope.shape
    if c_kv.dim() != 3 or k_pe.dim() != 3 or c_kv.shape[:2] != k_pe.shape[:2] or c_kv.shape[0] != b:
        raise ValueError(f"mla: c_kv [B, T, C] and k_pe [B, T, R] expected, got {tuple(c_kv.shape)}, "
                         f"{tuple(k_pe.shape)}")
    if k_pe.shape[-1] != q_pe.shape[-1]:
        raise ValueError("mla: q_pe and k_pe must have the same rope width")
    if w_kv_b.dim() != 2 or w_kv_b.shape[1] != c_kv.shape[-1] or w_kv_b.shape[0] % h or w_kv_b.shape[0] // h <= dn:
        raise ValueError(f"mla: w_kv_b {tuple(w_kv_b.shape)} is not [H*(DN+DV), C] for H={h}, DN={dn}, "
                         f"C={c_kv.shape[-1]}")
    if (c_kv.dtype == FP8) != (kv_scale is not None):
        raise TypeError(f"mla: an FP8 c_kv needs kv_scale (one fp32 scale per token), and only an FP8 one takes "
                        f"it; got c_kv {c_kv.dtype} and kv_scale {None if kv_scale is None else kv_scale.dtype}")
    if kv_scale is not None:
        if kv_scale.dtype != torch.float32 or kv_scale.shape not in (c_kv.shape[:2], (*c_kv.shape[:2], 1)):
            raise ValueError(f"mla: kv_scale must be fp32 [B, T] or [B, T, 1] for c_kv {tuple(c_kv.shape)}, got "
                             f"{kv_scale.dtype} {tuple(kv_scale.shape)}")
    latent_dtype = q_nope.dtype if kv_scale is None else FP8
    if q_nope.dtype not in TRITON_DTYPES or any(x.dtype != q_nope.dtype for x in (q_pe, k_pe)) \
            or c_kv.dtype != latent_dtype:
        raise TypeError("mla: q, c_kv and k_pe must share one float dtype (or c_kv be FP8, with its scales)")


def reference(q_nope, q_pe, c_kv, k_pe, w_kv_b, scale: float, causal: bool, mask=None,
              kv_scale=None) -> torch.Tensor:
    """Plain torch, the cache expanded per head (the naive form); accumulates in q's dtype's accumulator. An
    FP8 c_kv is dequantized with its per-token ``kv_scale`` in that accumulator's dtype."""
    b, s, h, dn = q_nope.shape
    t = c_kv.shape[1]
    acc = torch.float64 if q_nope.dtype == torch.float64 else torch.float32
    if kv_scale is not None:
        c_kv = dequantize_latent(c_kv, kv_scale.reshape(b, t, 1).to(acc), acc)
    w = w_kv_b.to(acc).view(h, -1, c_kv.shape[-1])
    k_nope = torch.einsum("btc,hdc->bthd", c_kv.to(acc), w[:, :dn])
    v = torch.einsum("btc,hdc->bthd", c_kv.to(acc), w[:, dn:])
    scores = torch.einsum("bshd,bthd->bhst", q_nope.to(acc), k_nope)
    scores = (scores + torch.einsum("bshr,btr->bhst", q_pe.to(acc), k_pe.to(acc))) * scale
    if mask is not None:
        m4 = _mask_4d(mask, b, h, s, t)
        scores = scores + m4.to(acc)
    if causal:
        keys = torch.arange(t, device=scores.device)
        queries = torch.arange(s, device=scores.device) + (t - s)
        scores = scores.masked_fill(keys[None, :] > queries[:, None], float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.einsum("bhst,bthd->bshd", probs, v).to(q_nope.dtype)


def flops(b: int, s: int, t: int, h: int, dn: int, r: int, dv: int, causal: bool) -> float:
    """Attention FLOPs of the expanded form (the useful work), halved-ish for causal prefill."""
    pairs = b * h * (s * t - (s * (s - 1) // 2 if causal and s == t else 0))
    return 2.0 * pairs * (dn + r + dv)


def latent_bytes(b: int, t: int, c: int, r: int, itemsize: int) -> int:
    return b * t * (c + r) * itemsize


def mha_cache_bytes_per_token(h: int, dn: int, r: int, dv: int, itemsize: int) -> int:
    """What an MHA cache of the same attention would hold per token and layer: per-head keys and values."""
    return h * (dn + r + dv) * itemsize

