"""Where deepfuse's passes spend their time on the bundled model compiled whole (one graph, every layer in it),
on any device, the CPU included: ``deepfuse.explain`` over a prompt, its report's seconds per pass and the
wall time of the whole call (tracing, the passes, the plain run of the model).

    python3 bench/pass_time.py --config v2-lite --layers 4 --tokens 16 [--quantize fp8-block] --out DIR

Random weights (seeded), bf16. The MoE and quant passes check what a region computes by running it on random
inputs of its real shapes (about 10 s a V2-Lite MoE layer on a 2-core CPU); a model's identical layers share
one check.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import deepfuse  # noqa: E402
from deepfuse.models import DeepSeekForCausalLM, get_config  # noqa: E402
from run import environment  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="v2-lite")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--quantize", default="", help="fp8-block or int8-weight (attention left in bf16)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="directory for pass_time_<tag>.json")
    args = parser.parse_args()

    cfg = get_config(args.config, num_hidden_layers=args.layers)
    model = DeepSeekForCausalLM.from_config(cfg, device=args.device, dtype=torch.bfloat16, seed=0)
    prompt = torch.randint(0, cfg.vocab_size, (1, args.tokens), device=args.device)
    cache = model.new_cache(1, args.tokens + 8)
    options = {"quantize": args.quantize, "quantize_skip": ("self_attn",)} if args.quantize else {}
    start = time.perf_counter()
    report = deepfuse.explain(model, prompt, 0, cache, **options)
    wall = time.perf_counter() - start
    result = {"config": args.config, "layers": args.layers, "tokens": args.tokens, "quantize": args.quantize,
              "explain_s": round(wall, 2), "pass_s": {k: round(v, 2) for k, v in report.pass_seconds.items()},
              "matches": len(report.matches), "declined": len(report.declined), "environment": environment()}
    print(json.dumps({k: v for k, v in result.items() if k != "environment"}), flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        tag = f"{args.config}_{args.layers}l_{args.tokens}t{'_' + args.quantize if args.quantize else ''}"
        with open(os.path.join(args.out, f"pass_time_{tag}.json"), "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
