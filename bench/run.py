"""deepfuse beside eager and torch.compile (Inductor, default) on the same inputs, in one process on the GPU.

    python bench/run.py [--out DIR]        (or ./dev bench)

Workloads (DeepSeek-V2-Lite shapes, bf16), at decode and prefill token counts:
- add_rms_norm: the decoder's residual add + RMSNorm (twice per layer), beside eager and Inductor;
- moe_block: one MoE layer (router, routed and shared experts), Hugging Face's DeepseekV2Moe with grouped_mm
  experts, eager, under Inductor, and under deepfuse (which finds the experts in that graph); with --moe-atomic
  also deepfuse's atomic combine (options={"deterministic": False});
- moe_block_fp8: the same layer under deepfuse in bf16 and with options={"quantize": "fp8-block"} (routed
  experts in FP8 blocks, run as the FP8 grouped kernels), each against its own floor, the FP8 one's error
  against bf16 printed;
- llama4_moe: Hugging Face's Llama4TextMoe at Llama-4-Scout's shape (16 experts top-1 of 8192, hidden 5120),
  whose forward runs every expert on every token (rows scaled by 0 for the unchosen), eager and under Inductor,
  beside deepfuse running the chosen experts only (--moe-tokens), against the sparse work's floor;
- gpt_oss_moe: Hugging Face's GptOssMLP at gpt-oss-20b's shape (32 experts top-4 of 2880, hidden 2880: biases,
  interleaved gate/up rows, clamped SwiGLU) with grouped_mm experts, eager and under Inductor, beside deepfuse;
- nemotron_moe: Hugging Face's NemotronHMoE at Nemotron-3-Nano-30B-A3B's shape (128 ungated experts top-6 of
  1856, squared ReLU, hidden 2688, an ungated shared MLP of 3712) with grouped_mm experts, eager and under
  Inductor, beside deepfuse;
- mla_decode, mla_decode_fp8: one decode step of the bundled model's attention over a bf16 latent cache, or
  over the FP8 one (c_kv in FP8 with per-token scales), eager, under Inductor and under deepfuse;
- mla_decode_hf: one decode step of HF's DeepseekV2Attention over its own (latent) DynamicCache, the same
  three, to set deepfuse's step against the HF eager step a user would otherwise run;
- mla_prefill, quant_matmul, fp8_model: see their functions.
Each is timed two ways with CUDA events (triton.testing.do_bench, median of many runs): "launched", calling
it from Python as a user would (host overhead included), and "graph", replaying a CUDA graph of the same
call (GPU time alone, what a captured decode step pays). Both are set against the physical floor: the
larger of bytes that must move / HBM bandwidth and FLOPs / bf16 matmul rate, both measured in the same run
(a 2 GiB device-to-device copy; an 8192^3 cuBLAS product). Prints a table, writes results.json and one PNG
chart per workload to --out.
"""
from __future__ import annotations

import argparse
import copy
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


def matmul_peak() -> float:
    """FLOP/s of an 8192^3 bf16 matrix product through cuBLAS on random data."""
    from triton.testing import do_bench

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median")
    return 2 * 8192**3 / (ms * 1e-3)


def hbm_bandwidth() -> float:
    """Bytes/s of a 2 GiB device-to-device copy, counting bytes read and written."""
    from triton.testing import do_bench

    src = torch.randn(1 << 30, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def median_call_ms(fn, iters: int, warmup: int = 2, before=None) -> float:
    """Median ms of one call of ``fn`` launched from Python (CUDA events around each call; host overhead and any
    host synchronization inside it count). ``before`` runs ahead of each timed call, untimed."""
    import statistics

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if before is not None:
            before()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(workload, t, impls, sets, floor_ms, floor_note, check):
    """Time each implementation on the same rotated input sets: launched from Python, and as CUDA-graph replay."""
    from triton.testing import do_bench

    rows = []
    rounds = len(sets)
    with torch.no_grad():
        ref = None
        for name, fn in impls.items():
            out = fn(*sets[0])  # compile (if it does) and check before timing
            ref = out if ref is None else ref
            err = check(out, ref)
            if err > 2e-2:
                raise SystemExit(f"{workload} {name} at T={t} disagrees with {next(iter(impls))}: relative error {err:.2e}")
            it = iter(range(1 << 62))
            ms = do_bench(lambda: fn(*sets[next(it) % rounds]), warmup=25, rep=300, return_mode="median")
            graphs = [_capture(fn, s) for s in sets]
            it = iter(range(1 << 62))
            graph_ms = do_bench(lambda: graphs[next(it) % rounds].replay(), warmup=25, rep=300, return_mode="median")
            rows.append({"workload": workload, "T": t, "impl": name, "ms": ms, "graph_ms": graph_ms,
                         "floor_ms": floor_ms, "floor": floor_note, "x_floor": graph_ms / floor_ms})
            # as it is measured, so a run cut short by a time limit still says what it got
            print(f"measured {workload} T={t} {name}: launched {ms:.4f} ms, graph {graph_ms:.4f} ms, "
                  f"{graph_ms / floor_ms:.2f} x floor", flush=True)
    return rows


def _floor(bytes_moved, flops, bandwidth, flops_peak) -> tuple[float, str]:
    """(ms, what bounds it): the larger of the bytes at the measured copy rate and the FLOPs at the measured
    matmul rate."""
    mem_ms, math_ms = bytes_moved / bandwidth * 1e3, flops / flops_peak * 1e3
    return (mem_ms, f"{bytes_moved / 1e6:.0f} MB") if mem_ms >= math_ms else (math_ms, f"{flops / 1e9:.0f} GFLOP")


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def v2_lite_moe_block():
    """Hugging Face's DeepseekV2Moe at DeepSeek-V2-Lite's shape (64 routed experts top-6 of 1408, 2 shared),
    grouped_mm experts, bf16 on the GPU, random weights of std 1/sqrt(fan-in)."""
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe

    cfg = DeepseekV2Config(hidden_size=HIDDEN, moe_intermediate_size=1408, n_routed_experts=64,
                           num_experts_per_tok=6, n_shared_experts=2, topk_method="greedy")
    cfg._experts_implementation = "grouped_mm"
    block = DeepseekV2Moe(cfg).cuda().bfloat16().eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, p.shape[-1] ** -0.5)
    return block


