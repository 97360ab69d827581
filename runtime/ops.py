"""The ``deepfuse::`` custom ops the passes rewrite matched regions into.

Each op is functional (fresh outputs, no aliasing), has a fake implementation so shapes flow through
Inductor, and takes an ``impl`` argument chosen at compile time and visible in the rewritten graph:
``"triton"`` (the generated kernel on the GPU), ``"interpret"`` (the same kernel through Triton's CPU
interpreter), or ``"reference"`` (plain torch).
"""
from __future__ import annotations

from typing import Optional

import torch

from deepfuse.runtime.kernels import linear_group as _linear_group
from deepfuse.runtime.kernels import mla as _mla
from deepfuse.runtime.kernels import moe as _moe
from deepfuse.runtime.kernels import quant as _quant
from deepfuse.runtime.kernels import rms_norm as _rms
from deepfuse.runtime.kernels import routing as _routing

IMPLS = ("triton", "interpret", "reference")


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"deepfuse op impl must be one of {IMPLS}, got {impl!r}")


@torch.library.custom_op("deepfuse::rms_norm", mutates_args=())
def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, cast_before_weight: bool, out_dtype: torch.dtype, impl: str
) -> torch.Tensor:
    _check_impl(impl)
    if impl == "reference":
        return _rms.reference(x, weight, None, eps, cast_before_weight, out_dtype)[0]
    return _rms.launch(x, weight, None, eps, cast_before_weight, out_dtype, interpret=impl == "interpret")[0]


@rms_norm.register_fake
def _(x, weight, eps, cast_before_weight, out_dtype, impl):
    return x.new_empty(x.shape, dtype=out_dtype)


