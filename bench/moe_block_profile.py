"""Where one MoE layer's time goes: Hugging Face's DeepseekV2Moe (V2-Lite shape, grouped_mm experts, bf16) under
deepfuse, captured as a CUDA graph and replayed 50 times under the profiler; prints the kernels by GPU time.

    python3 bench/moe_block_profile.py [--tokens 1] [--quantize fp8-block]
"""
import argparse

import torch
import transformers
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe

import deepfuse  # noqa: F401  (the backend)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=1)
    parser.add_argument("--quantize", default="fp8-block", help="'none' for the bf16 block")
    parser.add_argument("--replays", type=int, default=50)
    args = parser.parse_args()
    cfg = transformers.DeepseekV2Config(hidden_size=2048, moe_intermediate_size=1408, n_routed_experts=64,
                                        num_experts_per_tok=6, n_shared_experts=2, topk_method="greedy")
    cfg._experts_implementation = "grouped_mm"
    block = DeepseekV2Moe(cfg).cuda().bfloat16().eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, p.shape[-1] ** -0.5)
    x = torch.randn(1, args.tokens, 2048, device="cuda", dtype=torch.bfloat16)
    options = {} if args.quantize == "none" else {"quantize": args.quantize}
    f = torch.compile(block, backend="deepfuse", options=options)
    with torch.no_grad():
        for _ in range(3):
            f(x)
        graph, side = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            f(x)
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            f(x)
        for _ in range(10):
            graph.replay()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(args.replays):
                graph.replay()
            torch.cuda.synchronize()
    print(f"{args.replays} replays, T={args.tokens}, quantize={args.quantize}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=90))


if __name__ == "__main__":
    main()