def bench_moe_block(tokens, bandwidth, rounds, flops_peak, fp8=False, atomic=False):
    """One DeepSeek-V2-Lite MoE block (router, 64 routed experts top-6 of size 1408, 2 shared experts), bf16:
    Hugging Face transformers' DeepseekV2Moe with grouped_mm experts, eager, under Inductor, and under
    deepfuse (which finds the MoE in the graph: the router after its matmul as one kernel, the routed and shared
    experts in the same grouped launches)."""
    block = v2_lite_moe_block()
    experts, k, inter = 64, 6, 1408
    routed = block.experts.gate_up_proj[0].numel() + block.experts.down_proj[0].numel()
    shared_params = sum(p.numel() for p in block.shared_experts.parameters())
    rows = []
    for t in tokens:
        sets = [(torch.randn(1, t, HIDDEN, device="cuda", dtype=torch.bfloat16),) for _ in range(rounds)]
        with torch.no_grad():
            active = max(int(torch.unique(block.gate(s[0])[2]).numel()) for s in sets)
        weight_bytes = (active * routed + shared_params + experts * HIDDEN) * 2
        act_bytes = 2 * t * HIDDEN * 2 + t * k * (inter * 2 * 2 + HIDDEN * 2 * 2)
        flops = 2 * t * (k * routed + shared_params + experts * HIDDEN)
        floor_ms, note = _floor(weight_bytes + act_bytes, flops, bandwidth, flops_peak)
        torch._dynamo.reset()
        if fp8:  # the routed and shared experts' bytes halve (FP8 plus one fp32 scale per 128 x 128 block); the
            # router stays bf16. The FP8 tensor-core rate taken as twice the measured bf16 one (Hopper's ratio).
            fp8_bytes = weight_bytes - (active * routed + shared_params) * (2 - 1 - 4 / 128 ** 2)
            fp8_ms = (fp8_bytes + act_bytes) / bandwidth * 1e3
            math_ms = flops / flops_peak * 1e3 / 2
            bf16 = torch.compile(block, backend="deepfuse")
            quantized = torch.compile(block, backend="deepfuse", options={"quantize": "fp8-block"})
            rows += measure("moe_block_fp8", t, {"deepfuse": bf16}, sets, floor_ms, note, _rel)
            rows += measure("moe_block_fp8", t, {"deepfuse fp8-block": quantized}, sets, max(fp8_ms, math_ms),
                            f"{(fp8_bytes + act_bytes) / 1e6:.0f} MB" if fp8_ms >= math_ms
                            else f"{flops / 1e9:.0f} GFLOP fp8", _rel)
            with torch.no_grad():
                print(f"moe_block_fp8 T={t}: fp8-block against bf16 deepfuse, relative error "
                      f"{_rel(quantized(*sets[0]), bf16(*sets[0])):.3e}")
            continue
        impls = {
            "hf_grouped_mm": block,
            "hf_grouped_mm+inductor": torch.compile(block),
            "deepfuse": torch.compile(block, backend="deepfuse"),
        }
        if atomic:  # the down kernel adding each slot's row into the token's fp32 row (no fixed order)
            impls["deepfuse atomic"] = torch.compile(block, backend="deepfuse", options={"deterministic": False})
        rows += measure("moe_block", t, impls, sets, floor_ms, note, _rel)
    return rows


