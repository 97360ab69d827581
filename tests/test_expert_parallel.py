"""The expert-parallel runtime on CPU with gloo, 2 and 4 processes: each rank keeps only its share of the routed
experts, and the output equals the single-process MoE on the same weights and tokens (uneven token counts per
rank, a rank with no tokens, every token routed to one rank's experts); a rank that never joins is an error
within the timeout, not a hang."""
import logging
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

E, H, I, K = 8, 32, 16, 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights():
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(E, 2 * I, H, generator=gen) / H ** 0.5, torch.randn(E, H, I, generator=gen) / I ** 0.5)


def _tokens(rank: int, routing: str):
    gen = torch.Generator().manual_seed(100 + rank)
    t = {0: 5, 1: 0, 2: 9, 3: 3}[rank]  # uneven, and rank 1 has none
    x = torch.randn(t, H, generator=gen, dtype=torch.float64)
    if routing == "one_rank":  # every pair to rank 0's experts: the other ranks receive nothing
        ids = torch.stack([torch.randperm(2, generator=gen)[:K] for _ in range(t)]) if t else torch.empty(0, K)
    else:
        ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(t)]) if t else torch.empty(0, K)
    weights = torch.rand(t, K, generator=gen, dtype=torch.float64)
    return x, ids.long(), weights


def _worker(rank, world, port, routing, results, kernels=False, micro_batches=1):
    from deepfuse.runtime import expert_parallel as ep
    from deepfuse.runtime.kernels import moe

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    ep.init("gloo", timeout_s=30, rank=rank, world_size=world)
    try:
        shard = ep.Shard.of(E)
        w_gate_up, w_down = _weights()
        local_gate_up, local_down = ep.shard_experts(w_gate_up, shard), ep.shard_experts(w_down, shard)
        x, ids, weights = _tokens(rank, routing)
        counts = torch.zeros(shard.local, dtype=torch.int64)
        if kernels:  # the generated kernels (Triton's interpreter), fp32
            x, weights = x.float(), weights.float()
            experts = lambda *a: moe.moe_experts(*a, interpret=True)  # noqa: E731
        else:
            experts = moe.reference
        out = ep.ep_moe_experts(x, ids, weights, local_gate_up, local_down, shard, experts, counts_out=counts,
                                micro_batches=micro_batches)
        ref = moe.reference(x.double(), ids, weights.double(), w_gate_up.double(), w_down.double())
        err = ((out.double() - ref).abs().max() / ref.abs().max()).item() if x.shape[0] else 0.0
        results[rank] = (err, tuple(out.shape) == tuple(x.shape), local_gate_up.shape[0], counts.tolist())
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("routing", ["spread", "one_rank"])
@pytest.mark.parametrize("micro_batches", [1, 3], ids=["whole", "3-micro-batches"])
def test_expert_parallel_equals_single_process(world, routing, micro_batches):
    """3 micro-batches: more chunks than some ranks have tokens (rank 1 has none, rank 3 has 3)."""
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(world, _free_port(), routing, results, False, micro_batches), nprocs=world, join=True)
    assert sorted(results) == list(range(world))
    for rank, (err, shape_ok, local_experts, counts) in results.items():
        assert shape_ok and err < 1e-12, (rank, err)  # float64 throughout: only summation order differs
        assert local_experts == E // world  # each rank holds only its share
    total_pairs = sum(_tokens(r, routing)[1].numel() for r in range(world))
    assert sum(sum(c) for _, _, _, c in results.values()) == total_pairs
    if routing == "one_rank":
        assert all(sum(results[r][3]) == 0 for r in range(1, world))


def test_expert_parallel_with_the_generated_kernels():
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(2, _free_port(), "spread", results, True), nprocs=2, join=True)
    assert sorted(results) == [0, 1] and all(err < 1e-5 for err, *_ in results.values()), dict(results)


