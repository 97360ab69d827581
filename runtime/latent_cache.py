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
"""
from __future__ import annotations

import torch


class LayerCache:
    """One layer's part of a ``LatentKVCache``: c_kv [B, T, kv_lora_rank] and k_pe [B, T, rope]. A decoder block
    takes its layer's part, so the blocks' code never reads a layer index: one compiled graph serves every block
    of the same kind (regional compilation)."""

    def __init__(self, kv: torch.Tensor, pe: torch.Tensor):
        self.kv, self.pe = kv, pe
        self.max_len = kv.shape[1]
        # Static for CUDA graphs, but not guarded by identity: another layer's part, or a new cache of the same
        # shape, reuses the compiled code (CUDA graphs record for the new addresses) instead of recompiling.
        torch._dynamo.mark_static_address(kv, guard=False)
        torch._dynamo.mark_static_address(pe, guard=False)

    def update(self, start_pos, c_kv: torch.Tensor, k_pe: torch.Tensor):
        """Write the new positions; return what attention reads (see the module docstring)."""
        bsz, seqlen = c_kv.shape[:2]
        if isinstance(start_pos, torch.Tensor):  # static addressing: positions by index, the whole buffer back
            positions = start_pos + torch.arange(seqlen, device=start_pos.device)
            self.kv[:bsz, positions] = c_kv
            self.pe[:bsz, positions] = k_pe
            return self.kv[:bsz], self.pe[:bsz]
        end = start_pos + seqlen
        if end > self.max_len:
            raise ValueError(f"latent cache holds {self.max_len} positions; asked to write up to {end}")
        self.kv[:bsz, start_pos:end] = c_kv
        self.pe[:bsz, start_pos:end] = k_pe
        return self.kv[:bsz, :end], self.pe[:bsz, :end]


class LatentKVCache:
    """Preallocated; ``layers[i]`` is layer i's part, which its block writes in place and reads. Each layer's
    buffers are their own allocations, not views of one: a model compiled whole then takes 2 * layers distinct
    static inputs, where views of one buffer would be aliased inputs that AOTAutograd rebuilds from a copy."""

    def __init__(self, config, batch: int, max_len: int, dtype: torch.dtype, device):
        def buffer(width):
            return torch.zeros(batch, max_len, width, dtype=dtype, device=device)

        self.max_len = max_len
        self.layers = [LayerCache(buffer(config.kv_lora_rank), buffer(config.qk_rope_head_dim))
                       for _ in range(config.num_hidden_layers)]

    @property
    def kv(self) -> torch.Tensor:
        """Every layer's c_kv, [layers, B, T, kv_lora_rank]: a copy, for reading."""
        return torch.stack([layer.kv for layer in self.layers])

    @property
    def pe(self) -> torch.Tensor:
        """Every layer's k_pe, [layers, B, T, rope]: a copy, for reading."""
        return torch.stack([layer.pe for layer in self.layers])

    def bytes_per_token_per_layer(self) -> int:
        first = self.layers[0]
        return (first.kv.shape[-1] + first.pe.shape[-1]) * first.kv.element_size()