def llama4_moe_block():
    """Hugging Face's Llama4TextMoe at Llama-4-Scout's shape (hidden 5120, 16 routed experts top-1 of 8192, one
    shared expert of 8192), bf16 on the GPU, random weights of std 1/sqrt(fan-in). Its forward runs every expert
    on every token, each on the rows scaled by its sigmoid score (0 for the unchosen)."""
    from transformers import Llama4TextConfig
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    cfg = Llama4TextConfig(hidden_size=5120, intermediate_size=8192, num_local_experts=16, num_experts_per_tok=1)
    block = Llama4TextMoe(cfg).cuda().bfloat16().eval()
    with torch.no_grad():
        for p in block.parameters():  # stacked experts [E, in, out], Linear weights [out, in]
            p.normal_(0, p.shape[-2 if p.dim() == 3 else -1] ** -0.5)
    return block


def bench_llama4_moe(tokens, bandwidth, rounds, flops_peak):
    """One Llama-4-Scout MoE block: Hugging Face transformers' dense form (every expert on every token) eager and
    under Inductor, and under deepfuse, which finds the routed experts by what they compute and runs the chosen
    ones only. Floor: the sparse work (the chosen experts' and the shared expert's bytes, or their FLOPs)."""
    block = llama4_moe_block()
    hidden, inter, experts, k = 5120, 8192, 16, 1
    expert_params = 3 * hidden * inter
    rows = []
    for t in tokens:
        sets = [(torch.randn(1, t, hidden, device="cuda", dtype=torch.bfloat16),) for _ in range(rounds)]
        with torch.no_grad():
            active = max(int(torch.unique(block.router(s[0].view(-1, hidden))[1].topk(k, dim=-1).indices).numel())
                         for s in sets)
        weight_bytes = (active * expert_params + expert_params + experts * hidden) * 2
        act_bytes = 2 * t * hidden * 2 + t * (k + 1) * (inter * 2 * 2 + hidden * 2 * 2)
        flops = 2 * t * ((k + 1) * expert_params + experts * hidden)
        floor_ms, note = _floor(weight_bytes + act_bytes, flops, bandwidth, flops_peak)
        torch._dynamo.reset()
        inductor, fused = torch.compile(block), torch.compile(block, backend="deepfuse")
        impls = {"hf_dense": lambda x: block(x)[0], "hf_dense+inductor": lambda x: inductor(x)[0],
                 "deepfuse": lambda x: fused(x)[0]}
        rows += measure("llama4_moe", t, impls, sets, floor_ms, note, _rel)
    return rows


def gpt_oss_moe_block():
    """Hugging Face's GptOssMLP at gpt-oss-20b's shape (hidden 2880, 32 experts top-4 of 2880), grouped_mm experts,
    bf16 on the GPU, random weights of std 1/sqrt(fan-in) and biases of std 0.1 (the checkpoint's are MXFP4;
    transformers dequantizes them to bf16 without the MXFP4 kernels, which is the form timed here)."""
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    cfg = GptOssConfig(hidden_size=2880, intermediate_size=2880, num_local_experts=32, num_experts_per_tok=4)
    cfg._experts_implementation = "grouped_mm"
    block = GptOssMLP(cfg).cuda().bfloat16().eval()
    with torch.no_grad():
        for name, p in block.named_parameters():  # stacked experts [E, in, out], biases [E, out], router [E, H]
            p.normal_(0, 0.1 if name.endswith("bias") else p.shape[-2 if p.dim() == 3 else -1] ** -0.5)
    return block


def bench_gpt_oss_moe(tokens, bandwidth, rounds, flops_peak):
    """One gpt-oss-20b MoE block: Hugging Face's grouped_mm experts eager and under Inductor, and deepfuse, which
    reads the biases, the interleaved gate/up rows and the clamped SwiGLU off the graph."""
    block = gpt_oss_moe_block()
    hidden, inter, experts, k = 2880, 2880, 32, 4
    expert_params = 3 * hidden * inter + 2 * inter + hidden
    rows = []
    for t in tokens:
        sets = [(torch.randn(1, t, hidden, device="cuda", dtype=torch.bfloat16),) for _ in range(rounds)]
        with torch.no_grad():
            active = max(int(torch.unique(block.router(s[0].view(-1, hidden))[2]).numel()) for s in sets)
        weight_bytes = (active * expert_params + experts * (hidden + 1)) * 2
        act_bytes = 2 * t * hidden * 2 + t * k * (inter * 2 * 2 + hidden * 2 * 2)
        flops = 2 * t * (k * 3 * hidden * inter + experts * hidden)
        floor_ms, note = _floor(weight_bytes + act_bytes, flops, bandwidth, flops_peak)
        torch._dynamo.reset()
        impls = {"hf_grouped_mm": lambda x: block(x)[0], "hf_grouped_mm+inductor": torch.compile(lambda x: block(x)[0]),
                 "deepfuse": torch.compile(lambda x: block(x)[0], backend="deepfuse")}
        rows += measure("gpt_oss_moe", t, impls, sets, floor_ms, note, _rel)
    return rows