def _padded_worker(rank, world, port, routing, t, results):
    from deepfuse.runtime import expert_parallel as ep
    from deepfuse.runtime.kernels import moe

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    ep.init("gloo", timeout_s=30, rank=rank, world_size=world)
    try:
        shard = ep.Shard.of(E)
        w_gate_up, w_down = _weights()
        gen = torch.Generator().manual_seed(300 + rank)
        x = torch.randn(t, H, generator=gen, dtype=torch.float64)
        span = 2 if routing == "one_rank" else E  # every pair to rank 0's experts, or spread
        ids = torch.stack([torch.randperm(span, generator=gen)[:K] for _ in range(t)]) if t else torch.empty(0, K)
        weights = torch.rand(t, K, generator=gen, dtype=torch.float64)
        counts = torch.full((shard.local,), -1, dtype=torch.int64)  # poisoned: every entry must be written
        out = ep.ep_moe_experts(x, ids.long(), weights, ep.shard_experts(w_gate_up, shard),
                                ep.shard_experts(w_down, shard), shard, moe.reference, counts_out=counts,
                                exchange="padded")
        ref = moe.reference(x, ids.long(), weights, w_gate_up.double(), w_down.double())
        err = ((out - ref).abs().max() / ref.abs().max()).item() if t else 0.0
        results[rank] = (err, tuple(out.shape) == (t, H), counts.tolist(), ids.numel())
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("routing,t", [("spread", 5), ("one_rank", 4), ("spread", 0)],
                         ids=["spread", "one_rank", "no_tokens"])
def test_padded_exchange_equals_single_process(world, routing, t):
    """The fixed-size exchange (no host synchronization): same T on every rank, as it requires; all pairs to
    one rank's experts (the other blocks are all padding), and T = 0 everywhere."""
    results = mp.Manager().dict()
    mp.spawn(_padded_worker, args=(world, _free_port(), routing, t, results), nprocs=world, join=True)
    assert sorted(results) == list(range(world))
    for rank, (err, shape_ok, counts, _) in results.items():
        assert shape_ok and err < 1e-12, (rank, err)
        assert min(counts) >= 0  # padding rows are not counted, real ones are
    assert sum(sum(c) for _, _, c, _ in results.values()) == sum(n for *_, n in results.values())
    if routing == "one_rank":
        assert all(sum(results[r][2]) == 0 for r in range(1, world))


def _lonely(port, errors):
    from deepfuse.runtime import expert_parallel as ep

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    start = time.monotonic()
    try:
        ep.init("gloo", timeout_s=3, rank=0, world_size=2)
    except Exception as e:  # the store's or the group's timeout, depending on the torch version
        errors.append((type(e).__name__, time.monotonic() - start))


def test_a_rank_that_never_joins_is_an_error_within_the_timeout():
    errors = mp.Manager().list()
    proc = mp.get_context("spawn").Process(target=_lonely, args=(_free_port(), errors))
    proc.start()
    proc.join(60)
    alive = proc.is_alive()
    if alive:
        proc.kill()
    assert not alive and len(errors) == 1 and errors[0][1] < 30, list(errors)


def test_experts_must_divide_over_the_ranks():
    from deepfuse.errors import DeepfuseError
    from deepfuse.runtime.expert_parallel import Shard, shard_experts

    shard = Shard(rank=1, world=4, num_experts=8)
    assert (shard.local, shard.first) == (2, 2)
    w = torch.arange(8.0)[:, None].expand(8, 3)
    assert shard_experts(w, shard)[:, 0].tolist() == [2.0, 3.0]
    with pytest.raises(DeepfuseError, match="experts"):
        shard_experts(torch.zeros(6, 3), shard)


