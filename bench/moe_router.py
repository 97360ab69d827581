"""The MoE router, deepfuse's two forms side by side: the graph's (casts, cuBLAS matmul in fp32, then the routing
kernel) and the fused one (``routing.route_hidden``: up to ``ROUTER_MATMUL_MAX_TOKENS`` tokens the matmul split
over the hidden size, summed in the routing kernel; past them tiled on the tensor cores, bf16 products in fp32),
each replayed as a CUDA graph over router-weight copies past twice the L2 (what the pass's compile-time timing
does). For the V2-Lite and V3 routers; prints a table, writes JSON with --out. It backs
``ROUTER_MATMUL_MAX_WEIGHT_BYTES`` and ``ROUTER_MATMUL_MAX_TOKENS`` in runtime/kernels/routing.py.

    python3 bench/moe_router.py --out DIR [--tokens 1,8,32,64,65,512,2048,4096]
"""
import argparse

import torch

from deepfuse.runtime import autotune
from deepfuse.runtime.kernels import routing

from sweep_out import Rows  # bench/, the scripts' own directory

ROUTERS = {  # name: (spec, experts, hidden)
    "v2-lite": (routing.RoutingSpec(6, scale=1.0), 64, 2048),
    "v3": (routing.RoutingSpec(8, "sigmoid", bias=True, groups=8, topk_group=4, group_score="top2_sum",
                               renormalize=True, scale=2.5), 256, 7168),
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--tokens", default="1,8,32,64,65,512,2048,4096")
    args = parser.parse_args()
    device, rows = torch.device("cuda"), Rows(args.out, "moe_router")  # written as it grows
    for name, (spec, e, h) in ROUTERS.items():
        ws = autotune.cold_copies(torch.empty(e, h, dtype=torch.bfloat16), device, cap=256)
        for w in ws:
            w.normal_(0, h ** -0.5)
        bias = torch.randn(e, device=device) * 0.1 if spec.bias else None
        for t in (int(v) for v in args.tokens.split(",")):
            x = torch.randn(t, h, device=device).bfloat16()
            forms = {
                "graph": lambda: [routing.route(torch.mm(x.float(), w.float().t()), bias, spec, torch.float32)
                                  for w in ws],
                "fused": lambda: [routing.route_hidden(x, w, bias, spec, torch.float32, torch.float32) for w in ws],
            }
            us = {f: autotune._time(fn) * 1e3 / len(ws) for f, fn in forms.items()}
            rows.append({"router": name, "experts": e, "hidden": h, "tokens": t, "copies": len(ws), **us})
            print(f"{name:<8} T={t:<3} graph {us['graph']:7.2f} us  fused {us['fused']:7.2f} us  "
                  f"({len(ws)} weight copies)", flush=True)


if __name__ == "__main__":
    main()