def nemotron_moe_block():
    """Hugging Face's NemotronHMoE at Nemotron-3-Nano-30B-A3B's shape (hidden 2688; 128 ungated experts top-6 of
    1856, squared ReLU; sigmoid routing with a score-correction bias, renormalized, x 2.5; an ungated shared MLP
    of 3712), grouped_mm experts, bf16 on the GPU, random weights of std 1/sqrt(fan-in)."""
    from transformers import NemotronHConfig
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMoE

    cfg = NemotronHConfig(hidden_size=2688, moe_intermediate_size=1856, n_routed_experts=128, num_experts_per_tok=6,
                          moe_shared_expert_intermediate_size=3712, n_group=1, topk_group=1,
                          routed_scaling_factor=2.5, norm_topk_prob=True)
    cfg._experts_implementation = "grouped_mm"
    block = NemotronHMoE(cfg).cuda().bfloat16().eval()
    with torch.no_grad():
        for p in block.parameters():  # stacked experts [E, out, in], Linear and router weights [out, in]
            p.normal_(0, p.shape[-1] ** -0.5)
    return block


def bench_nemotron_moe(tokens, bandwidth, rounds, flops_peak):
    """One Nemotron-3-Nano MoE block: Hugging Face's grouped_mm experts eager and under Inductor, and deepfuse, which
    runs the ungated experts and the ungated shared MLP in the same launches. Floor: the chosen experts', the
    shared MLP's and the router's bytes, or their FLOPs."""
    block = nemotron_moe_block()
    hidden, inter, shared, experts, k = 2688, 1856, 3712, 128, 6
    expert_params = 2 * hidden * inter
    rows = []
    for t in tokens:
        sets = [(torch.randn(1, t, hidden, device="cuda", dtype=torch.bfloat16),) for _ in range(rounds)]
        with torch.no_grad():
            active = max(int(torch.unique(block.gate(s[0])[2]).numel()) for s in sets)
        weight_bytes = (active * expert_params + 2 * hidden * shared + experts * hidden) * 2
        act_bytes = 2 * t * hidden * 2 + t * (k * (inter + hidden) + shared) * 2 * 2
        flops = 2 * t * (k * expert_params + 2 * hidden * shared + experts * hidden)
        floor_ms, note = _floor(weight_bytes + act_bytes, flops, bandwidth, flops_peak)
        torch._dynamo.reset()
        impls = {"hf_grouped_mm": block, "hf_grouped_mm+inductor": torch.compile(block),
                 "deepfuse": torch.compile(block, backend="deepfuse")}
        rows += measure("nemotron_moe", t, impls, sets, floor_ms, note, _rel)
    return rows


def bench_mla_decode(batches, contexts, bandwidth, rounds, fp8=False):
    """One decode step of V2-Lite attention (16 heads, kv rank 512, rope 64, nope 128, v 128; q without LoRA)
    over a latent cache filled to ``context`` tokens, bf16: the bundled model's MLA module (absorbed form,
    writing its cache in place) eager, under Inductor, under deepfuse. Floor: the latent cache plus the
    attention weights, read once, at the measured HBM bandwidth. ``fp8``: the FP8 latent cache (c_kv in FP8
    with a scale per token, k_pe bf16: 644 bytes per token against 1152), the same three beside each other."""
    from deepfuse.models import get_config
    from deepfuse.runtime.latent_cache import LatentKVCache, quantize_latent
    from deepfuse.models.model import MLA, rope_cos_sin

    cfg = get_config("v2-lite")
    cfg.num_hidden_layers = 1
    attn = MLA(cfg, 0, "absorb").cuda().bfloat16().eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, p.shape[-1] ** -0.5)
    weight_bytes = sum(p.numel() for p in attn.parameters()) * 2
    rows = []
    for b in batches:
        for t in contexts:
            cache = LatentKVCache(cfg, b, t, torch.bfloat16, "cuda", fp8=fp8).layers[0]  # the one layer's part
            cache.pe.normal_()
            if fp8:
                cache.kv[:], cache.kv_scale[:] = quantize_latent(torch.randn(cache.kv.shape, device="cuda"))
            else:
                cache.kv.normal_()
            cos, sin = rope_cos_sin(cfg, torch.tensor([t - 1], device="cuda"))
            sets = [(torch.randn(b, 1, HIDDEN, device="cuda", dtype=torch.bfloat16),) for _ in range(rounds)]
            latent = b * t * cache.bytes_per_token()
            floor_ms = (latent + weight_bytes) / bandwidth * 1e3
            torch._dynamo.reset()

            def step(module):
                return lambda x: module(x, t - 1, cos, sin, None, cache)

            impls = {
                "bundled_absorb_eager": step(attn),
                "bundled+inductor": step(torch.compile(attn)),
                "deepfuse": step(torch.compile(attn, backend="deepfuse")),
            }
            rows += measure(f"mla_decode{'_fp8' if fp8 else ''}_b{b}", t, impls, sets, floor_ms,
                            f"{latent / 1e6:.0f} MB latent", _rel)
    return rows


