"""A DeepSeek-V2/V3 decoder in plain torch: the reference deepfuse's kernels are checked against.

Parameter names are the DeepSeek/Hugging Face checkpoint names (``q_a_proj``, ``kv_a_proj_with_mqa``,
``kv_a_layernorm``, ``kv_b_proj``, ``mlp.gate``, ...); local variables use the paper's (``c_kv``, ``k_pe``,
``q_nope``, ``q_pe``). Routed experts are stored stacked, ``experts.gate_up_proj`` [E, 2I, H] and
``experts.down_proj`` [E, H, I], the layout grouped GEMMs read.

Multi-head Latent Attention caches, per token and layer, only the normalized latent ``c_kv``
(kv_lora_rank values) and the roped, head-shared ``k_pe`` (qk_rope_head_dim values): 576 values for V2
dims, against 2 * 16 * 128 * ... for an MHA cache. Two ways to attend over it sit side by side:
``naive`` re-expands the cache into per-head keys and values with ``kv_b_proj``; ``absorb`` folds
``kv_b_proj``'s key half into the query and its value half into the output, and never expands the cache.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import deepfuse.runtime.ops  # noqa: F401  (registers deepfuse::fp8_block_dequantize, which FP8 experts read through)
from deepfuse.runtime.kernels import quant
from deepfuse.runtime.latent_cache import LatentKVCache, LayerCache
from .config import DeepSeekConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def _apply_keeping_formats(module: nn.Module, names, apply, fn, recurse):
    """``module._apply(fn)`` with the parameters ``names`` (FP8 weights and their fp32 scales) moved to fn's
    device but kept in their dtypes: device moves apply to them, dtype casts (model.bfloat16()) do not."""
    kept = {name: module._parameters.pop(name) for name in names}
    try:
        apply(fn, recurse)
    finally:
        target = fn(torch.empty(0, device=next(iter(kept.values())).device)).device
        for name, p in kept.items():
            data = torch.empty_like(p, device=target) if p.is_meta else p.data.to(target)
            module._parameters[name] = nn.Parameter(data, requires_grad=False)
    return module


class Linear(nn.Module):
    """``nn.Linear`` that can hold its weight in FP8, as DeepSeek-V3's checkpoints do: float8_e4m3fn with one
    fp32 scale per [bn, bk] block, ``weight_scale_inv`` [ceil(N / bn), ceil(K / bk)] (dequantized weight =
    weight * scale). Its forward is the W8A8 math DeepSeek-V3's inference runs, written out: activations
    quantized per token and bk-wide tile (s = max|x| / 448), both operands dequantized, the product in fp32."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, fp8_block=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.block = tuple(fp8_block) if fp8_block else None
        if self.block is None:
            self.weight = nn.Parameter(torch.empty(out_features, in_features))
        else:
            bn, bk = self.block
            self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn),
                                       requires_grad=False)
            self.weight_scale_inv = nn.Parameter(torch.empty(-(-out_features // bn), -(-in_features // bk)),
                                                 requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def dequantized_weight(self) -> torch.Tensor:
        if self.block is None:
            return self.weight
        return quant.dequantize_weight(self.weight, self.weight_scale_inv, "fp8-block", self.block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.block is None:
            return F.linear(x, self.weight, self.bias)
        group = self.block[1]
        x_q = quant.dequantize_activation(*quant.quantize_activation(x, group), group)
        bias = self.bias.float() if self.bias is not None else None
        return F.linear(x_q, self.dequantized_weight(), bias).to(x.dtype)

    @torch.no_grad()
    def quantize_(self, weight: torch.Tensor) -> None:
        """Store ``weight`` (float, [out, in]) in this layer's FP8 format."""
        q, s = quant.quantize_weight(weight, "fp8-block", self.block)
        self.weight.data, self.weight_scale_inv.data = q.to(self.weight.device), s.to(self.weight.device)

    def _apply(self, fn, recurse=True):
        if self.block is None:
            return super()._apply(fn, recurse)
        return _apply_keeping_formats(self, ("weight", "weight_scale_inv"), super()._apply, fn, recurse)

    def extra_repr(self) -> str:
        fmt = f", fp8 blocks {self.block}" if self.block else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}{fmt}"


# -- rotary embedding (with YaRN) ----------------------------------------------------------------------------


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(config: DeepSeekConfig, device=None) -> torch.Tensor:
    """Inverse frequencies of the rope dims; with YaRN, low frequencies are interpolated by ``factor`` and
    high ones kept, with a linear ramp between the correction dims (DeepSeek's ``precompute_freqs_cis``).
    Computed on ``device``: no host-to-device copy in a step, which a captured CUDA graph could not hold."""
    dim, base = config.qk_rope_head_dim, config.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    rs = config.rope_scaling
    if rs and rs.get("type") == "yarn":
        factor, original = rs["factor"], rs["original_max_position_embeddings"]
        beta_fast, beta_slow = rs.get("beta_fast", 32), rs.get("beta_slow", 1)

        def correction_dim(rotations):
            return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(correction_dim(beta_fast)), 0)
        high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
        ramp = (torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / max(high - low, 0.001)
        keep = 1 - ramp.clamp(0, 1)  # 1: extrapolate (keep the frequency), 0: interpolate
        freqs = freqs / factor * (1 - keep) + freqs * keep
    return freqs


def rope_cos_sin(config: DeepSeekConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = rope_frequencies(config, positions.device)
    angles = positions.float()[:, None] * freqs[None, :]
    rs = config.rope_scaling
    scale = 1.0
    if rs and rs.get("type") == "yarn" and rs.get("mscale") and rs.get("mscale_all_dim"):
        scale = yarn_mscale(rs["factor"], rs["mscale"]) / yarn_mscale(rs["factor"], rs["mscale_all_dim"])
    return angles.cos() * scale, angles.sin() * scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... of the last dim; x is [B, S, heads, rope]."""
    dtype = x.dtype
    x = x.float().unflatten(-1, (-1, 2))
    x0, x1 = x[..., 0], x[..., 1]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).to(dtype)


# -- Multi-head Latent Attention -----------------------------------------------------------------------------


def causal_mask(queries: int, keys: int, device) -> torch.Tensor:
    """The additive [queries, keys] mask of the last ``queries`` of ``keys`` positions: query i sees keys
    0 .. keys - queries + i. Built from sizes alone in each layer, so a compiler sees it is causal even when
    it compiles the layers one by one (deepfuse's mla pass then applies causality and reads no mask)."""
    k = torch.arange(keys, device=device)
    q = torch.arange(keys - queries, keys, device=device)
    return torch.zeros(queries, keys, device=device).masked_fill(k[None, :] > q[:, None], float("-inf"))


class MLA(nn.Module):
    def __init__(self, config: DeepSeekConfig, layer_idx: int, attn_impl: str = "absorb"):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.attn_impl = attn_impl
        self.n_heads = c.num_attention_heads
        self.kv_lora_rank, self.qk_nope_head_dim = c.kv_lora_rank, c.qk_nope_head_dim
        self.qk_rope_head_dim, self.v_head_dim = c.qk_rope_head_dim, c.v_head_dim
        q_out = self.n_heads * c.qk_head_dim
        fp8 = c.fp8_block
        if c.q_lora_rank is None:
            self.q_proj = Linear(c.hidden_size, q_out, fp8_block=fp8)
        else:
            self.q_a_proj = Linear(c.hidden_size, c.q_lora_rank, fp8_block=fp8)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.rms_norm_eps)
            self.q_b_proj = Linear(c.q_lora_rank, q_out, fp8_block=fp8)
        self.kv_a_proj_with_mqa = Linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim, fp8_block=fp8)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, c.rms_norm_eps)
        self.kv_b_proj = Linear(c.kv_lora_rank, self.n_heads * (c.qk_nope_head_dim + c.v_head_dim), fp8_block=fp8)
        self.o_proj = Linear(self.n_heads * c.v_head_dim, c.hidden_size, fp8_block=fp8)
        self.softmax_scale = c.qk_head_dim ** -0.5
        rs = c.rope_scaling
        if rs and rs.get("type") == "yarn" and rs.get("mscale_all_dim"):
            self.softmax_scale *= yarn_mscale(rs["factor"], rs["mscale_all_dim"]) ** 2

    def forward(self, x, start_pos, cos, sin, mask: Optional[torch.Tensor], cache: Optional[LayerCache]):
        bsz, seqlen, _ = x.shape
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(bsz, seqlen, self.n_heads, -1)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin)

        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin).squeeze(2)  # one rope key shared by all heads
        if cache is not None:
            c_kv, k_pe = cache.update(start_pos, c_kv, k_pe)

        wkv_b = self.kv_b_proj.dequantized_weight().to(x.dtype).view(self.n_heads, -1, self.kv_lora_rank)
        w_uk, w_uv = wkv_b[:, : self.qk_nope_head_dim], wkv_b[:, self.qk_nope_head_dim :]
        if self.attn_impl == "naive":
            k_nope = torch.einsum("btc,hdc->bthd", c_kv, w_uk)
            v = torch.einsum("btc,hdc->bthd", c_kv, w_uv)
            scores = torch.einsum("bshd,bthd->bsht", q_nope, k_nope) + torch.einsum("bshr,btr->bsht", q_pe, k_pe)
        else:
            q_latent = torch.einsum("bshd,hdc->bshc", q_nope, w_uk)  # W_UK absorbed into the query
            scores = torch.einsum("bshc,btc->bsht", q_latent, c_kv) + torch.einsum("bshr,btr->bsht", q_pe, k_pe)
        scores = scores.float() * self.softmax_scale
        if mask is None and seqlen > 1:
            mask = causal_mask(seqlen, scores.shape[-1], x.device)
        if mask is not None:
            scores = scores + mask[:, None, :]
        probs = scores.softmax(dim=-1).to(x.dtype)
        if self.attn_impl == "naive":
            out = torch.einsum("bsht,bthd->bshd", probs, v)
        else:
            out = torch.einsum("bshc,hdc->bshd", torch.einsum("bsht,btc->bshc", probs, c_kv), w_uv)  # W_UV absorbed
        return self.o_proj(out.flatten(2))


