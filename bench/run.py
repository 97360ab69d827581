"""deepfuse beside eager and torch.compile (Inductor, default) on the same inputs, in one process on the GPU.

    python bench/run.py [--out DIR]        (or ./dev bench)

Workloads (DeepSeek-V2-Lite shapes, bf16): the residual add + RMSNorm that runs twice per layer, at
decode and prefill token counts. Each is timed two ways with CUDA events (triton.testing.do_bench, median
of many runs): "launched", calling the module from Python as a user would (host overhead included), and
"graph", replaying a CUDA graph of the same call (GPU time alone, what a captured decode step pays).
Both are set against the physical floor: bytes that must move / HBM bandwidth (measured here by a large
device-to-device copy). Prints a table, writes results.json and a PNG chart to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

import torch

HIDDEN = 2048  # DeepSeek-V2-Lite


class ResidualRMSNorm(torch.nn.Module):
    """The decoder's `residual + x -> RMSNorm`, written as HF's DeepseekV2RMSNorm writes it."""

    def __init__(self, n: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(n) + 0.5)
        self.variance_epsilon = 1e-6

    def forward(self, x, residual):
        h = residual + x
        dtype = h.dtype
        hf = h.to(torch.float32)
        hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * hf.to(dtype), h


def hbm_bandwidth() -> float:
    """Bytes/s of a 2 GiB device-to-device copy, counting bytes read and written."""
    from triton.testing import do_bench

    src = torch.randn(1 << 30, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def bench_rms_norm(tokens, bandwidth, rounds):
    from triton.testing import do_bench

    import deepfuse

    model = ResidualRMSNorm(HIDDEN).cuda().bfloat16()
    rows = []
    for t in tokens:
        # Several input sets, rotated, so large and small shapes alike are read from HBM, not L2.
        sets = [(torch.randn(t, HIDDEN, device="cuda", dtype=torch.bfloat16),
                 torch.randn(t, HIDDEN, device="cuda", dtype=torch.bfloat16)) for _ in range(rounds)]
        floor_bytes = 4 * t * HIDDEN * 2 + HIDDEN * 2  # x, residual read; y, h written; weight read
        floor_ms = floor_bytes / bandwidth * 1e3
        torch._dynamo.reset()
        impls = {
            "eager": model,
            "inductor": torch.compile(model),
            "deepfuse": torch.compile(model, backend="deepfuse"),
        }
        ref = model(*sets[0])
        with torch.no_grad():
            for name, fn in impls.items():
                out = fn(*sets[0])  # compile + check before timing
                err = max(((o.float() - r.float()).norm() / r.float().norm()).item() for o, r in zip(out, ref))
                if err > 1e-2:
                    raise SystemExit(f"{name} at T={t} is wrong: relative error {err:.2e}")
                it = iter(range(1 << 62))
                ms = do_bench(lambda: fn(*sets[next(it) % rounds]), warmup=25, rep=300, return_mode="median")
                graphs = [_capture(fn, s) for s in sets]
                it = iter(range(1 << 62))
                graph_ms = do_bench(lambda: graphs[next(it) % rounds].replay(), warmup=25, rep=300,
                                    return_mode="median")
                rows.append({"workload": "add_rms_norm", "T": t, "impl": name, "ms": ms, "graph_ms": graph_ms,
                             "floor_ms": floor_ms, "x_floor": graph_ms / floor_ms,
                             "gbps": floor_bytes / (graph_ms * 1e-3) / 1e9})
    return rows


def _capture(fn, args):
    """A CUDA graph of one call of ``fn`` on ``args`` (warmed up on a side stream first, as capture requires)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(*args)
    return graph


def environment():
    import triton

    try:
        commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                         stderr=subprocess.DEVNULL).strip()
    except Exception:
        commit = os.environ.get("DEEPFUSE_COMMIT", "unknown")
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "commit": commit, "command": " ".join(["python"] + sys.argv)}


def chart(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = sorted({r["T"] for r in rows})
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        ys = [next(r["x_floor"] for r in rows if r["T"] == t and r["impl"] == impl) for t in tokens]
        ax.bar([j + i * width for j in range(len(tokens))], ys, width, label=impl)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xticks([j + width * (len(impls) - 1) / 2 for j in range(len(tokens))], [f"T={t}" for t in tokens])
    ax.set_ylabel("CUDA-graph time / HBM floor (log; lower is better)")
    ax.set_title(f"residual add + RMSNorm, hidden {HIDDEN}, bf16 ({torch.cuda.get_device_name()})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/out")
    parser.add_argument("--tokens", default="1,64,512,4096,16384")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/run.py measures GPU kernels: it needs CUDA")
    os.makedirs(args.out, exist_ok=True)
    bandwidth = hbm_bandwidth()
    rows = bench_rms_norm([int(t) for t in args.tokens.split(",")], bandwidth, args.rounds)
    env = dict(environment(), hbm_copy_tbps=bandwidth / 1e12)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"environment": env, "results": rows}, f, indent=1)
    chart(rows, os.path.join(args.out, "add_rms_norm.png"))
    print(f"{env['device']}  torch {env['torch']}  triton {env['triton']}  commit {env['commit']}  "
          f"HBM copy {env['hbm_copy_tbps']:.2f} TB/s")
    print("median ms: 'launched' = called from Python (host overhead in); 'graph' = CUDA-graph replay (GPU time)")
    print(f"{'workload':<14}{'T':>7}  {'impl':<10}{'launched':>10}{'graph':>9}{'floor':>9}{'graph/floor':>12}{'GB/s':>7}")
    for r in rows:
        print(f"{r['workload']:<14}{r['T']:>7}  {r['impl']:<10}{r['ms']:>10.4f}{r['graph_ms']:>9.4f}"
              f"{r['floor_ms']:>9.4f}{r['x_floor']:>12.2f}{r['gbps']:>7.0f}")


if __name__ == "__main__":
    main()
