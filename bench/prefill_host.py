"""Where a compiled prefill's time goes: the GPU's work, the host's, and what the first call spends compiling.

    python bench/prefill_host.py --out DIR [--layers 27] [--prefill 2048] [--compile blocks|whole] [--tag NAME]
        [--profile-compile] [--last-logits] [--quantize fp8-block [--quantize-skip self_attn]]

The bundled DeepSeek-V2-Lite (random weights, bf16) compiled by deepfuse as bench/e2e.py compiles it, one prompt
of --prefill tokens, batch 1 (with --last-logits the last position's logits only, as generate() prefills; else
every position's). After the first call (its wall time is the compile; with --profile-compile profiled
with cProfile, which slows the compile's Python and so lengthens that time), the same call is timed four ways,
each a median:
- launched: CUDA events around the call from Python (what bench/e2e.py reports);
- host: the wall time of issuing the call (no synchronization inside it, one after it): what the Python side
  costs; where it is near or above the GPU time, the prefill is host-bound and the launched time follows the CPU;
- gpu: the same call captured once as a CUDA graph and replayed (deepfuse.runtime.cuda_graph.CapturedStep): the
  GPU's work with no host in it. A capture that fails says the call synchronizes with the host;
- syncs: the synchronizing CUDA calls one call makes (torch.cuda.set_sync_debug_mode), with the line each
  warning names.
Writes prefill_host_<tag>.json, compile_profile_<tag>.txt (with --profile-compile: the first call's, by
cumulative time), second_call_profile_<tag>.txt (the second call's) and host_profile_<tag>.txt (cProfile of one
steady call, by own time) to --out. Run it twice with the same caches to see a warm compile (the second process
finds deepfuse's, Triton's and Inductor's caches on disk). Before --profile-compile existed the first call was
always profiled: the compile times recorded at c4d7358 (38.7 s cold, 5.9 s warm on H100) were taken under cProfile.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time
import traceback
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
from e2e import prefill_kwargs, the_prompt  # noqa: E402
from run import environment, median_call_ms  # noqa: E402


def host_ms(call, iters: int = 10) -> float:
    """Median wall time of issuing ``call`` (the GPU is drained before each, so a full launch queue never
    blocks the issue)."""
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def graph_ms(call, iters: int = 10):
    """Median ms of the call replayed as one captured CUDA graph, or the reason it cannot be captured."""
    from deepfuse.runtime.cuda_graph import CapturedStep

    step = CapturedStep(call)
    try:
        step()
    except Exception as e:  # a synchronization inside the call (or another capture error)
        return None, f"{type(e).__name__}: {e}".splitlines()[0][:300]
    return median_call_ms(step, iters, warmup=1), None  # a replay per call: no Python inside the graph


def syncs(call) -> list[str]:
    """The synchronizing CUDA operations of one call, each as the file and line its warning names."""
    found = []
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    for w in caught:
        if "called a synchronizing" in str(w.message):  # not the mode's own "prototype feature" notice
            found.append(f"{w.filename}:{w.lineno}: {str(w.message).splitlines()[0]}")
    return found


def profiled(call, path: str, sort: str, lines: int = 60) -> float:
    """Runs ``call`` under cProfile, writes the top ``lines`` by ``sort`` to ``path``; returns the wall seconds."""
    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.enable()
    call()
    torch.cuda.synchronize()
    prof.disable()
    seconds = time.perf_counter() - start
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats(sort).print_stats(lines)
    with open(path, "w") as f:
        f.write(f"{seconds:.2f} s wall\n" + text.getvalue())
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/out")
    parser.add_argument("--layers", type=int, default=27)
    parser.add_argument("--prefill", type=int, default=2048)
    parser.add_argument("--compile", choices=("whole", "blocks"), default="blocks")
    parser.add_argument("--tag", default="run", help="suffix of the files written (cold, warm, ...)")
    parser.add_argument("--last-logits", action="store_true",
                        help="the last position's logits only (logits_to_keep=1), as generate() prefills")
    parser.add_argument("--profile-compile", action="store_true",
                        help="profile the first call (cProfile slows the compile's Python: its wall time grows)")
    parser.add_argument("--quantize", default=None, choices=("fp8-block", "int8-weight"),
                        help="options['quantize'] as in bench/e2e.py: the bf16 weights converted while compiling")
    parser.add_argument("--quantize-skip", default="",
                        help="with --quantize: options['quantize_skip'], comma-separated module-path patterns")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/prefill_host.py measures the GPU: it needs CUDA")
    from deepfuse.models import DeepSeekForCausalLM, get_config

    os.makedirs(args.out, exist_ok=True)
    cfg = get_config("v2-lite", num_hidden_layers=args.layers)
    model = DeepSeekForCausalLM.from_config(cfg, device="cuda", dtype=torch.bfloat16, seed=0)
    options = {}
    if args.quantize:
        options = {"quantize": args.quantize, "quantize_skip": tuple(p for p in args.quantize_skip.split(",") if p)}
    if args.compile == "blocks":
        for layer in model.model.layers:
            layer.compile(backend="deepfuse", dynamic=False, options=options)
        forward = model
    else:
        forward = torch.compile(model, backend="deepfuse", dynamic=False, options=options)
    prompt = the_prompt(cfg, args.prefill)  # e2e.py's prompt
    cache = model.new_cache(1, args.prefill)
    result = {"environment": environment(), "layers": args.layers, "prefill": args.prefill, "compile": args.compile,
              "last_logits": args.last_logits, "deepfuse_options": options}
    keep = prefill_kwargs(args)  # e2e.py's, for its --last-logits
    with torch.no_grad():
        call = lambda: forward(prompt, 0, cache, **keep)  # noqa: E731
        if args.profile_compile:
            result["first_call_s"] = profiled(call, os.path.join(args.out, f"compile_profile_{args.tag}.txt"),
                                              "cumulative")
        else:
            start = time.perf_counter()
            call()
            torch.cuda.synchronize()
            result["first_call_s"] = time.perf_counter() - start
        result["first_call_profiled"] = args.profile_compile
        print(f"first call (compile): {result['first_call_s']:.1f} s"
              + (" under cProfile" if args.profile_compile else ""), flush=True)
        result["second_call_s"] = profiled(call, os.path.join(args.out, f"second_call_profile_{args.tag}.txt"),
                                           "cumulative", 30)
        result["launched_ms"] = median_call_ms(call, 10, warmup=2)
        result["host_ms"] = host_ms(call)
        result["syncs"] = syncs(call)
        profiled(call, os.path.join(args.out, f"host_profile_{args.tag}.txt"), "tottime", 50)
        try:
            result["gpu_ms"], result["capture_error"] = graph_ms(call)
        except Exception:  # keep what was measured
            result["gpu_ms"], result["capture_error"] = None, traceback.format_exc().splitlines()[-1]
        result["launched_ms_after"] = median_call_ms(call, 10, warmup=1)
    with open(os.path.join(args.out, f"prefill_host_{args.tag}.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "environment"}, indent=1))


if __name__ == "__main__":
    main()
