"""End to end: the bundled DeepSeek-V2-Lite (27 layers, 15.7B parameters, random weights, bf16) compiled by
deepfuse, beside the bundled model in eager and Hugging Face transformers' DeepseekV2ForCausalLM (grouped_mm
experts) in eager and under torch.compile's default, on the same prompt, in one process on one GPU.

    python bench/e2e.py --out DIR [--layers 27] [--prefill 2048] [--context 2048] [--batches 1,32]
                        [--impls bundled,deepfuse,hf,hf_inductor] [--fp8] [--last-logits]
                        [--quantize fp8-block [--quantize-skip self_attn,lm_head]] [--cache-len N]
                        [--inductor-config KEY=VALUE ...] [--deepfuse-batches 0] [--shared-fused-max-tokens N]

Measured (CUDA events, median; every call launched from Python as a user would):
- prefill of one sequence of --prefill tokens (logits of every position; with --last-logits, of the last one
  only, as a generating prefill needs: every implementation is asked for that, HF transformers through its own
  ``logits_to_keep``, and the floor leaves out the output projection of the other positions);
- one decode step of batch 1 at a context of --context tokens (ms per token), and of each batch in --batches
  (tokens/s). For decode timing the cache holds random latents up to the context (what is in it does not
  change the work); the step writes position `context` and attends over everything before it. deepfuse's step
  is timed twice: "decode", each call alone (synchronized after it, so it starts its CUDA graph on an idle GPU),
  and "decode loop", 50 steps queued back to back with each step's argmax fed to the next, as generate() runs
  them: the time per generated token;
- deepfuse: compiled with mode="reduce-overhead" over the static latent cache (positions as device tensors: one
  decode graph for every context length), either whole (--compile whole: one CUDA graph per step) or block by
  block (--compile blocks: one graph per kind of block, reused by every layer, and each decode step captured
  whole as one CUDA graph by deepfuse.runtime.cuda_graph.CapturedStep). Its compile time
  is the wall time of the first prefill call, and of the first three decode calls of each batch size
  (tracing, passes, kernel generation, autotuning, Inductor, CUDA-graph recording). Inductor's FX graph cache is
  off while the match report is collected; with --no-collect it is on, and a second run measures a warm compile
  (deepfuse's kernel and autotune caches and Triton's are on disk either way);
- greedy generation of --gen-tokens tokens after the prompt, deepfuse against the bundled model in eager bf16:
  how many tokens agree before the first divergence (bf16 under a different fusion order can flip near-ties);
  the yardstick is eager bf16 against itself with the other attention form (naive vs absorb). With --quantize and
  --compile blocks, also against the same quantized model compiled with no pattern pass (Inductor's plain
  dequantize-then-matmul forms): the quantized model's own reference, which eager bf16 is not;
Floors: decode, the bytes one step must read (weights it touches, in their stored format, and the latent cache)
over the measured HBM bandwidth; prefill, its matmul and attention FLOPs over the measured bf16 matmul rate (with
--fp8, twice that: FP8's tensor-core rate on Hopper). With --quantize (deepfuse's own compile-time conversion of the
bf16 model, --quantize-skip naming the modules left bf16) the floors stay the bf16 model's. Writes e2e_results.json
and e2e.png to --out.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from run import environment, floor_chart, hbm_bandwidth, matmul_peak, median_call_ms as median_ms  # noqa: E402


def fill_cache(cache, context: int) -> None:
    """Random latents in positions 0 .. context-1 (normalized c_kv and roped k_pe are O(1)); an FP8 cache
    stores them quantized per token, as its update would."""
    from deepfuse.runtime.latent_cache import quantize_latent

    gen = torch.Generator(device="cuda").manual_seed(7)
    for layer in cache.layers:
        layer.pe[:, :context].normal_(generator=gen)
        if layer.kv_scale is None:
            layer.kv[:, :context].normal_(generator=gen)
        else:
            rows = torch.randn(layer.kv[:, :context].shape, device="cuda", generator=gen)
            layer.kv[:, :context], layer.kv_scale[:, :context] = quantize_latent(rows)


def decode_bytes(cfg, params: dict, batch: int, context: int, cache_bytes_per_token: int) -> float:
    """Bytes one decode step reads at least: every weight but the routed experts and the embedding table, the
    routed experts the batch's tokens are expected to touch (uniform routing), and the latent cache
    (``cache_bytes_per_token`` per token and layer)."""
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    touched = e * (1 - (1 - k / e) ** batch)
    moe_layers = cfg.num_hidden_layers - cfg.first_k_dense_replace
    expert = params["expert_bytes"]
    cache = batch * context * cache_bytes_per_token * cfg.num_hidden_layers
    return params["dense_bytes"] + moe_layers * touched * expert + cache


def prefill_flops(cfg, params: dict, tokens: int, logits_rows: int) -> float:
    """Matmul FLOPs of a causal prefill: 2 * active weights per token, plus attention (expanded keys, causal),
    less the output projection of the positions whose logits are not asked for (all but ``logits_rows``)."""
    from deepfuse.runtime.kernels import mla

    attn = mla.flops(1, tokens, tokens, cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                     cfg.v_head_dim, True) * cfg.num_hidden_layers
    unasked = 2 * (tokens - logits_rows) * cfg.vocab_size * cfg.hidden_size
    return 2 * tokens * params["active_per_token"] + attn - unasked


def weight_figures(model, cfg) -> dict:
    """Bytes of the weights every token reads (all but the routed experts and the embedding table), and the
    parameters one token multiplies by (those, plus its k routed experts per MoE layer)."""
    dense = [p for n, p in model.named_parameters() if ".experts." not in n and p is not model.model.embed_tokens.weight]
    moe_layers = cfg.num_hidden_layers - cfg.first_k_dense_replace
    expert_params = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    experts = next(m for m in model.modules() if type(m).__name__ == "Experts")  # FP8 ones with their block scales
    expert_bytes = sum(p.numel() * p.element_size() for p in experts.parameters()) / cfg.n_routed_experts
    return {"dense_bytes": sum(p.numel() * p.element_size() for p in dense), "expert_bytes": expert_bytes,
            "active_per_token": sum(p.numel() for p in dense) + moe_layers * cfg.num_experts_per_tok * expert_params}


def the_prompt(cfg, tokens: int) -> torch.Tensor:
    """The prompt every implementation is timed on (one seed)."""
    return torch.randint(0, cfg.vocab_size, (1, tokens), device="cuda", generator=torch.Generator("cuda").manual_seed(1))


def match_counts(report) -> dict:
    """How many regions each family matched in the compiles ``report`` collected, in the order first seen."""
    counts = {}
    for m in report.matches:
        counts[m.family] = counts.get(m.family, 0) + 1
    return counts


def add_row(rows: list, impl: str, what: str, batch: int, ms: float, floor_ms: float, prefill_tokens: int) -> None:
    rows.append({"impl": impl, "what": what, "batch": batch, "ms": ms, "floor_ms": floor_ms, "x_floor": ms / floor_ms,
                 "tokens_per_s": (batch if what.startswith("decode") else prefill_tokens) / ms * 1e3})
    print(f"{impl:<22}{what:<9}{batch:>6}{ms:>11.3f}{floor_ms:>10.3f}{ms / floor_ms:>8.2f}"
          f"{rows[-1]['tokens_per_s']:>12.0f}", flush=True)


def prefill_kwargs(args) -> dict:
    """What every prefill call takes, the bundled model's and HF's: with --last-logits the last position's logits
    only (HF's ``logits_to_keep``)."""
    return {"logits_to_keep": 1} if args.last_logits else {}


def bench_bundled(args, cfg, bandwidth, peak, rows, notes):
    import deepfuse
    from deepfuse.models import DeepSeekForCausalLM
    from deepfuse.models.model import generate
    from deepfuse.runtime.cuda_graph import CapturedStep

    model = DeepSeekForCausalLM.from_config(cfg, device="cuda", dtype=torch.bfloat16, seed=0)
    figures = weight_figures(model, cfg)
    p, ctx = args.prefill, args.context
    prompt = the_prompt(cfg, p)
    prefill_floor = prefill_flops(cfg, figures, p, 1 if args.last_logits else p) / peak * 1e3
    keep = prefill_kwargs(args)

    def row(impl, what, batch, ms, floor_ms):
        add_row(rows, impl, what, batch, ms, floor_ms, p)

    # the static caches' positions: a decode step writes position ctx, greedy generation the gen_tokens after the
    # prompt; --cache-len sets it (a decode step attends over the whole buffer under a mask, and on H100 one at 2049
    # positions measured 0.13 ms slower than one at 2113: bench/RESULTS.md)
    written = max(p, ctx + 1) + args.gen_tokens
    max_len = args.cache_len or written
    if max_len < written:
        raise SystemExit(f"--cache-len {max_len} holds fewer than the {written} positions the prefill, the decode "
                         "step and the greedy tokens write")
    notes["cache_len"] = max_len
    with torch.no_grad():
        if "bundled" in args.impls:
            cache = model.new_cache(1, max_len, fp8=args.fp8_cache)
            row("bundled eager", "prefill", 1, median_ms(lambda: model(prompt, 0, cache, **keep), 5),
                prefill_floor)
            for b in args.batches:
                cache = model.new_cache(b, max_len, fp8=args.fp8_cache)
                fill_cache(cache, ctx)
                tok = torch.randint(0, cfg.vocab_size, (b, 1), device="cuda")
                row("bundled eager", "decode", b, median_ms(lambda: model(tok, ctx, cache), 10),
                    decode_bytes(cfg, figures, b, ctx, cache.bytes_per_token_per_layer()) / bandwidth * 1e3)
        if "deepfuse" in args.impls:
            df_options = {} if args.deepfuse_passes is None else {"passes": tuple(args.deepfuse_passes.split(","))}
            if args.quantize:  # the bf16 model's weights converted while compiling, but those quantize_skip names
                df_options.update(quantize=args.quantize,
                                  quantize_skip=tuple(p for p in args.quantize_skip.split(",") if p))
            notes["deepfuse_options"] = df_options
            # dynamic=False: one graph per batch size (each its own CUDA graph); the context never changes a shape
            if args.compile == "blocks":  # regional: one graph per kind of block (dense, MoE), reused by every layer;
                for layer in model.model.layers:  # a decode step is captured whole (CapturedStep), not per block
                    layer.compile(backend="deepfuse", dynamic=False, options=df_options)
                compiled, step = model, CapturedStep(model)
            else:
                compiled = step = torch.compile(model, backend="deepfuse", mode="reduce-overhead", dynamic=False,
                                                options=df_options)
            notes["compile"] = args.compile
            pos = torch.tensor(ctx, device="cuda")
            report = deepfuse.Report()

            def collecting(report):
                # Collecting the report turns Inductor's FX graph cache off (a hit would skip the passes), so
                # every compile is cold; --no-collect leaves the caches on (for a warm-compile run) and reports
                # no matches.
                return contextlib.nullcontext() if args.no_collect else deepfuse.collect(report)
            if not args.deepfuse_decode_only:
                cache = model.new_cache(1, max_len, fp8=args.fp8_cache)
                torch._dynamo.utils.compilation_time_metrics.clear()  # (torch's phase timers: this compile's alone)
                with collecting(report):
                    start = time.perf_counter()
                    compiled(prompt, 0, cache, **keep)  # as generate() prefills: the prefix, causal
                    torch.cuda.synchronize()
                    notes["deepfuse_compile_s_prefill"] = time.perf_counter() - start
                # where the cold compile went: deepfuse's passes (matching, kernel generation, compile-time timing)
                # and torch's own phases (Dynamo, AOT, Inductor), each summed over the compiled graphs
                headers, values = torch._dynamo.utils.compile_times(repr="csv", aggregate=True)
                notes["compile_phases_s_prefill"] = {"deepfuse passes": dict(report.pass_seconds),
                                                     **{h: float(v) for h, v in zip(headers, values)}}
                phases = notes["compile_phases_s_prefill"]
                print(f"deepfuse compile, prefill: {notes['deepfuse_compile_s_prefill']:.1f} s; deepfuse passes "
                      f"{sum(report.pass_seconds.values()):.1f} s, " + ", ".join(
                          f"{k} {phases[k]:.1f} s" for k in ("bytecode_tracing", "create_aot_dispatcher_function",
                                                            "GraphLowering.codegen", "async_compile.wait")
                          if k in phases), flush=True)
                row("deepfuse", "prefill", 1,
                    median_ms(lambda: compiled(prompt, 0, cache, **keep), 5), prefill_floor)
                if args.profile:
                    profile(lambda: compiled(prompt, 0, cache, **keep), os.path.join(args.out, "profile_prefill.txt"),
                            3)
            for b in args.deepfuse_batches:
                cache = model.new_cache(b, max_len, fp8=args.fp8_cache)
                fill_cache(cache, ctx)
                tok = torch.randint(0, cfg.vocab_size, (b, 1), device="cuda")
                with collecting(report):
                    start = time.perf_counter()
                    for _ in range(3):  # compile, then CUDA-graph warm-up and recording
                        step(tok, pos, cache)
                    torch.cuda.synchronize()
                    notes[f"deepfuse_compile_s_decode_b{b}"] = time.perf_counter() - start
                print(f"deepfuse compile, decode batch {b}: {notes[f'deepfuse_compile_s_decode_b{b}']:.1f} s; "
                      f"matches so far {match_counts(report)}, declined {[d.reason for d in report.declined]}",
                      flush=True)
                floor_ms = decode_bytes(cfg, figures, b, ctx, cache.bytes_per_token_per_layer()) / bandwidth * 1e3
                row("deepfuse", "decode", b, median_ms(lambda: step(tok, pos, cache), 30, warmup=3), floor_ms)
                state = [tok]

                def next_token():  # as generate() runs its steps: the argmax fed back, nothing synchronized
                    state[0] = step(state[0], pos, cache)[:, -1].argmax(dim=-1, keepdim=True)

                loop = notes[f"deepfuse_decode_b{b}_loop"] = back_to_back(next_token)
                row("deepfuse", "decode loop", b, loop["ms"], floor_ms)
                if args.profile:
                    profile(lambda: step(tok, pos, cache), os.path.join(args.out, f"profile_decode_b{b}.txt"))
            notes["deepfuse_matches"] = match_counts(report)
            notes["deepfuse_declined"] = [f"{d.family}: {d.reason}" for d in report.declined]
            if args.gen_tokens and not args.deepfuse_decode_only:
                with torch.compiler.set_stance("force_eager"):  # --compile blocks compiled the layers in place
                    eager_tokens = generate(model, prompt, args.gen_tokens, fp8_cache=args.fp8_cache)
                    # The yardstick: eager bf16 against itself with the other attention form (naive expands the
                    # latent, absorb folds kv_b_proj into q and out), the same math in another summation order.
                    attns = [layer.self_attn for layer in model.model.layers]
                    impl = attns[0].attn_impl
                    other = "naive" if impl == "absorb" else "absorb"
                    try:
                        for a in attns:
                            a.attn_impl = other
                        naive_tokens = generate(model, prompt, args.gen_tokens, fp8_cache=args.fp8_cache)
                    finally:  # the compiled graphs were traced with the model's own form
                        for a in attns:
                            a.attn_impl = impl
                fused = generate(model, prompt, args.gen_tokens, forward=compiled, static_cache=True,
                                 cuda_graph=args.compile == "blocks", fp8_cache=args.fp8_cache)

                def agreement(a, b):
                    same = (a == b)[0].int()
                    return {"equal_before_first_divergence": int(same.cumprod(0).sum()), "equal_in_all": int(same.sum())}

                notes["greedy"] = {"tokens": args.gen_tokens, "deepfuse_vs_eager": agreement(fused, eager_tokens),
                                   "eager_naive_vs_eager_absorb": agreement(naive_tokens, eager_tokens)}
                print(f"greedy {args.gen_tokens} tokens, equal before the first divergence (in all): deepfuse vs "
                      f"eager bf16 {notes['greedy']['deepfuse_vs_eager']}; eager naive vs eager absorb (the "
                      f"yardstick) {notes['greedy']['eager_naive_vs_eager_absorb']}", flush=True)
                if args.quantize and args.compile == "blocks":
                    # A quantized model's own reference: the same conversion with no pattern pass, so Inductor
                    # runs the plain dequantize-then-matmul forms; greedy against the fused kernels' tokens.
                    torch._dynamo.reset()
                    for layer in model.model.layers:
                        layer.compile(backend="deepfuse", dynamic=False, options={**df_options, "passes": ()})
                    plain = generate(model, prompt, args.gen_tokens, forward=model, static_cache=True,
                                     fp8_cache=args.fp8_cache)
                    notes["greedy"]["deepfuse_vs_quantized_unfused"] = agreement(fused, plain)
                    print(f"greedy: deepfuse vs the same quantized model unfused (no pattern pass) "
                          f"{notes['greedy']['deepfuse_vs_quantized_unfused']}", flush=True)
    notes["weights"] = figures
    return figures, prefill_floor


def back_to_back(step, calls: int = 50, rounds: int = 5) -> dict:
    """The "decode" row times each call alone: events around it, then a synchronization, so every call starts
    the step's CUDA graph (some 450 kernels) on an idle GPU; on one H100 that figure varied from 2.50 to 2.67 ms
    between processes of the same code. Here ``calls`` steps are queued with no synchronization between them, as
    generate() runs them (its tokens stay on the GPU): the time per step (median of ``rounds``; 2.449-2.455 ms in
    those processes), the host's time to issue one, and the CPU the process ran on."""
    import statistics

    step()
    torch.cuda.synchronize()
    gpu, host = [], []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        for _ in range(calls):
            step()
        host.append((time.perf_counter() - t0) * 1e3 / calls)
        end.record()
        end.synchronize()
        gpu.append(start.elapsed_time(end) / calls)
    figures = {"ms": statistics.median(gpu), "host_issue_ms": statistics.median(host), "cpu": _cpu()}
    print(f"  back to back, {calls} steps: {figures['ms']:.3f} ms a step, issued in {figures['host_issue_ms']:.3f} "
          f"ms each on CPU {figures['cpu']}", flush=True)
    return figures


def _cpu() -> int | None:
    """The CPU this process last ran on (/proc/self/stat's field 39), or None off Linux."""
    try:
        with open("/proc/self/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[36])
    except (OSError, IndexError, ValueError):
        return None


def profile(step, path: str, steps: int = 5) -> None:
    """The GPU kernels of ``steps`` calls, by total GPU time (kernels replayed from CUDA graphs included)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    step()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    sort = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    with open(path, "w") as f:
        f.write(f"{steps} calls\n" + events.table(sort_by=sort, row_limit=60, max_name_column_width=90))
    print(f"profile of {steps} calls: {path}", flush=True)


def bench_hf(args, cfg, bandwidth, figures, prefill_floor, rows):
    import transformers

    hc = transformers.DeepseekV2Config(**{k: v for k, v in cfg.to_dict().items() if k != "quantization_config"})
    hc._experts_implementation = "grouped_mm"
    with torch.device("meta"):
        hf = transformers.DeepseekV2ForCausalLM(hc)
    hf = hf.to_empty(device="cuda").to(torch.bfloat16).eval()
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, cfg.initializer_range, generator=gen)
    p, ctx = args.prefill, args.context
    prompt = the_prompt(cfg, p)
    keep = prefill_kwargs(args)
    latent_bf16 = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2  # the floor's cache: what MLA needs, not HF's

    def row(impl, what, batch, ms, floor_ms):
        add_row(rows, impl, what, batch, ms, floor_ms, p)

    with torch.no_grad():
        if "hf" in args.impls:
            row("hf eager", "prefill", 1, median_ms(lambda: hf(prompt, use_cache=False, **keep).logits, 5),
                prefill_floor)
            ctx_ids = torch.randint(0, cfg.vocab_size, (1, ctx), device="cuda")
            past = hf(ctx_ids, use_cache=True).past_key_values
            tok = torch.randint(0, cfg.vocab_size, (1, 1), device="cuda")

            def step():  # the cache grows by one position per call: a context of ctx .. ctx + 12
                hf(tok, past_key_values=past, use_cache=True)

            row("hf eager", "decode", 1, median_ms(step, 10),
                decode_bytes(cfg, figures, 1, ctx, latent_bf16) / bandwidth * 1e3)
        if "hf_inductor" in args.impls:
            compiled = torch.compile(hf)
            start = time.perf_counter()
            compiled(prompt, use_cache=False, **keep)
            torch.cuda.synchronize()
            print(f"hf+inductor compile (prefill): {time.perf_counter() - start:.1f} s", flush=True)
            row("hf+inductor", "prefill", 1, median_ms(lambda: compiled(prompt, use_cache=False, **keep).logits, 5),
                prefill_floor)


def chart(rows, path, args):
    cases = list(dict.fromkeys((r["what"], r["batch"]) for r in rows))
    floor_chart(rows, {c: (f"{c[0]} B={c[1]}" if c[0].startswith("decode") else c[0]) for c in cases},
                lambda r: (r["what"], r["batch"]), "time / physical floor (log; lower is better)",
                f"DeepSeek-V2-Lite end to end, bf16{_quantized(args)} ({torch.cuda.get_device_name()})", path)


def _quantized(args) -> str:
    """How deepfuse's model differs from the bf16 one the others run, for the chart's title."""
    if args.fp8:
        return "; V3's FP8 format"
    if not args.quantize:
        return ""
    skip = [p for p in args.quantize_skip.split(",") if p]
    return f"; deepfuse {args.quantize}" + (f" but {', '.join(skip)}" if skip else "")


def set_inductor_config(settings: list[str]) -> dict:
    """Applies each "KEY=VALUE" (a dotted torch._inductor.config name, a Python literal) and returns them set; an
    unknown key is an error, not a silent no-op."""
    import ast

    import torch._inductor.config as inductor_config

    applied = {}
    for item in settings:
        key, sep, text = item.partition("=")
        if not sep:
            raise SystemExit(f"--inductor-config {item!r}: expected KEY=VALUE")
        *path, name = key.split(".")
        owner = inductor_config
        for part in path:
            owner = getattr(owner, part, None)
        if owner is None or not hasattr(owner, name):
            raise SystemExit(f"--inductor-config: torch._inductor.config has no {key!r}")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise SystemExit(f"--inductor-config {item!r}: the value is not a Python literal") from None
        setattr(owner, name, value)
        applied[key] = value
    return applied


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/out")
    parser.add_argument("--layers", type=int, default=27)
    parser.add_argument("--prefill", type=int, default=2048)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--deepfuse-batches", default=None,
                        help="decode batches for deepfuse (default: --batches; 0: none, a prefill-only run)")
    parser.add_argument("--compile", choices=("whole", "blocks"), default="whole",
                        help="deepfuse: the whole model as one graph, or each decoder block (regional)")
    parser.add_argument("--deepfuse-passes", default=None,
                        help="the families deepfuse runs, comma-separated (default: all but the opt-in ones)")
    parser.add_argument("--deepfuse-decode-only", action="store_true", help="skip deepfuse's prefill and greedy check")
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--cache-len", type=int, default=None,
                        help="positions of the static latent caches (default: max(prefill, context + 1) + gen-tokens)")
    parser.add_argument("--no-collect", action="store_true",
                        help="no match report: Inductor's caches stay on, so a second run measures a warm compile")
    parser.add_argument("--profile", action="store_true",
                        help="write the GPU kernels of deepfuse's decode steps to profile_decode_b{B}.txt (and of "
                             "its prefill, unless --deepfuse-decode-only, to profile_prefill.txt)")
    parser.add_argument("--impls", default="bundled,deepfuse,hf,hf_inductor")
    parser.add_argument("--last-logits", action="store_true",
                        help="prefill: the last position's logits only (logits_to_keep=1), for every implementation")
    parser.add_argument("--fp8-cache", action="store_true",
                        help="the bundled model's latent cache in FP8 (c_kv with a scale per token); bundled and deepfuse")
    parser.add_argument("--fp8", action="store_true",
                        help="the bundled model in DeepSeek-V3's FP8 format (128 x 128 blocks, W8A8): its linears and "
                             "routed experts in FP8; bundled and deepfuse only")
    parser.add_argument("--quantize", default=None, choices=("fp8-block", "int8-weight"),
                        help="deepfuse only: options['quantize'], the bf16 model's weights converted while compiling")
    parser.add_argument("--quantize-skip", default="",
                        help="with --quantize: options['quantize_skip'], comma-separated module-path patterns "
                             "(e.g. 'self_attn' keeps the attention projections bf16)")
    parser.add_argument("--inductor-config", action="append", default=[], metavar="KEY=VALUE",
                        help="set torch._inductor.config.KEY (dotted, e.g. combo_kernels=True) for every compile in "
                             "the run, deepfuse's Inductor stage and hf_inductor alike; repeatable")
    parser.add_argument("--shared-fused-max-tokens", type=int, default=None, metavar="N",
                        help="an experiment: the moe pass fuses a shared MLP into the routed launches up to N tokens "
                             "(deepfuse.runtime.kernels.moe.SHARED_FUSED_MAX_TOKENS, measured against cuBLAS bf16)")
    args = parser.parse_args()
    inductor_settings = set_inductor_config(args.inductor_config)
    if args.shared_fused_max_tokens is not None:
        from deepfuse.runtime.kernels import moe as moe_kernels

        moe_kernels.SHARED_FUSED_MAX_TOKENS = args.shared_fused_max_tokens
    args.batches = [int(b) for b in args.batches.split(",")]
    args.deepfuse_batches = ([int(b) for b in args.deepfuse_batches.split(",") if int(b) > 0]
                             if args.deepfuse_batches else args.batches)
    args.impls = args.impls.split(",")
    if not torch.cuda.is_available():
        raise SystemExit("bench/e2e.py measures the GPU: it needs CUDA")
    from deepfuse.models import get_config

    os.makedirs(args.out, exist_ok=True)
    fp8 = {"quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                   "weight_block_size": [128, 128]}} if args.fp8 else {}
    if args.fp8:
        args.impls = [i for i in args.impls if not i.startswith("hf")]
    cfg = get_config("v2-lite", num_hidden_layers=args.layers, **fp8)
    bandwidth, peak = hbm_bandwidth(), matmul_peak()
    if args.fp8:  # the prefill floor at the FP8 tensor-core rate, taken as twice the measured bf16 one
        peak *= 2
    print(f"{'impl':<22}{'what':<9}{'batch':>6}{'ms':>11}{'floor':>10}{'x floor':>8}{'tokens/s':>12}", flush=True)
    rows, notes = [], ({"fp8": "bundled model in V3's FP8 format (linears and routed experts)"} if args.fp8 else {})
    if args.fp8_cache:
        notes["fp8_cache"] = "the bundled model's latent cache in FP8 (c_kv, one scale per token; k_pe bf16)"
    if args.last_logits:
        notes["last_logits"] = "prefill: the last position's logits only (logits_to_keep=1), every implementation"
    if inductor_settings:
        notes["inductor_config"] = inductor_settings
    if args.shared_fused_max_tokens is not None:
        notes["shared_fused_max_tokens"] = args.shared_fused_max_tokens
    figures, prefill_floor = bench_bundled(args, cfg, bandwidth, peak, rows, notes)
    torch._dynamo.reset()  # drops the compiled model and its CUDA graphs before the HF model is built
    gc.collect()
    torch.cuda.empty_cache()
    if any(i.startswith("hf") for i in args.impls):
        bench_hf(args, cfg, bandwidth, figures, prefill_floor, rows)
    env = dict(environment(), hbm_copy_tbps=bandwidth / 1e12, bf16_matmul_tflops=peak / 1e12, layers=args.layers)
    with open(os.path.join(args.out, "e2e_results.json"), "w") as f:
        json.dump({"environment": env, "notes": notes, "results": rows}, f, indent=1)
    chart(rows, os.path.join(args.out, "e2e.png"), args)
    print(f"{env['device']}  torch {env['torch']}  triton {env['triton']}  commit {env['commit']}  "
          f"HBM {env['hbm_copy_tbps']:.2f} TB/s  bf16 {env['bf16_matmul_tflops']:.0f} TFLOP/s  {json.dumps(notes)}")


if __name__ == "__main__":
    main()
