"""Expert parallelism on several GPUs of one host (NCCL): deepfuse with ``options={"expert_parallel": True}``
beside the same module compiled by deepfuse on one GPU, at a fixed number of tokens per GPU.

    python -m torch.distributed.run --nproc-per-node 2 bench/expert_parallel.py --out DIR [--tokens 512,2048,8192] [--layers 4]

Every rank builds the same weights (one seed) and its own tokens. Two workloads, bf16:
- moe_block: one DeepSeek-V2-Lite MoE layer of the bundled model (router, 64 routed experts top-6 of size
  1408, 2 shared experts), [T, 2048] tokens per GPU;
- model: the bundled v2-lite model cut to ``--layers`` decoder layers (the first dense, the rest MoE), a
  prefill of one sequence of T tokens per GPU.
For each: "1 GPU" is the module compiled by deepfuse without expert parallelism on each rank's own GPU (every
expert local, no exchange); "EP" is the same weights compiled with the option, each rank holding E/W experts,
at 1 and 2 micro-batches, and with the padded exchange (no host synchronization; --micro-batches picks).
Reported per row: median ms of one call (the slowest rank's median, CUDA events around a call launched from
Python: the split exchange synchronizes with the host once per layer), tokens/s over all
GPUs, the expert weights each rank holds, the share of the step spent in NCCL kernels (torch.profiler on rank
0: their summed device time over the steps' wall time; with micro-batches they overlap compute, so this is
the exchange's size, not what it costs on the critical path), and the EP output's relative error against the
1-GPU output on the same tokens. Writes ep_results.json to --out (rank 0).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from run import environment, median_call_ms  # noqa: E402  (bench/run.py)


def build(kind: str, layers: int):
    """The module on this rank's GPU with seeded weights, identical on every rank."""
    from deepfuse.models import DeepSeekForCausalLM, get_config
    from deepfuse.models.model import MoE

    cfg = get_config("v2-lite", num_hidden_layers=layers)
    if kind == "model":
        return DeepSeekForCausalLM.from_config(cfg, device="cuda", dtype=torch.bfloat16, seed=0), cfg
    with torch.device("meta"):
        moe = MoE(cfg)
    moe = moe.to_empty(device="cuda").to(torch.bfloat16)
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, p.shape[-1] ** -0.5, generator=gen)
    return moe.eval(), cfg


def expert_bytes(module) -> int:
    """Bytes of routed-expert weights this process holds for ``module`` (freed full tensors count 0), plus the
    shards registered for it by the expert-parallel runtime."""
    from deepfuse.runtime import expert_parallel as ep

    held = sum(p.untyped_storage().nbytes() for n, p in module.named_parameters() if ".experts." in f".{n}")
    ids = {id(p) for n, p in module.named_parameters() if ".experts." in f".{n}"}
    keys = {ep._sharded[i] for i in ids if i in ep._sharded}
    return held + sum(ep._registry[k][0].nbytes + ep._registry[k][1].nbytes for k in keys)


def median_ms(fn, iters: int) -> float:
    """The slowest rank's median ms of one call, every rank starting each call together."""
    def lockstep():
        torch.cuda.synchronize()
        dist.barrier()

    ms = torch.tensor([median_call_ms(fn, iters, warmup=3, before=lockstep)], device="cuda")
    dist.all_reduce(ms, op=dist.ReduceOp.MAX)
    return ms.item()


