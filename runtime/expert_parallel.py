"""Expert parallelism on torch.distributed: routed experts sharded across the ranks of a process group, tokens sent
to the ranks that own their experts with ``all_to_all_single``, computed there by the local grouped kernels, and
sent back for the weighted combine.

Layout: with E routed experts over W ranks (W must divide E), rank r owns experts [r * E/W, (r + 1) * E/W). Every
other part of the model (router, shared experts, attention) is replicated. One MoE layer on one rank:

1. each (token, slot) pair goes to rank ``expert // (E / W)``; pairs are sorted by destination rank (stable);
2. the per-destination pair counts are exchanged (``all_to_all_single`` of W integers), then the token rows and
   their local expert ids travel in one ``all_to_all_single`` each;
3. the received rows run through the local experts (routing weight 1: the weights stay with the sender);
4. the outputs travel back on the reverse splits, return to pair order, and each token's k outputs are combined
   with its routing weights in a fixed order (fp32).

A rank with no tokens still takes part in every exchange (empty splits), as collectives require. The split sizes
are host integers (``all_to_all_single`` takes lists), so step 2 synchronizes with the device once per layer.
A rank that dies or never joins ends in the process group's timeout error, not a hang: see ``init``.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from deepfuse.errors import DeepfuseError

DEFAULT_TIMEOUT_S = 120


def init(backend: Optional[str] = None, timeout_s: float = DEFAULT_TIMEOUT_S, **kwargs) -> None:
    """``dist.init_process_group`` with a bounded timeout (NCCL on GPUs, gloo on CPU by default): a rank that
    never joins, or one that dies mid-exchange, ends every other rank with an error within ``timeout_s``."""
    if dist.is_initialized():
        return
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)


@dataclass(frozen=True)
class Shard:
    """Which experts this rank owns."""

    rank: int
    world: int
    num_experts: int

    @property
    def local(self) -> int:
        return self.num_experts // self.world

    @property
    def first(self) -> int:
        return self.rank * self.local

    @classmethod
    def of(cls, num_experts: int, group=None) -> "Shard":
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        if num_experts % world:
            raise DeepfuseError(f"expert parallel: {num_experts} experts do not divide over {world} ranks")
        return cls(rank, world, num_experts)


def shard_experts(weight: torch.Tensor, shard: Shard) -> torch.Tensor:
    """This rank's experts of a stacked [E, ...] weight, as a fresh tensor: once the caller drops the full
    tensor, the other ranks' experts are freed."""
    if weight.shape[0] != shard.num_experts:
        raise DeepfuseError(f"expert parallel: weight has {weight.shape[0]} experts, the shard expects "
                            f"{shard.num_experts}")
    return weight[shard.first: shard.first + shard.local].clone()


# This process's expert shards, by key: the compiled graph's op refers to its layer's shard by this key.
_registry: dict[int, tuple[torch.Tensor, torch.Tensor, Shard]] = {}
# The key each full weight was sharded under (by id; the weight object is kept alive by the model): a recompile
# of the same layer reuses the shard and never reads the freed full weight.
_sharded: dict[int, int] = {}


def register(w_gate_up: torch.Tensor, w_down: torch.Tensor, shard: Shard) -> int:
    """Shard one layer's full canonical expert weights ([E, 2I, H], [E, H, I]) and register this rank's part."""
    key = len(_registry)
    _registry[key] = (shard_experts(w_gate_up, shard).contiguous(), shard_experts(w_down, shard).contiguous(), shard)
    return key


_counts: dict[int, torch.Tensor] = {}


def expert_counts() -> dict[int, torch.Tensor]:
    """Per sharded layer (by key, in compile order): the (token, slot) pairs each of this rank's experts computed
    in the layer's last call. For load-balance monitoring; reading a value synchronizes with the device."""
    return dict(_counts)


def counts_buffer(key: int) -> torch.Tensor:
    w_gate_up, _, shard = _registry[key]
    if key not in _counts:
        _counts[key] = torch.zeros(shard.local, dtype=torch.int64, device=w_gate_up.device)
    return _counts[key]


def local_experts(key: int) -> tuple[torch.Tensor, torch.Tensor, Shard]:
    if key not in _registry:
        raise DeepfuseError(f"expert parallel: no expert shard {key} in this process (compiled elsewhere?)")
    return _registry[key]


def shard_parameters(gate_up: torch.Tensor, down: torch.Tensor, gate_up_canonical: torch.Tensor,
                     down_canonical: torch.Tensor, group=None) -> tuple[int, Shard]:
    """Keep this rank's experts of a layer (``*_canonical``: the same tensors viewed as [E, 2I, H] and
    [E, H, I]) and free the full parameters' storage. Returns the shard key and the shard."""
    if id(gate_up) in _sharded:
        key = _sharded[id(gate_up)]
        return key, _registry[key][2]
    shard = Shard.of(gate_up_canonical.shape[0], group)
    key = register(gate_up_canonical, down_canonical, shard)
    for full in (gate_up, down):
        _sharded[id(full)] = key
        full.data.untyped_storage().resize_(0)  # the other ranks' experts are gone from this process
    return key, shard


def ep_moe_experts(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w_gate_up_local: torch.Tensor,
    w_down_local: torch.Tensor,
    shard: Shard,
    experts_fn: Callable,
    group=None,
    counts_out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The routed experts of one MoE layer with this rank's share of the experts.

    x [T, H] and topk_ids/topk_weights [T, k] are this rank's tokens (T may differ across ranks, or be 0);
    w_gate_up_local [E/W, 2I, H], w_down_local [E/W, H, I]. ``experts_fn(x, ids, weights, w_gate_up, w_down)`` runs
    local experts (the generated kernels, or their reference). ``counts_out`` ([E/W] int64), if given, receives
    the number of (token, slot) pairs each local expert computed: the load-balance figure.
    Returns [T, H] in x's dtype."""
    t, hidden = x.shape
    k = topk_ids.shape[1]
    flat_ids = topk_ids.reshape(-1).to(torch.int64)
    dest = torch.div(flat_ids, shard.local, rounding_mode="floor")
    order = torch.argsort(dest, stable=True)
    send_counts = torch.bincount(dest, minlength=shard.world)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()  # the one host synchronization
    received = sum(recv_splits)

    send_x = x[order // k]
    send_ids = flat_ids[order] - dest[order] * shard.local
    recv_x = x.new_empty((received, hidden))
    recv_ids = flat_ids.new_empty((received,))
    dist.all_to_all_single(recv_x, send_x.contiguous(), recv_splits, send_splits, group=group)
    dist.all_to_all_single(recv_ids, send_ids.contiguous(), recv_splits, send_splits, group=group)
    if counts_out is not None:
        counts_out.copy_(torch.bincount(recv_ids, minlength=shard.local)[: shard.local])

    ones = torch.ones((received, 1), dtype=topk_weights.dtype, device=x.device)
    local_out = experts_fn(recv_x, recv_ids[:, None], ones, w_gate_up_local, w_down_local)

    back = x.new_empty((t * k, hidden))
    dist.all_to_all_single(back, local_out.to(x.dtype).contiguous(), send_splits, recv_splits, group=group)
    per_pair = torch.empty_like(back)
    per_pair[order] = back
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    weighted = per_pair.view(t, k, hidden).to(acc) * topk_weights.to(acc)[..., None]
    return weighted.sum(dim=1).to(x.dtype)
