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
576 values per token and layer at V2 dims, against 16 * (192 + 128) for an MHA cache of the same attention
(``bytes_per_token_per_layer``, and the mla pass's explain row).
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
        # Static for CUDA graphs, but not guarded by identity: a new cache of the same shape reuses the
        # compiled step (CUDA graphs re-record for the new addresses) instead of recompiling.
        torch._dynamo.mark_static_address(self.kv, guard=False)
        torch._dynamo.mark_static_address(self.pe, guard=False)

    def update(self, layer: int, start_pos, c_kv: torch.Tensor, k_pe: torch.Tensor):
        bsz, seqlen = c_kv.shape[:2]
        if isinstance(start_pos, torch.Tensor):  # static addressing: positions by index, the whole buffer back
            positions = start_pos + torch.arange(seqlen, device=start_pos.device)
            self.kv[layer, :bsz, positions] = c_kv
            self.pe[layer, :bsz, positions] = k_pe
            return self.kv[layer, :bsz], self.pe[layer, :bsz]
        end = start_pos + seqlen
        if end > self.max_len:
            raise ValueError(f"latent cache holds {self.max_len} positions; asked to write up to {end}")
        self.kv[layer, :bsz, start_pos:end] = c_kv
        self.pe[layer, :bsz, start_pos:end] = k_pe
        return self.kv[layer, :bsz, :end], self.pe[layer, :bsz, :end]

    def bytes_per_token_per_layer(self) -> int:
        return (self.kv.shape[-1] + self.pe.shape[-1]) * self.kv.element_size()
