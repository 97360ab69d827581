"""Expert parallelism on torch.distributed: routed experts sharded across the ranks of a process group, tokens sent
to the ranks that own their experts with ``all_to_all_single``, computed there by the local grouped kernels, and
sent back for the weighted combine.

Layout: with E routed experts over W ranks (W must divide E), rank r owns experts [r * E/W, (r + 1) * E/W). Every
other part of the model (router, shared experts, attention) is replicated. One MoE layer on one rank:

1. each (token, slot) pair goes to rank ``expert // (E / W)``; pairs are sorted by destination rank (stable);
2. the per-destination pair counts are exchanged (``all_to_all_single`` of W integers), then the token rows
   travel in one ``all_to_all_single``, each carrying its local expert id bit-cast into extra columns;
3. the received rows run through the local experts (routing weight 1: the weights stay with the sender);
4. the outputs travel back on the reverse splits, return to pair order, and each token's k outputs are combined
   with its routing weights in a fixed order (fp32).
With ``micro_batches`` > 1 the tokens go in chunks whose exchanges are asynchronous, so one chunk's experts run
while the next chunk's tokens travel (what that buys is to be measured on GPUs).

A rank with no tokens still takes part in every exchange (empty splits), as collectives require. The split sizes
are host integers (``all_to_all_single`` takes lists), so step 2 synchronizes with the device once per layer.

``exchange="padded"`` is the exchange without that synchronization, for decode: every rank sends every
other rank a fixed block of T*k rows (room for all its pairs), whatever the routing, so no size has to reach
the host and a step can be captured in a CUDA graph. It needs the same T on every rank and moves W times the
rows the exact exchange moves (the padding rows are zeros, computed as expert 0 and dropped).
A rank that dies or never joins ends in the process group's timeout error, not a hang: see ``init``.
"""
from __future__ import annotations

import datetime
import logging
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


def log_counts(key: int) -> None:
    """With the ``deepfuse`` logger at DEBUG (``DEEPFUSE_LOG=debug``): one line per call of a sharded layer with
    its local experts' pair counts. Reading them synchronizes with the device, so only then."""
    from deepfuse.log import log

    if log.isEnabledFor(logging.DEBUG) and key in _counts:
        shard = _registry[key][2]
        log.debug("expert parallel: layer %d, rank %d/%d, pairs per expert %d..%d: %s", key, shard.rank, shard.world,
                  shard.first, shard.first + shard.local - 1, _counts[key].tolist())


def counts_buffer(key: int) -> torch.Tensor:
    w_gate_up, _, shard = _registry[key]
    if key not in _counts:
        _counts[key] = torch.zeros(shard.local, dtype=torch.int64, device=w_gate_up.device)
    return _counts[key]


# The shard key each compiled moe_experts_ep op reads, by slot: set before every call of its graph from the expert
# weights the call passes (deepfuse.pipeline.bind_per_call), since one graph may run many layers (block by block).
_slots: list[int] = []


def new_slot(key: int) -> int:
    _slots.append(key)
    return len(_slots) - 1


def set_slot(slot: int, key: int) -> None:
    _slots[slot] = key


def slot_key(slot: int) -> int:
    if not 0 <= slot < len(_slots):
        raise DeepfuseError(f"expert parallel: no slot {slot} in this process (compiled elsewhere?)")
    return _slots[slot]


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


