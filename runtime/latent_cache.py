"""The latent KV cache MLA attends over: per layer, c_kv [B, T, kv_lora_rank] and k_pe [B, T, rope].

Preallocated and contiguous, written in place: a decode step's shapes do not depend on how full it is
except through the filled prefix it returns, and nothing in ``update`` syncs with the host, so steps can be
captured in CUDA graphs. 576 values per token and layer at V2 dims, against 16 * (192 + 128) for an MHA
cache of the same attention (``bytes_per_token_per_layer``, and the mla pass's explain row).
"""
from __future__ import annotations

import torch


class LatentKVCache:
    """Preallocated, contiguous; ``update`` writes the new positions in place and returns the filled prefix."""

    def __init__(self, config, batch: int, max_len: int, dtype: torch.dtype, device):
        shape = (config.num_hidden_layers, batch, max_len)
        self.kv = torch.zeros(*shape, config.kv_lora_rank, dtype=dtype, device=device)
        self.pe = torch.zeros(*shape, config.qk_rope_head_dim, dtype=dtype, device=device)
        self.max_len = max_len

    def update(self, layer: int, start_pos: int, c_kv: torch.Tensor, k_pe: torch.Tensor):
        bsz, seqlen = c_kv.shape[:2]
        end = start_pos + seqlen
        if end > self.max_len:
            raise ValueError(f"latent cache holds {self.max_len} positions; asked to write up to {end}")
        self.kv[layer, :bsz, start_pos:end] = c_kv
        self.pe[layer, :bsz, start_pos:end] = k_pe
        return self.kv[layer, :bsz, :end], self.pe[layer, :bsz, :end]

    def bytes_per_token_per_layer(self) -> int:
        return (self.kv.shape[-1] + self.pe.shape[-1]) * self.kv.element_size()