def bench_mla_decode_hf(batches, contexts, bandwidth, rounds):
    """One decode step of Hugging Face's DeepseekV2Attention (V2-Lite dims, SDPA) over its DynamicCache, which
    holds the latent (c_kv | k_pe) and grows by concatenation: HF eager (which re-expands every cached token
    into per-head keys and values each step), under Inductor, and under deepfuse (whose mla pass finds the
    attention over the latent HF's cache returns). The cache holds ``context - 1`` random tokens before every
    call (its tensors are put back, no copy), the step writes the last one. The floor is mla_decode's: the
    latent and the attention weights read once."""
    from transformers import DynamicCache

    from deepfuse.runtime.latent_cache import bytes_per_token

    attn, rope = v2_lite_attention()
    cfg = attn.config
    c, r = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    weight_bytes = sum(p.numel() for p in attn.parameters()) * 2
    rows = []
    for b in batches:
        for t in contexts:
            prefix = (torch.randn(b, 1, t - 1, c, device="cuda", dtype=torch.bfloat16),
                      torch.randn(b, 1, t - 1, r, device="cuda", dtype=torch.bfloat16))
            cache = DynamicCache()
            cache.update(*prefix, 0)
            layer = cache.layers[0]
            pos = rope(prefix[0], torch.full((b, 1), t - 1, device="cuda"))
            # HF's expanded keys and values are [B, heads, T, 192 + 128] per call; each input set is captured in
            # a CUDA graph of its own, so past 8 GiB of them one set is timed, not ``rounds``
            expanded = b * cfg.num_attention_heads * t * (192 + 128) * 2
            sets = [(torch.randn(b, 1, HIDDEN, device="cuda", dtype=torch.bfloat16),)
                    for _ in range(rounds if expanded * rounds <= 8 << 30 else 1)]
            latent = b * t * bytes_per_token(*prefix)
            floor_ms = (latent + weight_bytes) / bandwidth * 1e3
            torch._dynamo.reset()

            def step(module):
                def call(x):
                    layer.keys, layer.values = prefix  # the same t - 1 tokens before every step
                    return module(x, None, cache, pos)[0]
                return call

            impls = {
                "hf_sdpa_eager": step(attn),
                "hf_sdpa+inductor": step(torch.compile(attn)),
                "deepfuse": step(torch.compile(attn, backend="deepfuse")),
            }
            if expanded > 24 << 30:  # eager's and Inductor's graphs would each hold a copy in its own pool
                print(f"mla_decode_hf b={b} T={t}: HF's forms left out ({expanded / 2**30:.0f} GiB of expanded "
                      f"keys and values per step); deepfuse alone, against the floor", flush=True)
                impls = {"deepfuse": impls["deepfuse"]}
            rows += measure(f"mla_decode_hf_b{b}", t, impls, sets, floor_ms, f"{latent / 1e6:.0f} MB latent", _rel)
    return rows


def v2_lite_attention():
    """Hugging Face's DeepseekV2Attention at DeepSeek-V2-Lite's shape (16 heads, kv rank 512, q without LoRA),
    SDPA, bf16 on the GPU, random weights of std 1/sqrt(fan-in); and its rotary embedding."""
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Attention, DeepseekV2RotaryEmbedding

    cfg = DeepseekV2Config(hidden_size=HIDDEN, num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512,
                           q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128)
    cfg._attn_implementation = "sdpa"
    attn = DeepseekV2Attention(cfg, 0).cuda().bfloat16().eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, p.shape[-1] ** -0.5)
    return attn, DeepseekV2RotaryEmbedding(cfg).cuda()


def bench_mla_prefill(tokens, rounds, flops_peak):
    """Prefill of one V2-Lite attention layer (causal, batch 1), bf16: Hugging Face transformers'
    DeepseekV2Attention (SDPA) eager, under Inductor, under deepfuse (attention core fused; projections,
    norm and rope with Inductor). Floor: the attention's causal FLOPs plus the projections', at cuBLAS's
    measured bf16 rate."""
    from deepfuse.runtime.kernels import mla

    attn, rope = v2_lite_attention()
    proj = sum(p.numel() for n, p in attn.named_parameters() if p.dim() == 2)
    rows = []
    for t in tokens:
        x = torch.randn(1, t, HIDDEN, device="cuda", dtype=torch.bfloat16)
        pos = rope(x, torch.arange(t, device="cuda")[None])
        sets = [(torch.randn(1, t, HIDDEN, device="cuda", dtype=torch.bfloat16),) for _ in range(rounds)]
        flops = mla.flops(1, t, t, 16, 128, 64, 128, causal=True) + 2 * t * proj
        floor_ms = flops / flops_peak * 1e3
        torch._dynamo.reset()

        def call(module):
            return lambda h: module(h, None, None, pos)[0]

        impls = {
            "hf_sdpa": call(attn),
            "hf_sdpa+inductor": call(torch.compile(attn)),
            "deepfuse": call(torch.compile(attn, backend="deepfuse")),
        }
        rows += measure("mla_prefill", t, impls, sets, floor_ms, f"{flops / 1e9:.0f} GFLOP", _rel)
    return rows


# V2-Lite projection shapes (N, K): attention q (16 heads x 192), kv up-projection, output; the dense MLP of layer 0.
QUANT_SHAPES = {"q_proj": (3072, 2048), "kv_b_proj": (4096, 512), "o_proj": (2048, 2048),
                "mlp_gate_up": (21888, 2048), "mlp_down": (2048, 10944)}