# -- DeepSeekMoE -------------------------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int, fp8_block=None):
        super().__init__()
        self.gate_proj = Linear(hidden, inter, fp8_block=fp8_block)
        self.up_proj = Linear(hidden, inter, fp8_block=fp8_block)
        self.down_proj = Linear(inter, hidden, fp8_block=fp8_block)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    """The router: scores, optional group-limited selection, top-k, optional renormalization and scaling."""

    def __init__(self, config: DeepSeekConfig):
        super().__init__()
        c = config
        self.top_k, self.n_group, self.topk_group = c.num_experts_per_tok, c.n_group, c.topk_group
        self.scoring_func, self.topk_method = c.scoring_func, c.topk_method
        self.norm_topk_prob, self.routed_scaling_factor = c.norm_topk_prob, c.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(c.n_routed_experts, c.hidden_size))
        if c.topk_method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(torch.zeros(c.n_routed_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.softmax(dim=-1) if self.scoring_func == "softmax" else logits.sigmoid()
        original_scores = scores
        if self.e_score_correction_bias is not None:
            scores = scores + self.e_score_correction_bias  # the bias steers the choice, not the weights
        if self.topk_method != "greedy" and self.n_group > 1:
            grouped = scores.view(x.shape[0], self.n_group, -1)
            if self.e_score_correction_bias is None:
                group_scores = grouped.amax(dim=-1)
            else:
                group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
            keep = group_scores.topk(self.topk_group, dim=-1)[1]
            dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
            scores = grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).flatten(1)
        indices = scores.topk(self.top_k, dim=-1)[1]
        weights = original_scores.gather(1, indices)
        if self.norm_topk_prob and self.top_k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor, indices


class Experts(nn.Module):
    """The routed experts, stacked: y[t] = sum_j weights[t, j] * expert_{indices[t, j]}(x[t]).

    With ``config.fp8_experts`` (a V3-style FP8 config whose 128 x 128 blocks tile the expert matrices) the
    stacked weights are float8_e4m3fn with fp32 block scales ``*_scale_inv`` [E, N/128, K/128], read through
    ``deepfuse::fp8_block_dequantize``, and both projections' inputs are quantized per token and 128-wide tile:
    the W8A8 math of the FP8 ``Linear`` layers."""

    def __init__(self, config: DeepSeekConfig):
        super().__init__()
        e, h, i = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.fp8 = config.fp8_experts
        if not self.fp8:
            self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
            self.down_proj = nn.Parameter(torch.empty(e, h, i))
            return
        fp8, blocks = torch.float8_e4m3fn, lambda n: -(-n // 128)  # noqa: E731
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h, dtype=fp8), requires_grad=False)
        self.gate_up_proj_scale_inv = nn.Parameter(torch.empty(e, blocks(2 * i), blocks(h)), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(e, h, i, dtype=fp8), requires_grad=False)
        self.down_proj_scale_inv = nn.Parameter(torch.empty(e, blocks(h), blocks(i)), requires_grad=False)

    _FP8_NAMES = ("gate_up_proj", "gate_up_proj_scale_inv", "down_proj", "down_proj_scale_inv")

    def weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [E, 2I, H], down [E, H, I]) to multiply with in ``dtype``: FP8 ones dequantized."""
        if not self.fp8:
            return self.gate_up_proj, self.down_proj
        dequantize = torch.ops.deepfuse.fp8_block_dequantize
        return (dequantize(self.gate_up_proj, self.gate_up_proj_scale_inv, dtype),
                dequantize(self.down_proj, self.down_proj_scale_inv, dtype))

    def projection_input(self, v: torch.Tensor) -> torch.Tensor:
        """A projection's input: FP8 experts quantize it per token and 128-wide tile (V3's activations)."""
        return quant.fake_quantize_activation(v) if self.fp8 else v

    @torch.no_grad()
    def quantize_(self, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        """Store float ``gate_up`` [E, 2I, H] and ``down`` [E, H, I] in the FP8 format."""
        from deepfuse.runtime.kernels import moe

        for name, w in (("gate_up_proj", gate_up), ("down_proj", down)):
            q, s = moe.quantize_experts(w.float())
            getattr(self, name).data, getattr(self, f"{name}_scale_inv").data = q, s

    def _apply(self, fn, recurse=True):
        if not self.fp8:
            return super()._apply(fn, recurse)
        return _apply_keeping_formats(self, self._FP8_NAMES, super()._apply, fn, recurse)

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        # Both forms trace whole under Dynamo. torch._grouped_mm takes bf16 only (its shape function says
        # so even where a kernel would run fp32); other dtypes gather each pair's expert weights instead,
        # which costs memory in proportion to tokens * k, fine at the sizes fp32 is used for.
        if x.dtype == torch.bfloat16:
            return self.forward_grouped(x, indices, weights)
        return self.forward_gathered(x, indices, weights)

    def forward_grouped(self, x, indices, weights):
        """The (token, slot) pairs sorted by expert; each expert's rows are one segment of two grouped GEMMs.
        No data-dependent shapes, so Dynamo traces it whole."""
        tokens, k = indices.shape
        w_gate_up, w_down = self.weights(x.dtype)
        experts = w_gate_up.shape[0]
        expert_of_pair, order = indices.flatten().sort(stable=True)
        token_of_pair = order // k
        rows_per_expert = torch.histc(expert_of_pair.float(), bins=experts, min=0, max=experts - 1)
        offsets = rows_per_expert.cumsum(0).to(torch.int32)
        gate, up = torch._grouped_mm(self.projection_input(x[token_of_pair]), w_gate_up.transpose(1, 2),
                                     offs=offsets).chunk(2, -1)
        out = torch._grouped_mm(self.projection_input(F.silu(gate) * up), w_down.transpose(1, 2), offs=offsets)
        out = out * weights.flatten()[order, None]  # fp32: the routing weights are
        unsorted = torch.empty_like(out).index_copy_(0, order, out)
        return unsorted.view(tokens, k, -1).sum(dim=1).to(x.dtype)

    def forward_gathered(self, x, indices, weights):
        """Each (token, slot) pair multiplies by its own expert's weights, gathered: batched matrix-vector."""
        tokens, k = indices.shape
        w_gate_up, w_down = self.weights(x.dtype)
        expert_of_pair = indices.flatten()
        x_of_pair = self.projection_input(x.repeat_interleave(k, dim=0))
        gate_up = torch.bmm(w_gate_up[expert_of_pair], x_of_pair.unsqueeze(-1)).squeeze(-1)
        gate, up = gate_up.chunk(2, dim=-1)
        h = self.projection_input(F.silu(gate) * up)
        out = torch.bmm(w_down[expert_of_pair], h.unsqueeze(-1)).squeeze(-1)
        out = out * weights.flatten()[:, None]
        return out.view(tokens, k, -1).sum(dim=1).to(x.dtype)

    def forward_per_expert(self, x, indices, weights):
        """The same sum, one expert at a time (data-dependent shapes: Dynamo breaks its graph here)."""
        y = torch.zeros_like(x)
        w_gate_up, w_down = self.weights(x.dtype)
        for e in range(w_gate_up.shape[0]):
            token, slot = torch.where(indices == e)
            gate, up = F.linear(self.projection_input(x[token]), w_gate_up[e]).chunk(2, dim=-1)
            out = F.linear(self.projection_input(F.silu(gate) * up), w_down[e])
            y.index_add_(0, token, (out * weights[token, slot, None]).to(x.dtype))
        return y


