"""Where one prefill attention layer's time goes: Hugging Face's DeepseekV2Attention (V2-Lite shape, SDPA, causal,
batch 1, bf16) under Inductor and under deepfuse, each captured as a CUDA graph and replayed under the profiler;
prints each one's kernels by GPU time (the gap between them in bench/run.py's mla_prefill rows lies outside the
attention kernel, which alone beats SDPA: bench/RESULTS.md).

    python3 bench/mla_prefill_profile.py [--tokens 4096] [--replays 20]
"""
import argparse

import torch

import deepfuse  # noqa: F401  (the backend)

from run import _capture, v2_lite_attention  # bench/, the scripts' own directory


def _profile(fn, replays):
    fn()  # compiles, outside the capture
    graph = _capture(fn, ())
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    return prof


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--replays", type=int, default=20)
    args = parser.parse_args()
    attn, rope = v2_lite_attention()
    x = torch.randn(1, args.tokens, attn.config.hidden_size, device="cuda", dtype=torch.bfloat16)
    pos = rope(x, torch.arange(args.tokens, device="cuda")[None])
    with torch.no_grad():
        for name, backend in (("hf_sdpa+inductor", "inductor"), ("deepfuse", "deepfuse")):
            torch._dynamo.reset()
            f = torch.compile(attn, backend=backend)
            prof = _profile(lambda: f(x, None, None, pos)[0], args.replays)
            print(f"== {name}: {args.replays} replays, T={args.tokens}")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=90))


if __name__ == "__main__":
    main()
