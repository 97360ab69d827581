"""The latent KV cache MLA attends over: per layer, c_kv [B, T, kv_lora_rank] and k_pe [B, T, rope].

Preallocated and contiguous, written in place, and nothing in ``update`` syncs with the host. Two ways to
address it:
- ``start_pos`` a Python int: the new positions are written at start_pos.. and the filled prefix is returned.
  Its length grows each step, so a compiled decode step changes shape with the context.
- ``start_pos`` a tensor (int64, on the cache's device): the positions are written by index and the whole
  buffer is returned, ``max_len`` long; the model masks the keys past each query. A decode step then has one
  shape for every context length: compiled once, captured once in a CUDA graph (``mode="reduce-overhead"``).
  The buffers are marked as static addresses for that (``torch._dynamo.mark_static_address``), so CUDA graphs
  may update them in place.
Each layer reads and writes its own ``LayerCache``: a block's code holds no layer index, so compiling the
decoder block by block (``layer.compile(...)`` for each) compiles one graph per kind of block, not per layer.
576 values per token and layer at V2 dims, against 16 * (192 + 128) for an MHA cache of the same attention
(``bytes_per_token_per_layer``, and the mla pass's explain row).

``fp8=True`` stores c_kv in float8_e4m3fn with one fp32 scale per token (its row's amax / 448) and keeps k_pe in
the model's dtype, as FlashMLA's FP8 cache does: the rope key is an eighth of the row and the part that
positions tokens. V2 dims, bf16: 512 + 4 + 2 * 64 = 644 bytes per token and layer, against 1152. ``update``
returns c_kv dequantized in plain torch (the readable reference, which eager runs); the mla pass recognizes
that dequantization and hands the kernels the FP8 rows and scales, so the cache is read in FP8.
"""
from __future__ import annotations

from typing import Optional

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # e4m3's largest finite value


def quantize_latent(c_kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """c_kv [..., C] -> (FP8 [..., C], fp32 scale [..., 1]): one scale per token, its row's amax / 448, so the
    row's largest value maps to the grid's end. An all-zero row gets a tiny scale, not a division by zero."""
    scale = c_kv.float().abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / FP8_MAX
    return (c_kv.float() / scale).to(FP8), scale


def dequantize_latent(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The inverse: FP8 [..., C] times the per-token scale [..., 1], in fp32, cast to ``dtype``."""
    return (q.float() * scale).to(dtype)


def bytes_per_token(kv: torch.Tensor, pe: torch.Tensor, kv_scale: Optional[torch.Tensor] = None) -> int:
    """What one token costs in one layer: its latent row and rope key (and, in FP8, its scale), from the
    buffers' (or any tensors of their layout's) last dims and dtypes."""
    return sum(x.shape[-1] * x.element_size() for x in (kv, pe, kv_scale) if x is not None)


class LayerCache:
    """One layer's part of a ``LatentKVCache``: c_kv [B, T, kv_lora_rank] and k_pe [B, T, rope]. A decoder block
    takes its layer's part, so the blocks' code never reads a layer index: one compiled graph serves every block
    of the same kind (regional compilation)."""

    def __init__(self, kv: torch.Tensor, pe: torch.Tensor, kv_scale: Optional[torch.Tensor] = None):
        if (kv.dtype == FP8) != (kv_scale is not None):
            raise ValueError("an FP8 latent needs its per-token scales [B, T, 1], and only an FP8 one takes them")
        self.kv, self.pe, self.kv_scale = kv, pe, kv_scale
        self.max_len = kv.shape[1]
        # Static for CUDA graphs, but not guarded by identity: another layer's part, or a new cache of the same
        # shape, reuses the compiled code (CUDA graphs record for the new addresses) instead of recompiling.
        for buffer in (kv, pe) if kv_scale is None else (kv, pe, kv_scale):
            torch._dynamo.mark_static_address(buffer, guard=False)

    def bytes_per_token(self) -> int:
        return bytes_per_token(self.kv, self.pe, self.kv_scale)

    def update(self, start_pos, c_kv: torch.Tensor, k_pe: torch.Tensor):
        """Write the new positions; return what attention reads (see the module docstring)."""
        bsz, seqlen = c_kv.shape[:2]
        if isinstance(start_pos, torch.Tensor):  # static addressing: positions by index, the whole buffer back
            where = (slice(None, bsz), start_pos + torch.arange(seqlen, device=start_pos.device))
            read = (slice(None, bsz),)
        else:
            end = start_pos + seqlen
            if end > self.max_len:
                raise ValueError(f"latent cache holds {self.max_len} positions; asked to write up to {end}")
            where, read = (slice(None, bsz), slice(start_pos, end)), (slice(None, bsz), slice(None, end))
        self.pe[where] = k_pe
        if self.kv_scale is None:
            self.kv[where] = c_kv
            return self.kv[read], self.pe[read]
        q, scale = quantize_latent(c_kv)
        self.kv[where] = q
        self.kv_scale[where] = scale
        return dequantize_latent(self.kv[read], self.kv_scale[read], c_kv.dtype), self.pe[read]


class LatentKVCache:
    """Preallocated; ``layers[i]`` is layer i's part, which its block writes in place and reads. Each layer's
    buffers are their own allocations, not views of one: a model compiled whole then takes 2 * layers distinct
    static inputs (3 * layers in FP8), where views of one buffer would be aliased inputs that AOTAutograd
    rebuilds from a copy."""

    def __init__(self, config, batch: int, max_len: int, dtype: torch.dtype, device, fp8: bool = False):
        def buffer(width, dtype=dtype):
            return torch.zeros(batch, max_len, width, dtype=dtype, device=device)

        def layer():
            if not fp8:
                return LayerCache(buffer(config.kv_lora_rank), buffer(config.qk_rope_head_dim))
            return LayerCache(buffer(config.kv_lora_rank, FP8), buffer(config.qk_rope_head_dim),
                              buffer(1, torch.float32))

        self.max_len = max_len
        self.layers = [layer() for _ in range(config.num_hidden_layers)]

    @property
    def kv(self) -> torch.Tensor:
        """Every layer's c_kv, [layers, B, T, kv_lora_rank]: a copy, for reading."""
        return torch.stack([layer.kv for layer in self.layers])

    @property
    def pe(self) -> torch.Tensor:
        """Every layer's k_pe, [layers, B, T, rope]: a copy, for reading."""
        return torch.stack([layer.pe for layer in self.layers])

    def bytes_per_token_per_layer(self) -> int:
        return self.layers[0].bytes_per_token()