class MoE(nn.Module):
    def __init__(self, config: DeepSeekConfig):
        super().__init__()
        self.gate = Gate(config)
        self.experts = Experts(config)
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts, config.fp8_block)
            if config.n_shared_experts
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.view(-1, shape[-1])
        weights, indices = self.gate(x)
        y = self.experts(x, indices, weights)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(shape)


# -- the decoder ---------------------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, config: DeepSeekConfig, layer_idx: int, attn_impl: str):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLA(config, layer_idx, attn_impl)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        dense = layer_idx < config.first_k_dense_replace
        self.mlp = MLP(config.hidden_size, config.intermediate_size, config.fp8_block) if dense else MoE(config)

    def forward(self, x, start_pos, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), start_pos, cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DeepSeekModel(nn.Module):
    def __init__(self, config: DeepSeekConfig, attn_impl: str):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i, attn_impl) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DeepSeekForCausalLM(nn.Module):
    def __init__(self, config: DeepSeekConfig, attn_impl: str = "absorb"):
        super().__init__()
        if attn_impl not in ("naive", "absorb"):
            raise ValueError(f"attn_impl must be 'naive' or 'absorb', got {attn_impl!r}")
        self.config = config
        self.model = DeepSeekModel(config, attn_impl)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, start_pos=0, cache: Optional[LatentKVCache] = None,
                logits_to_keep: int = 0):
        """Logits [B, S, vocab] for tokens at positions start_pos .. start_pos + S - 1, in the output projection's
        dtype (not upcast: HF transformers' causal LMs upcast only to compute a loss; at V2-Lite's 2048 x 102400 a
        prefill's fp32 copy is 0.84 GB written).

        ``start_pos`` a Python int: attention over the cache's filled prefix. ``start_pos`` a 0-d int64 tensor
        (with a cache): attention over the whole preallocated cache, the keys past each query masked, so every
        decode step has the same shapes whatever the context (see ``LatentKVCache``; what CUDA graphs need).
        ``logits_to_keep`` N > 0: the logits of the last N positions only ([B, min(N, S), vocab]; HF transformers'
        argument of that name): a prefill that only samples its next token skips the output projection of every
        other position (2048 x 102400 values for V2-Lite at 2048 tokens)."""
        if not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be an int >= 0 (0: every position), got {logits_to_keep!r}")
        bsz, seqlen = input_ids.shape
        device = input_ids.device
        static = isinstance(start_pos, torch.Tensor)
        if static and cache is None:
            raise ValueError("a tensor start_pos addresses a preallocated cache: pass cache=model.new_cache(...)")
        positions = start_pos + torch.arange(seqlen, device=device)
        cos, sin = rope_cos_sin(self.config, positions)
        mask = None  # a Python start_pos: each layer's attention is causal over the keys at hand (MLA builds it)
        if static:  # query i sees keys 0 .. start_pos + i of the whole preallocated cache
            keys = torch.arange(cache.max_len, device=device)
            mask = torch.zeros(seqlen, keys.shape[0], device=device)
            mask = mask.masked_fill(keys[None, :] > positions[:, None], float("-inf"))
        h = self.model.embed_tokens(input_ids)
        for i, layer in enumerate(self.model.layers):
            h = layer(h, start_pos, cos, sin, mask, cache.layers[i] if cache is not None else None)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return self.lm_head(self.model.norm(h))

    def new_cache(self, batch: int, max_len: int, dtype: Optional[torch.dtype] = None,
                  fp8: bool = False) -> LatentKVCache:
        """A preallocated latent cache; ``fp8``: c_kv in FP8 with per-token scales (see ``LatentKVCache``)."""
        p = self.lm_head.weight
        return LatentKVCache(self.config, batch, max_len, dtype or p.dtype, p.device, fp8=fp8)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> "DeepSeekForCausalLM":
        """Seeded random init (normal(0, initializer_range) for matrices, ones for norms, zero router bias)."""
        gen = torch.Generator(device=self.lm_head.weight.device).manual_seed(seed)
        std = self.config.initializer_range
        fp8 = {f"{name}.{p}" for name, m in self.named_modules() if isinstance(m, Linear) and m.block
               for p in ("weight", "weight_scale_inv")}
        fp8 |= {f"{name}.{p}" for name, m in self.named_modules() if isinstance(m, Experts) and m.fp8
                for p in Experts._FP8_NAMES}
        draw = lambda p: torch.empty(p.shape, device=p.device).normal_(0.0, std, generator=gen)  # noqa: E731
        for name, p in self.named_parameters():
            if name in fp8:  # drawn in fp32, then stored in the layer's FP8 format
                if name.endswith(".weight"):
                    self.get_submodule(name[: -len(".weight")]).quantize_(draw(p))
                elif name.endswith("experts.gate_up_proj"):
                    experts = self.get_submodule(name[: -len(".gate_up_proj")])
                    experts.quantize_(draw(p), draw(experts.down_proj))
            elif name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("e_score_correction_bias"):
                p.zero_()
            else:
                p.normal_(0.0, std, generator=gen)
        return self

    @classmethod
    def from_config(cls, config: DeepSeekConfig, device=None, dtype=torch.float32, seed: int = 0, attn_impl="absorb"):
        """Build directly on ``device`` (no CPU copy of the weights) with seeded random weights."""
        with torch.device("meta"):
            model = cls(config, attn_impl)
        model = model.to_empty(device=device or "cpu").to(dtype)  # FP8 Linear layers keep their formats
        for m in model.modules():
            if isinstance(m, Gate) and m.e_score_correction_bias is not None:
                m.e_score_correction_bias.data = m.e_score_correction_bias.data.float()
        return model.init_weights(seed).eval()