def _count(values: torch.Tensor, n: int) -> torch.Tensor:
    """How many of ``values`` equal each of 0 .. n-1 (int64). Unlike ``torch.bincount`` on CUDA, which reads the
    maximum back to the host, this never synchronizes: the one host synchronization stays the split sizes'."""
    return torch.zeros(n, dtype=torch.int64, device=values.device).scatter_add_(0, values, torch.ones_like(values))


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
    micro_batches: int = 1,
    exchange: str = "splits",
) -> torch.Tensor:
    """The routed experts of one MoE layer with this rank's share of the experts.

    x [T, H] and topk_ids/topk_weights [T, k] are this rank's tokens (T may differ across ranks, or be 0);
    w_gate_up_local [E/W, 2I, H], w_down_local [E/W, H, I]. ``experts_fn(x, ids, weights, w_gate_up, w_down)`` runs
    local experts (the generated kernels, or their reference). ``counts_out`` ([E/W] int64), if given, receives
    the number of (token, slot) pairs each local expert computed: the load-balance figure.

    ``micro_batches`` > 1 (the same on every rank) splits the tokens into that many chunks whose exchanges are
    asynchronous: a chunk's experts run while the next chunk's tokens travel and the previous chunk's outputs
    travel back. ``exchange="padded"`` is the fixed-size exchange with no host synchronization (the same T on
    every rank; one batch). Returns [T, H] in x's dtype."""
    if exchange == "padded":
        if micro_batches != 1:
            raise DeepfuseError("expert parallel: the padded exchange runs one batch (micro_batches=1)")
        return _padded_exchange(x, topk_ids, topk_weights, w_gate_up_local, w_down_local, shard, experts_fn, group,
                                counts_out)
    if exchange != "splits":
        raise DeepfuseError(f"expert parallel: exchange must be 'splits' or 'padded', got {exchange!r}")
    t, hidden = x.shape
    k = topk_ids.shape[1]
    step = max(1, -(-t // micro_batches))
    chunks = [(min(i * step, t), min((i + 1) * step, t)) for i in range(micro_batches)]
    flat_ids = topk_ids.reshape(-1).to(torch.int64)
    dest = torch.div(flat_ids, shard.local, rounding_mode="floor")
    plans = []
    for lo, hi in chunks:  # each chunk's pairs, sorted by the rank that owns their expert (stable)
        d = dest[lo * k: hi * k]
        order = torch.argsort(d, stable=True) + lo * k
        plans.append((lo, hi, order, _count(d, shard.world)))
    # All chunks' pair counts in one exchange: [destination rank, chunk] -> [source rank, chunk].
    send_counts = torch.stack([p[3] for p in plans], dim=1).contiguous()
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    send_splits, recv_splits = send_counts.t().tolist(), recv_counts.t().tolist()  # the one host synchronization

    # Each row travels with its local expert id (int64) bit-cast into id_cols extra columns of x's dtype: one
    # exchange per chunk and direction, not two.
    id_cols = _id_columns(x)
    inflight = []  # dispatch every chunk now; each waits for its own rows only
    for (lo, hi, order, _), s_split, r_split in zip(plans, send_splits, recv_splits):
        local_ids = flat_ids[order] - dest[order] * shard.local
        send = torch.cat([x[order // k], local_ids.view(x.dtype).view(-1, id_cols)], dim=1)
        recv = x.new_empty((sum(r_split), hidden + id_cols))
        work = dist.all_to_all_single(recv, send, r_split, s_split, group=group, async_op=True)
        inflight.append((recv, work, send))
    back = x.new_empty((t * k, hidden))
    returning = []
    if counts_out is not None:
        counts_out.zero_()
    for (lo, hi, order, _), s_split, r_split, (recv, work, _) in zip(plans, send_splits, recv_splits, inflight):
        work.wait()
        recv_x, recv_ids = _unpack(recv, hidden)
        if counts_out is not None:
            counts_out.add_(_count(recv_ids, shard.local))
        local_out = _local_experts(recv_x, recv_ids, topk_weights.dtype, w_gate_up_local, w_down_local, experts_fn)
        chunk_back = x.new_empty(((hi - lo) * k, hidden))
        work = dist.all_to_all_single(chunk_back, local_out.contiguous(), s_split, r_split, group=group,
                                      async_op=True)
        returning.append((order, chunk_back, work, local_out))
    for order, chunk_back, work, _ in returning:
        work.wait()
        back[order] = chunk_back
    return _combine(back, topk_weights, x.dtype)


def _id_columns(x: torch.Tensor) -> int:
    """Columns of x's dtype that hold one int64 local expert id, bit-cast, at the end of each exchanged row."""
    return max(1, 8 // x.element_size())


def _unpack(recv: torch.Tensor, hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exchanged rows -> (their hidden states, their local expert ids)."""
    return recv[:, :hidden], recv[:, hidden:].contiguous().view(torch.int64).view(-1)


def _local_experts(recv_x, recv_ids, weight_dtype, w_gate_up_local, w_down_local, experts_fn) -> torch.Tensor:
    """Each received row through its one local expert, unweighted (the source rank applies the routing weight)."""
    ones = torch.ones((recv_x.shape[0], 1), dtype=weight_dtype, device=recv_x.device)
    return experts_fn(recv_x, recv_ids[:, None], ones, w_gate_up_local, w_down_local).to(recv_x.dtype)


def _combine(back: torch.Tensor, topk_weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The k returned rows of each token [T*k, H], in (token, slot) order, weighted and summed in a fixed order."""
    t, k = topk_weights.shape
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    weighted = back.view(t, k, back.shape[-1]).to(acc) * topk_weights.to(acc)[..., None]
    return weighted.sum(dim=1).to(dtype)


def _padded_exchange(x, topk_ids, topk_weights, w_gate_up_local, w_down_local, shard, experts_fn, group,
                     counts_out) -> torch.Tensor:
    """``ep_moe_experts`` without a host synchronization: fixed-size exchange blocks (see the module docstring).
    Every rank must pass the same number of tokens T."""
    t, hidden = x.shape
    k = topk_ids.shape[1]
    cap, world, local = t * k, shard.world, shard.local
    flat_ids = topk_ids.reshape(-1).to(torch.int64)
    dest = torch.div(flat_ids, local, rounding_mode="floor")
    order = torch.argsort(dest, stable=True)  # pairs by destination; each keeps its place among its rank's pairs
    counts = _count(dest, world)
    start = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(order)
    slot[order] = torch.arange(cap, device=x.device) - start[dest[order]]  # a pair's row in its destination block
    row = dest * cap + slot  # in the [world * cap] send buffer
    id_cols = _id_columns(x)
    send = x.new_zeros((world * cap, hidden + id_cols))
    send[row, :hidden] = x.repeat_interleave(k, dim=0)
    local_ids = torch.zeros(world * cap, dtype=torch.int64, device=x.device)  # padding rows: expert 0, zero input
    local_ids[row] = flat_ids - dest * local
    send[:, hidden:] = local_ids.view(x.dtype).view(-1, id_cols)
    recv = torch.empty_like(send)
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts, group=group)  # how many rows of each block are pairs (stays on device)
    dist.all_to_all_single(recv, send, group=group)
    recv_x, recv_ids = _unpack(recv, hidden)
    if counts_out is not None:
        real = torch.arange(cap, device=x.device)[None, :] < received[:, None]
        counts_out.zero_().scatter_add_(0, recv_ids, real.reshape(-1).to(torch.int64))
    local_out = _local_experts(recv_x, recv_ids, topk_weights.dtype, w_gate_up_local, w_down_local, experts_fn)
    back = torch.empty_like(local_out)
    dist.all_to_all_single(back, local_out.contiguous(), group=group)
    return _combine(back[row], topk_weights, x.dtype)