def _timed_graph(fn, calls):
    """Median ms of one call of ``fn(i)``: a CUDA graph runs it for every i in ``calls`` (distinct weight copies,
    together larger than L2, so each call streams its weights from HBM), divided by the number of calls."""
    from triton.testing import do_bench

    graph = _capture(lambda: [fn(i) for i in calls], ())
    return do_bench(graph.replay, warmup=10, rep=200, return_mode="median") / len(calls)


def bench_quant_matmul(tokens, bandwidth, flops_peak, square=8192):
    """Quantized linear layers: deepfuse's FP8 block-scaled GEMM (activations quantized per token and 128-wide
    K tile, in the K loop or by a pre-kernel; both timed with the quantization included) and its int8
    weight-only GEMM, beside cuBLAS bf16 (torch.mm) and cuBLAS row-wise FP8 (torch._scaled_mm over
    activations already quantized per row: the quantization is not in its time). The floor: weight and
    activation bytes / HBM, or FLOPs / (2 x the measured bf16 rate, the FP8 tensor-core rate)."""
    from deepfuse.runtime.kernels import quant as q

    shapes = [(name, m, n, k) for m in tokens for name, (n, k) in QUANT_SHAPES.items()]
    shapes.append((f"square{square}", square, square, square))
    rows = []
    for name, m, n, k in shapes:
        copies = max(2, min(32, (256 << 20) // (n * k)))
        xs = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5 for _ in range(copies)]
        fp8 = [q.quantize_weight(w, "fp8-block") for w in dense]
        int8 = [q.quantize_weight(w, "int8-channel") for w in dense]
        x_row = xs.float().abs().amax(1, keepdim=True).clamp(min=1e-12) / 448
        xq_row = (xs.float() / x_row).to(torch.float8_e4m3fn)
        w_row = [(w.float().abs().amax(1, keepdim=True).clamp(min=1e-12) / 448) for w in dense]
        wq_row = [(w.float() / s).to(torch.float8_e4m3fn) for w, s in zip(dense, w_row)]
        impls = {
            "cublas_bf16": (lambda i: xs @ dense[i].t(), 2),
            "scaled_mm_fp8_rowwise": (lambda i: torch._scaled_mm(xq_row, wq_row[i].t(), scale_a=x_row,
                                                                 scale_b=w_row[i].t(), out_dtype=torch.bfloat16), 1),
            "deepfuse_fp8_block": (lambda i: q.quant_matmul(xs, *fp8[i], None, "fp8-block", True), 1),
            "deepfuse_fp8_block_fused_quant": (
                lambda i: q.quant_matmul(xs, *fp8[i], None, "fp8-block", True, prequantize=False), 1),
            "deepfuse_fp8_block_prequant": (
                lambda i: q.quant_matmul(xs, *fp8[i], None, "fp8-block", True, prequantize=True), 1),
            "deepfuse_int8_weight_only": (lambda i: q.quant_matmul(xs, *int8[i], None, "int8-channel", False), 1),
        }
        flops = 2 * m * n * k
        for impl, (fn, wbytes) in impls.items():
            weight_bytes = n * k * wbytes
            floor_ms = max((weight_bytes + 2 * m * k + 2 * m * n) / bandwidth, flops / (2 * flops_peak)) * 1e3
            try:
                with torch.no_grad():
                    out = fn(0)
                    if impl.startswith("deepfuse"):
                        fmt = "int8-channel" if "int8" in impl else "fp8-block"
                        w8, sc = (int8 if "int8" in impl else fp8)[0]
                        ref = q.reference(xs, w8, sc, None, fmt, fmt == "fp8-block", compute=torch.float64)
                        err = _rel(out, ref)
                        if err > 2e-2:
                            raise SystemExit(f"quant_matmul {impl} {name} M={m}: relative error {err:.2e}")
                    ms = _timed_graph(fn, range(copies))
            except RuntimeError as e:  # e.g. a cuBLAS FP8 path that rejects a shape
                print(f"quant_matmul {impl} {name} M={m}: skipped ({str(e).splitlines()[0][:120]})")
                continue
            rows.append({"workload": "quant_matmul", "T": m, "shape": f"{name} {n}x{k}", "impl": impl,
                         "ms": ms, "graph_ms": ms, "floor_ms": floor_ms, "x_floor": ms / floor_ms,
                         "tflops": flops / ms * 1e-9, "weight_tbps": weight_bytes / ms * 1e-9,
                         "floor": f"{weight_bytes / 1e6:.1f} MB weights" if flops / (2 * flops_peak) <
                         weight_bytes / bandwidth else f"{flops / 1e9:.0f} GFLOP"})
    return rows


def bench_fp8_model(prompts=8, length=256):
    """The bundled model (v3-small config: 8 layers, hidden 1024, 64 experts) in bf16 and with its linear layers
    and its routed experts quantized to FP8 by options["quantize"] (W8A8, 128x128 blocks): the logits' top-1
    agreement and KL(bf16 || fp8) over random prompts, beside the same figures for fp32 against bf16 (eager, the
    same weights: a yardstick for near-flat random-weight logits), and the prefill time of both under deepfuse."""
    from deepfuse.models import DeepSeekForCausalLM, get_config

    from triton.testing import do_bench

    cfg = get_config("v3-small")
    model = DeepSeekForCausalLM.from_config(cfg, device="cuda", dtype=torch.bfloat16, seed=0)
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (prompts, length), device="cuda", generator=gen)
    rows = []
    with torch.no_grad():
        torch._dynamo.reset()
        bf16 = torch.compile(model, backend="deepfuse")
        ref = bf16(ids).float()
        ms_bf16 = do_bench(lambda: bf16(ids), warmup=5, rep=50, return_mode="median")
        torch._dynamo.reset()
        fp8 = torch.compile(model, backend="deepfuse", options={"quantize": "fp8-block"})
        out = fp8(ids).float()
        ms_fp8 = do_bench(lambda: fp8(ids), warmup=5, rep=50, return_mode="median")
        # The yardstick: bf16 against the same weights in fp32 (eager), so top-1 agreement on near-flat
        # random-weight logits has something to be read against.
        torch._dynamo.reset()
        fp32 = copy.deepcopy(model).float()(ids).float()

    def compare(p, q):  # (top-1 agreement, KL(p || q) in nats per token)
        logp, logq = p.log_softmax(-1), q.log_softmax(-1)
        return (p.argmax(-1) == q.argmax(-1)).float().mean().item(), (logp.exp() * (logp - logq)).sum(-1).mean().item()

    agree, kl = compare(ref, out)
    agree32, kl32 = compare(fp32, ref)
    for impl, ms in (("deepfuse_bf16", ms_bf16), ("deepfuse_fp8", ms_fp8)):
        rows.append({"workload": "fp8_model", "T": prompts * length, "impl": impl, "ms": ms, "graph_ms": ms,
                     "floor_ms": float("nan"), "x_floor": float("nan"), "floor": "n/a",
                     "top1_agreement": agree, "kl_bf16_fp8": kl, "top1_agreement_fp32_bf16": agree32,
                     "kl_fp32_bf16": kl32})
    print(f"fp8_model: v3-small, {prompts} prompts x {length} tokens: top-1 agreement {agree:.4f}, "
          f"KL(bf16||fp8) {kl:.2e} nats/token (yardstick fp32 against bf16: {agree32:.4f}, {kl32:.2e}); "
          f"prefill {ms_bf16:.2f} ms bf16, {ms_fp8:.2f} ms fp8")
    return rows