@torch.no_grad()
def generate(
    model: DeepSeekForCausalLM,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    forward=None,
    static_cache: bool = False,
    cuda_graph: bool = False,
    fp8_cache: bool = False,
) -> torch.Tensor:
    """Greedy (temperature 0) or sampled generation over the latent cache; returns [B, max_new_tokens].

    ``forward`` is what runs each step (default: the model itself; pass a torch.compile'd model); the prefill calls
    it with ``logits_to_keep=1`` (only the last position's logits are sampled from).
    ``static_cache``: the decode steps' positions go in as device tensors and every step attends over the whole
    preallocated cache (masked), so all decode steps share one compiled graph and one CUDA graph; use it with
    ``mode="reduce-overhead"``.
    ``cuda_graph`` (needs ``static_cache``): the decode steps run as one captured CUDA graph
    (``deepfuse.runtime.cuda_graph.CapturedStep``), for a model compiled block by block without
    ``mode="reduce-overhead"``; the prefill runs as is.
    ``fp8_cache``: the latent cache holds c_kv in FP8 with per-token scales (``model.new_cache(fp8=True)``)."""
    forward = model if forward is None else forward
    if cuda_graph and not static_cache:
        raise ValueError("generate(cuda_graph=True) needs static_cache=True: a captured step must keep its shapes")
    decode = forward
    if cuda_graph:
        from deepfuse.runtime.cuda_graph import CapturedStep

        decode = CapturedStep(forward)
    bsz, plen = prompt.shape
    cache = model.new_cache(bsz, plen + max_new_tokens, fp8=fp8_cache)
    # The prefill addresses the cache's prefix (a Python position) either way: it runs once, and its mask is
    # then the plain causal one, which deepfuse's kernels apply without reading a mask.
    logits = forward(prompt, 0, cache, logits_to_keep=1)[:, -1]
    position = torch.tensor(plen, device=prompt.device) if static_cache else plen
    out = []
    for i in range(max_new_tokens):
        token = _sample(logits, temperature, top_k, generator)
        out.append(token)
        if i + 1 < max_new_tokens:
            logits = decode(token[:, None], position, cache)[:, -1]
            position = position + 1
    return torch.stack(out, dim=1)


def _sample(logits, temperature, top_k, generator):
    logits = logits.float()  # one row per sequence: sampled in fp32 whatever the model's dtype
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1)[0][:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)