@torch.library.custom_op("deepfuse::add_rms_norm", mutates_args=())
def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    cast_before_weight: bool,
    out_dtype: torch.dtype,
    impl: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual)."""
    _check_impl(impl)
    if impl == "reference":
        return _rms.reference(x, weight, residual, eps, cast_before_weight, out_dtype)
    return _rms.launch(x, weight, residual, eps, cast_before_weight, out_dtype, interpret=impl == "interpret")


@add_rms_norm.register_fake
def _(x, residual, weight, eps, cast_before_weight, out_dtype, impl):
    return x.new_empty(x.shape, dtype=out_dtype), torch.empty_like(x)


@torch.library.custom_op("deepfuse::moe_experts", mutates_args=())
def moe_experts(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    activation: str,
    out_dtype: torch.dtype,
    impl: str,
    deterministic: bool = True,
    shared_gate: Optional[torch.Tensor] = None,
    shared_up: Optional[torch.Tensor] = None,
    shared_down: Optional[torch.Tensor] = None,
    shared_scale: Optional[torch.Tensor] = None,
    gate_up_scale: Optional[torch.Tensor] = None,
    down_scale: Optional[torch.Tensor] = None,
    act_quant: bool = False,
    shared_gate_scale: Optional[torch.Tensor] = None,
    shared_up_scale: Optional[torch.Tensor] = None,
    shared_down_scale: Optional[torch.Tensor] = None,
    gate_up_bias: Optional[torch.Tensor] = None,
    down_bias: Optional[torch.Tensor] = None,
    interleaved: bool = False,
    gated: bool = True,
) -> torch.Tensor:
    """The routed experts: x [T, H], ids/weights [T, k], w_gate_up [E, 2I, H], w_down [E, H, I] -> [T, H];
    plus the shared MLP (gate/up [S*I, H], down [H, S*I]; or S stacked shared experts, gate/up [S, I, H] and
    down [S, H, I]) when given, times shared_scale [T] or [T, 1] per token when given (a gated shared expert), or
    [T, S] per token and stacked shared expert. With gate_up_scale and down_scale the expert weights are FP8 with
    those fp32 scales per 128 x 128 block, multiplied as dequantized: with ``act_quant`` both projections'
    inputs quantized per row and 128-wide tile (W8A8), else in their dtype (W8A16); FP8 shared weights come
    with their block scales (shared_*_scale). gate_up_bias [E, 2I] and down_bias [E, H]: per-expert biases, and
    ``interleaved`` gate/up rows (GPT-OSS's experts; float weights, no shared MLP). ``gated=False``: ungated
    experts, down(act(up(x))) (Nemotron-H's): w_gate_up is the up weights [E, I, H], a shared MLP's gate None."""
    _check_impl(impl)
    shared = (shared_gate, shared_up, shared_down) if shared_down is not None else None
    scales = (gate_up_scale, down_scale) if gate_up_scale is not None else None
    biases = (gate_up_bias, down_bias) if gate_up_bias is not None else None
    shared_scales = (shared_gate_scale, shared_up_scale, shared_down_scale) if shared_gate_scale is not None else None
    if act_quant and scales is None:
        raise ValueError("deepfuse::moe_experts: act_quant needs FP8 expert weights (gate_up_scale, down_scale)")
    if impl == "reference":
        if act_quant:
            compute = torch.float64 if x.dtype == torch.float64 else torch.float32
            return _moe.reference_fp8(x, topk_ids, topk_weights, w_gate_up, w_down, scales, activation, compute,
                                      act_quant=True, shared=shared, shared_scales=shared_scales,
                                      shared_scale=shared_scale).to(out_dtype)

        def dequantized(w, s):  # in fp32, then x's dtype: as fp8_block_dequantize (the model's own form) does
            return _moe.dequantize_experts(w, s, torch.float32).to(x.dtype)

        if scales is not None:
            w_gate_up, w_down = dequantized(w_gate_up, gate_up_scale), dequantized(w_down, down_scale)
        if shared_scales is not None:
            shared = tuple(dequantized(w, s) for w, s in zip(shared, shared_scales))
        return _moe.reference(x, topk_ids, topk_weights, w_gate_up, w_down, activation, shared,
                              shared_scale, biases, interleaved, gated).to(out_dtype)
    return _moe.moe_experts(x, topk_ids, topk_weights, w_gate_up, w_down, activation,
                            interpret=impl == "interpret", deterministic=deterministic, shared=shared,
                            shared_scale=shared_scale, weight_scales=scales, act_quant=act_quant,
                            shared_scales=shared_scales, biases=biases, interleaved=interleaved,
                            gated=gated).to(out_dtype)


@moe_experts.register_fake
def _(x, topk_ids, topk_weights, w_gate_up, w_down, activation, out_dtype, impl, deterministic=True,
      shared_gate=None, shared_up=None, shared_down=None, shared_scale=None, gate_up_scale=None, down_scale=None,
      act_quant=False, shared_gate_scale=None, shared_up_scale=None, shared_down_scale=None, gate_up_bias=None,
      down_bias=None, interleaved=False, gated=True):
    return x.new_empty(x.shape, dtype=out_dtype)


@torch.library.custom_op("deepfuse::fp8_block_dequantize", mutates_args=())
def fp8_block_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """FP8 weights [..., N, K] with fp32 scales [..., N/128, K/128] (one per 128 x 128 block, rounded up) ->
    ``dtype``: the plain form of a weight ``options={"quantize": "fp8-block"}`` stored in FP8 (stacked expert
    weights), which the moe pass reads through to run the FP8 experts kernels."""
    return _moe.dequantize_experts(q, scale, torch.float32).to(dtype)


@fp8_block_dequantize.register_fake
def _(q, scale, dtype):
    return q.new_empty(q.shape, dtype=dtype)


@torch.library.custom_op("deepfuse::router_topk", mutates_args=())
def router_topk(scores: torch.Tensor, k: int, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A router's top-k over [T, E] scores: (values, int64 indices), sorted descending."""
    _check_impl(impl)
    if impl == "reference":
        values, indices = torch.topk(scores, k, dim=-1)
        return values, indices
    return _moe.router_topk(scores, k, interpret=impl == "interpret")


@router_topk.register_fake
def _(scores, k, impl):
    shape = (*scores.shape[:-1], k)
    return scores.new_empty(shape), scores.new_empty(shape, dtype=torch.int64)


@torch.library.custom_op("deepfuse::moe_routing", mutates_args=())
def moe_routing(logits: torch.Tensor, bias: Optional[torch.Tensor], top_k: int, scoring: str, groups: int,
                topk_group: int, group_score: str, fill: float, renormalize: bool, scale: float,
                out_dtype: torch.dtype, impl: str,
                expert_scale: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A router's logits [T, E] to (routing weights [T, top_k] in ``out_dtype``, int64 expert ids), the weights
    times ``expert_scale`` [E] at their ids when given: see ``deepfuse.runtime.kernels.routing``."""
    _check_impl(impl)
    spec = _routing.RoutingSpec(top_k, scoring, bias is not None, groups, topk_group, group_score, fill,
                                renormalize, scale, expert_scale is not None)
    if impl == "reference":
        return _routing.reference(logits.float(), None if bias is None else bias.float(), spec, out_dtype,
                                  None if expert_scale is None else expert_scale.float())
    return _routing.route(logits, bias, spec, out_dtype, interpret=impl == "interpret", expert_scale=expert_scale)


@moe_routing.register_fake
def _(logits, bias, top_k, scoring, groups, topk_group, group_score, fill, renormalize, scale, out_dtype, impl,
      expert_scale=None):
    shape = (logits.shape[0], top_k)
    return logits.new_empty(shape, dtype=out_dtype), logits.new_empty(shape, dtype=torch.int64)


@torch.library.custom_op("deepfuse::moe_router", mutates_args=())
def moe_router(x: torch.Tensor, router_weight: torch.Tensor, bias: Optional[torch.Tensor], mm_dtype: torch.dtype,
               top_k: int, scoring: str, groups: int, topk_group: int, group_score: str, fill: float,
               renormalize: bool, scale: float, out_dtype: torch.dtype, impl: str,
               expert_scale: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``moe_routing`` of the logits ``x.to(mm_dtype) @ router_weight.to(mm_dtype).T`` (x [T, K], router_weight
    [E, K]), the router matmul in the same launch."""
    _check_impl(impl)
    spec = _routing.RoutingSpec(top_k, scoring, bias is not None, groups, topk_group, group_score, fill,
                                renormalize, scale, expert_scale is not None)
    if impl == "reference":
        logits = torch.nn.functional.linear(x.to(mm_dtype), router_weight.to(mm_dtype))
        return _routing.reference(logits.float(), None if bias is None else bias.float(), spec, out_dtype,
                                  None if expert_scale is None else expert_scale.float())
    return _routing.route_hidden(x, router_weight, bias, spec, out_dtype, mm_dtype, interpret=impl == "interpret",
                                 expert_scale=expert_scale)


@moe_router.register_fake
def _(x, router_weight, bias, mm_dtype, top_k, scoring, groups, topk_group, group_score, fill, renormalize, scale,
      out_dtype, impl, expert_scale=None):
    shape = (x.shape[0], top_k)
    return x.new_empty(shape, dtype=out_dtype), x.new_empty(shape, dtype=torch.int64)


@torch.library.custom_op("deepfuse::mla_attention", mutates_args=())
def mla_attention(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    c_kv: torch.Tensor,
    k_pe: torch.Tensor,
    w_kv_b: torch.Tensor,
    mask: Optional[torch.Tensor],
    scale: float,
    causal: bool,
    impl: str,
    kv_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """MLA over the latent: q_nope [B, S, H, DN], q_pe [B, S, H, R], c_kv [B, T, C], k_pe [B, T, R],
    w_kv_b (kv_b_proj.weight) [H*(DN+DV), C], an optional additive or bool mask broadcastable to
    [B, H, S, T] -> [B, S, H, DV]. An FP8 latent cache: c_kv float8_e4m3fn and kv_scale [B, T] fp32."""
    _check_impl(impl)
    if impl == "reference":
        out = _mla.reference(q_nope, q_pe, c_kv, k_pe, w_kv_b, scale, causal, mask, kv_scale)
    else:
        out = _mla.mla_attention(q_nope, q_pe, c_kv, k_pe, w_kv_b, scale, causal, mask, kv_scale,
                                 interpret=impl == "interpret")
    return out.contiguous()  # the layout the fake promises


@mla_attention.register_fake
def _(q_nope, q_pe, c_kv, k_pe, w_kv_b, mask, scale, causal, impl, kv_scale=None):
    b, s, h, dn = q_nope.shape
    return q_nope.new_empty((b, s, h, w_kv_b.shape[0] // h - dn))


@torch.library.custom_op("deepfuse::quant_matmul", mutates_args=())
def quant_matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    fmt: str,
    act_quant: bool,
    block_n: int,
    block_k: int,
    out_dtype: torch.dtype,
    impl: str,
) -> torch.Tensor:
    """x [..., K] @ dequant(w [N, K], scale)^T (+ bias) -> [..., N]. ``fmt`` "fp8-block" (scale [N/block_n,
    K/block_k]; with ``act_quant`` the activations are quantized per token and block_k tile, FP8 x FP8) or
    "int8-channel" (scale [N], weight-only)."""
    _check_impl(impl)
    block = (block_n, block_k)
    if impl == "reference":
        return _quant.reference(x, w, scale, bias, fmt, act_quant, block, out_dtype)
    return _quant.quant_matmul(x, w, scale, bias, fmt, act_quant, block, out_dtype, interpret=impl == "interpret")


@quant_matmul.register_fake
def _(x, w, scale, bias, fmt, act_quant, block_n, block_k, out_dtype, impl):
    return x.new_empty((*x.shape[:-1], w.shape[0]), dtype=out_dtype)


@torch.library.custom_op("deepfuse::quant_matmuls", mutates_args=())
def quant_matmuls(x: torch.Tensor, weights: list[torch.Tensor], scales: list[torch.Tensor],
                  biases: list[Optional[torch.Tensor]], block_n: int, block_k: int, out_dtype: torch.dtype,
                  impl: str) -> list[torch.Tensor]:
    """[quant_matmul(x, w, s, b, "fp8-block", act_quant=True) for each layer], x quantized once for all of them
    (``deepfuse.runtime.kernels.quant.quant_matmuls``)."""
    _check_impl(impl)
    block = (block_n, block_k)
    if impl == "reference":
        return [_quant.reference(x, w, s, b, "fp8-block", True, block, out_dtype)
                for w, s, b in zip(weights, scales, biases)]
    return _quant.quant_matmuls(x, list(weights), list(scales), list(biases), block, out_dtype,
                                interpret=impl == "interpret")


@quant_matmuls.register_fake
def _(x, weights, scales, biases, block_n, block_k, out_dtype, impl):
    return [x.new_empty((*x.shape[:-1], w.shape[0]), dtype=out_dtype) for w in weights]


@torch.library.custom_op("deepfuse::decode_linear", mutates_args=())
def decode_linear(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], impl: str) -> torch.Tensor:
    """x [M, K] @ w [N, K]^T (+ bias) -> [M, N] in x's dtype, the weight read in its own float dtype."""
    _check_impl(impl)
    if impl == "reference":
        return torch.nn.functional.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))
    return _quant.decode_linear(x, w, bias, interpret=impl == "interpret")


@decode_linear.register_fake
def _(x, w, bias, impl):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


@torch.library.custom_op("deepfuse::linear_group", mutates_args=())
def linear_group(x: torch.Tensor, weights: list[torch.Tensor], impl: str, norm_weight: Optional[torch.Tensor],
                 eps: float, weight_scales: list[torch.Tensor]) -> list[torch.Tensor]:
    """[x @ w^T for w in weights]: decode-sized projections of one input in one launch, each weight [N_g, K]
    contiguous in x's dtype, x first RMS-normalized with ``norm_weight`` if given; or, with ``weight_scales`` (one
    per weight; empty for float weights), FP8 W8A8 layers in 128 x 128 blocks
    (``deepfuse.runtime.kernels.linear_group``)."""
    _check_impl(impl)
    weight_scales = list(weight_scales) or None
    _linear_group.check(x, weights, weight_scales)
    if impl == "reference":
        return _linear_group.reference(x, weights, norm_weight, eps, weight_scales)
    return _linear_group.linear_group(x, weights, interpret=impl == "interpret", norm_weight=norm_weight, eps=eps,
                                      weight_scales=weight_scales)


@linear_group.register_fake
def _(x, weights, impl, norm_weight, eps, weight_scales):
    return [x.new_empty((*x.shape[:-1], w.shape[0])) for w in weights]


@torch.library.custom_op("deepfuse::moe_experts_ep", mutates_args=())
def moe_experts_ep(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    slot: int,
    activation: str,
    out_dtype: torch.dtype,
    impl: str,
    deterministic: bool = True,
    micro_batches: int = 1,
    exchange: str = "splits",
) -> torch.Tensor:
    """The routed experts with this rank's share of them (``deepfuse.runtime.expert_parallel``): the tokens'
    (token, slot) pairs travel to the ranks owning their experts and back with all_to_all, in ``micro_batches``
    overlapped chunks, or (``exchange="padded"``) in fixed-size blocks with no host synchronization. ``slot``
    holds the key of the shard to use (``expert_parallel.slot_key``): one compiled graph may run many layers."""
    from deepfuse.runtime import expert_parallel as _ep

    _check_impl(impl)
    shard_key = _ep.slot_key(slot)  # the shard of the layer this call runs (set from its parameters)
    w_gate_up, w_down, shard = _ep.local_experts(shard_key)
    if impl == "reference":
        def experts(xs, ids, ws, a, b):
            return _moe.reference(xs, ids, ws, a, b, activation)
    else:
        def experts(xs, ids, ws, a, b):
            return _moe.moe_experts(xs, ids, ws, a, b, activation, interpret=impl == "interpret",
                                    deterministic=deterministic)
    out = _ep.ep_moe_experts(x, topk_ids, topk_weights, w_gate_up, w_down, shard, experts,
                             counts_out=_ep.counts_buffer(shard_key), micro_batches=micro_batches,
                             exchange=exchange)
    _ep.log_counts(shard_key)
    return out.to(out_dtype)


@moe_experts_ep.register_fake
def _(x, topk_ids, topk_weights, slot, activation, out_dtype, impl, deterministic=True, micro_batches=1,
      exchange="splits"):
    return x.new_empty(x.shape, dtype=out_dtype)
