"""Where one MoE layer's time goes: Hugging Face's DeepseekV2Moe (V2-Lite shape, grouped_mm experts, bf16) under
deepfuse, captured as a CUDA graph and replayed 50 times under the profiler; prints the kernels by GPU time.

    python3 bench/moe_block_profile.py [--tokens 1] [--quantize fp8-block]
"""
import argparse

import torch

import deepfuse  # noqa: F401  (the backend)

from run import v2_lite_moe_block  # bench/, the scripts' own directory


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=1)
    parser.add_argument("--quantize", default="fp8-block", help="'none' for the bf16 block")
    parser.add_argument("--replays", type=int, default=50)
    args = parser.parse_args()
    block = v2_lite_moe_block()
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