def bench_rms_norm(tokens, bandwidth, rounds):
    """The decoder's residual add + RMSNorm (twice per layer) at decode and prefill token counts."""
    model = ResidualRMSNorm(HIDDEN).cuda().bfloat16()
    rows = []
    for t in tokens:
        # Several input sets, rotated, so large and small shapes alike are read from HBM, not L2.
        sets = [(torch.randn(t, HIDDEN, device="cuda", dtype=torch.bfloat16),
                 torch.randn(t, HIDDEN, device="cuda", dtype=torch.bfloat16)) for _ in range(rounds)]
        floor_bytes = 4 * t * HIDDEN * 2 + HIDDEN * 2  # x, residual read; y, h written; weight read
        torch._dynamo.reset()
        impls = {
            "eager": model,
            "inductor": torch.compile(model),
            "deepfuse": torch.compile(model, backend="deepfuse"),
        }
        rows += measure("add_rms_norm", t, impls, sets, floor_bytes / bandwidth * 1e3,
                        f"{floor_bytes / 1e6:.2f} MB", lambda o, r: max(_rel(a, b) for a, b in zip(o, r)))
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

    commit = os.environ.get("DEEPFUSE_COMMIT")  # a copied working tree may carry a stale .git
    if not commit:
        try:
            commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                             stderr=subprocess.DEVNULL).strip()
        except Exception:
            commit = "unknown"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    return {"device": device, "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "commit": commit, "command": " ".join(["python"] + sys.argv)}


def floor_chart(rows, labels: dict, case_of, ylabel: str, title: str, path: str) -> None:
    """Bars of each row's time / floor (log scale): one group per case (``labels``: case -> tick label, in
    order), one bar per implementation; ``case_of(row)`` is a row's case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(labels)
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        ratio = {case_of(r): r["x_floor"] for r in rows if r["impl"] == impl}
        present = [j for j, c in enumerate(cases) if c in ratio]
        ax.bar([j + i * width for j in present], [ratio[cases[j]] for j in present], width, label=impl)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xticks([j + width * (len(impls) - 1) / 2 for j in range(len(cases))], list(labels.values()))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def chart(rows, path, title):
    floor_chart(rows, {t: f"T={t}" for t in sorted({r["T"] for r in rows})}, lambda r: r["T"],
                "CUDA-graph time / HBM floor (log; lower is better)",
                f"{title}, V2-Lite shapes, bf16 ({torch.cuda.get_device_name()})", path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/out")
    parser.add_argument("--tokens", default="1,64,512,4096,16384")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--workloads", default="add_rms_norm,moe_block")
    parser.add_argument("--moe-tokens", default="1,8,64,512,4096")
    parser.add_argument("--moe-atomic", action="store_true",
                        help="moe_block: also deepfuse with options={'deterministic': False} (the atomic combine)")
    parser.add_argument("--mla-batches", default="1,64")
    parser.add_argument("--mla-contexts", default="4096,32768")
    parser.add_argument("--mla-prefill-tokens", default="1024,4096")
    parser.add_argument("--quant-tokens", default="1,16,128,4096")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/run.py measures GPU kernels: it needs CUDA")
    os.makedirs(args.out, exist_ok=True)
    bandwidth, peak = hbm_bandwidth(), matmul_peak()
    workloads = args.workloads.split(",")
    rows = []
    if "add_rms_norm" in workloads:
        rows += bench_rms_norm([int(t) for t in args.tokens.split(",")], bandwidth, args.rounds)
    if "moe_block" in workloads:
        rows += bench_moe_block([int(t) for t in args.moe_tokens.split(",")], bandwidth, args.rounds, peak,
                                atomic=args.moe_atomic)
    if "gpt_oss_moe" in workloads:
        rows += bench_gpt_oss_moe([int(t) for t in args.moe_tokens.split(",")], bandwidth, args.rounds, peak)
    if "nemotron_moe" in workloads:
        rows += bench_nemotron_moe([int(t) for t in args.moe_tokens.split(",")], bandwidth, args.rounds, peak)
    if "llama4_moe" in workloads:
        rows += bench_llama4_moe([int(t) for t in args.moe_tokens.split(",")], bandwidth, args.rounds, peak)
    if "moe_block_fp8" in workloads:
        rows += bench_moe_block([int(t) for t in args.moe_tokens.split(",")], bandwidth, args.rounds, peak, fp8=True)
    if "mla_decode" in workloads:
        rows += bench_mla_decode([int(b) for b in args.mla_batches.split(",")],
                                 [int(t) for t in args.mla_contexts.split(",")], bandwidth, args.rounds)
    if "mla_decode_fp8" in workloads:
        rows += bench_mla_decode([int(b) for b in args.mla_batches.split(",")],
                                 [int(t) for t in args.mla_contexts.split(",")], bandwidth, args.rounds, fp8=True)
    if "mla_decode_hf" in workloads:
        rows += bench_mla_decode_hf([int(b) for b in args.mla_batches.split(",")],
                                    [int(t) for t in args.mla_contexts.split(",")], bandwidth, args.rounds)
    if "mla_prefill" in workloads:
        rows += bench_mla_prefill([int(t) for t in args.mla_prefill_tokens.split(",")], args.rounds, peak)
    if "quant_matmul" in workloads:
        rows += bench_quant_matmul([int(t) for t in args.quant_tokens.split(",")], bandwidth, peak)
    if "fp8_model" in workloads:
        rows += bench_fp8_model()
    env = dict(environment(), hbm_copy_tbps=bandwidth / 1e12, bf16_matmul_tflops=peak / 1e12)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"environment": env, "results": rows}, f, indent=1)
    for w in dict.fromkeys(r["workload"] for r in rows):
        if w not in ("quant_matmul", "fp8_model"):  # one bar per shape and impl: a table, not this chart
            chart([r for r in rows if r["workload"] == w], os.path.join(args.out, f"{w}.png"), w)
    print(f"{env['device']}  torch {env['torch']}  triton {env['triton']}  commit {env['commit']}  "
          f"HBM copy {env['hbm_copy_tbps']:.2f} TB/s  bf16 matmul {env['bf16_matmul_tflops']:.0f} TFLOP/s")
    print("median ms: 'launched' = called from Python (host overhead in); 'graph' = CUDA-graph replay (GPU time)")
    print(f"{'workload':<14}{'T':>6}  {'impl':<24}{'launched':>10}{'graph':>9}{'floor':>9}{'graph/floor':>12}  floor is")
    for r in rows:
        if r["workload"] == "fp8_model":
            continue  # printed by bench_fp8_model
        if r["workload"] == "quant_matmul":
            print(f"{'quant_matmul':<14}{r['T']:>6}  {r['impl']:<31}{r['shape']:<24}{r['graph_ms']:>9.4f}"
                  f"{r['floor_ms']:>9.4f}{r['x_floor']:>7.2f}  {r['tflops']:>7.1f} TFLOP/s {r['weight_tbps']:>5.2f} TB/s")
            continue
        print(f"{r['workload']:<14}{r['T']:>6}  {r['impl']:<24}{r['ms']:>10.4f}{r['graph_ms']:>9.4f}"
              f"{r['floor_ms']:>9.4f}{r['x_floor']:>12.2f}  {r['floor']}")


if __name__ == "__main__":
    main()