def _model_worker(rank, world, port, impl, results):
    """The bundled model compiled with options["expert_parallel"]: each rank keeps its share of the experts."""
    import deepfuse
    from deepfuse.models import DeepSeekForCausalLM, get_config
    from deepfuse.runtime import expert_parallel as ep

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    ep.init("gloo", timeout_s=60, rank=rank, world_size=world)
    impl = dict(impl)
    blocks = impl.pop("blocks", False)  # block by block: one graph runs all three MoE layers, each its own shard
    try:
        cfg = get_config("tiny", **({"num_hidden_layers": 4} if blocks else {}))  # 8 routed experts
        model = DeepSeekForCausalLM.from_config(cfg, seed=11)  # the same weights on every rank
        length = 5 if impl.get("expert_parallel_exchange") == "padded" else 3 + 4 * rank  # padded: same T everywhere
        ids = torch.randint(0, cfg.vocab_size, (1, length), generator=torch.Generator().manual_seed(rank))
        experts = [layer.mlp.experts for layer in model.model.layers if hasattr(layer.mlp, "experts")]
        logged = []
        handler = logging.Handler()
        handler.emit = lambda record: logged.append(record.getMessage())
        logging.getLogger("deepfuse").addHandler(handler)
        logging.getLogger("deepfuse").setLevel(logging.DEBUG)
        with torch.no_grad():
            ref = model(ids)
            report = deepfuse.Report()
            with deepfuse.collect(report):
                if blocks:
                    for layer in model.model.layers:
                        layer.compile(backend="deepfuse", options={"expert_parallel": True, **impl})
                    out = model(ids)
                else:
                    out = torch.compile(model, backend="deepfuse", options={"expert_parallel": True, **impl})(ids)
        rows = [m for m in report.matches if m.family == "moe"]
        err = ((out - ref).norm() / ref.norm()).item()
        freed = all(e.gate_up_proj.untyped_storage().nbytes() == 0 for e in experts)
        counts = {k: v.tolist() for k, v in ep.expert_counts().items()}
        logged = [line for line in logged if line.startswith("expert parallel: layer")]
        results[rank] = (err, [m.op for m in rows], [m.params.get("expert_parallel") for m in rows], freed, counts,
                         [(m.params.get("micro_batches", 1), m.params.get("exchange", "splits")) for m in rows], logged)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("impl", [{"kernels": "reference"}, {"interpret": True},
                                  {"kernels": "reference", "micro_batches": 2},
                                  {"kernels": "reference", "expert_parallel_exchange": "padded"},
                                  {"kernels": "reference", "blocks": True}],
                         ids=["reference", "interpret", "reference-2-micro-batches", "reference-padded", "blocks"])
def test_compiled_model_with_expert_parallel_option(impl):
    """Also: the micro_batches and expert_parallel_exchange options reach every layer's op, and DEEPFUSE_LOG=debug
    logs each layer's counts. Compiled block by block, the MoE block's one graph runs each layer with that
    layer's own shard (sharded at its first call)."""
    results = mp.Manager().dict()
    mp.spawn(_model_worker, args=(2, _free_port(), impl, results), nprocs=2, join=True)
    for rank, (err, ops, shards, freed, counts, micro, logged) in sorted(results.items()):
        assert err < 1e-5, (rank, err)
        assert micro == [(impl.get("micro_batches", 1), impl.get("expert_parallel_exchange", "splits"))] * len(ops)
        layers = 3 if impl.get("blocks") else len(ops)  # (block by block: one op, three layers' calls)
        assert len(logged) == layers and all(f"rank {rank}/2" in line for line in logged), logged
        assert ops and all(op == "deepfuse::moe_experts_ep" for op in ops), ops
        assert all(s == f"rank {rank}/2: experts {4 * rank}..{4 * rank + 3}" for s in shards), shards
        assert freed  # the full expert weights are gone from every rank
        assert len(counts) == layers and all(len(c) == 4 for c in counts.values())
    # every (token, slot) pair of both ranks was computed by exactly one expert somewhere, in every layer
    k, tokens = 2, 10 if impl.get("expert_parallel_exchange") == "padded" else (3 + 7)  # top-2; 3 + 4r tokens
    for key in results[0][4]:
        assert sum(results[0][4][key]) + sum(results[1][4][key]) == k * tokens