def nccl_share(fn, steps: int = 5, table: str = "") -> float:
    """The time some NCCL kernel runs (union of their spans) over the wall time of ``steps`` calls (torch.profiler,
    this rank). NCCL kernels include their wait for the peer, so this is the time the exchange occupies."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    dist.barrier()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            fn()
        end.record()
        end.synchronize()
    wall_us = start.elapsed_time(end) * 1e3
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == DeviceType.CUDA and "nccl" in e.name.lower())
    nccl_us, reach = 0.0, float("-inf")  # the union of the spans: concurrent NCCL kernels count once
    for lo, hi in spans:
        nccl_us += max(0.0, hi - max(lo, reach))
        reach = max(reach, hi)
    if table:  # where the host and device time of these steps went, for whoever speeds this up
        with open(table, "w") as f:
            f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
    return nccl_us / wall_us


def bench(kind: str, tokens: list[int], layers: int, micro_batches: list[int], iters: int, out_dir: str) -> list[dict]:
    rank, world = dist.get_rank(), dist.get_world_size()
    single, cfg = build(kind, layers)
    sharded, _ = build(kind, layers)
    full_bytes = expert_bytes(single)
    inputs, refs, rows = {}, {}, []
    for t in tokens:
        gen = torch.Generator(device="cuda").manual_seed(1000 + rank)
        if kind == "model":
            inputs[t] = torch.randint(0, cfg.vocab_size, (1, t), device="cuda", generator=gen)
        else:
            inputs[t] = torch.randn(t, cfg.hidden_size, device="cuda", dtype=torch.bfloat16, generator=gen)
    with torch.no_grad():
        compiled = torch.compile(single, backend="deepfuse")
        for t, x in inputs.items():
            refs[t] = compiled(x)
            ms = median_ms(lambda: compiled(x), iters)
            rows.append({"workload": kind, "T_per_gpu": t, "impl": "deepfuse 1 GPU", "gpus": 1, "ms": ms,
                         "tokens_per_s": t / ms * 1e3, "expert_bytes_per_gpu": full_bytes, "nccl_share": 0.0,
                         "rel_err": 0.0})
            _print(rows[-1])
        for m in micro_batches:  # a micro-batch count, or "padded" (the fixed-size exchange, no host sync)
            torch._dynamo.reset()  # a fresh compile per variant; the expert shards are reused
            variant = {"expert_parallel_exchange": "padded"} if m == "padded" else {"micro_batches": m}
            compiled = torch.compile(sharded, backend="deepfuse", options={"expert_parallel": True, **variant})
            for t, x in inputs.items():
                out = compiled(x)
                err = ((out.float() - refs[t].float()).norm() / refs[t].float().norm()).item()
                ms = median_ms(lambda: compiled(x), iters)
                table = os.path.join(out_dir, f"ep_profile_{kind}_T{t}_mb{m}.txt") if rank == 0 and t == min(tokens) \
                    and m == micro_batches[0] else ""
                name = "deepfuse EP, padded" if m == "padded" else f"deepfuse EP, {m} micro-batch(es)"
                rows.append({"workload": kind, "T_per_gpu": t, "impl": name,
                             "gpus": world, "ms": ms, "tokens_per_s": world * t / ms * 1e3,
                             "expert_bytes_per_gpu": expert_bytes(sharded),
                             "nccl_share": nccl_share(lambda: compiled(x), table=table), "rel_err": err})
                _print(rows[-1])
    torch._dynamo.reset()
    return rows


def _print(r: dict) -> None:
    if dist.get_rank() == 0:
        print(f"{r['workload']:<10}{r['T_per_gpu']:>7}  {r['impl']:<30}{r['gpus']:>3}{r['ms']:>10.3f}"
              f"{r['tokens_per_s']:>12.0f}{r['expert_bytes_per_gpu'] / 2**30:>9.2f}{r['nccl_share']:>8.1%}"
              f"{r['rel_err']:>10.2e}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/out")
    parser.add_argument("--workloads", default="moe_block,model")
    parser.add_argument("--tokens", default="512,2048,8192")
    parser.add_argument("--model-tokens", default="2048")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the v2-lite model (27 in full)")
    parser.add_argument("--micro-batches", default="1,2,padded", help="EP variants: micro-batch counts, 'padded'")
    parser.add_argument("--model-micro-batches", default="1,2")
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    from deepfuse.runtime import expert_parallel as ep

    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    ep.init("nccl", timeout_s=900)
    os.makedirs(args.out, exist_ok=True)
    micro = [m if m == "padded" else int(m) for m in args.micro_batches.split(",")]
    torch._dynamo.config.cache_size_limit = 64  # one entry per token count and compile, never a silent eager fallback
    if dist.get_rank() == 0:
        print(f"{'workload':<10}{'T/GPU':>7}  {'impl':<30}{'GPUs':>3}{'ms':>10}{'tokens/s':>12}{'GiB exp':>9}"
              f"{'NCCL':>8}{'rel err':>10}", flush=True)
    rows = []
    workloads = args.workloads.split(",")
    if "moe_block" in workloads:
        rows += bench("moe_block", [int(t) for t in args.tokens.split(",")], 2, micro, args.iters, args.out)
    if "model" in workloads:
        torch.cuda.empty_cache()
        rows += bench("model", [int(t) for t in args.model_tokens.split(",")], args.layers,
                      [m if m == "padded" else int(m) for m in args.model_micro_batches.split(",")], args.iters,
                      args.out)
    if dist.get_rank() == 0:
        env = dict(environment(), world=dist.get_world_size(), layers=args.layers)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "ep_results.json"), "w") as f:
            json.dump({"environment": env, "results": rows}, f, indent=1)
        print(f"{env['device']} x{env['world']}  torch {env['torch']}  triton {env['triton']}  commit {env['commit']}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
