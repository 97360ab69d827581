"""What Inductor believes each generated kernel writes, against what the kernel writes.

Inductor orders, clones and frees buffers around a user-defined Triton kernel by its own analysis of the kernel's
TTIR (``torch._higher_order_ops.triton_kernel_wrap``). That analysis follows a value returned by a ``@triton.jit``
helper back into every argument of the call, so a store whose address comes from a helper that only read a pointer
makes that pointer "written". 2076a68's align kernels did this (the router's ids counted by a helper, the slots
stored at places computed from the counts): Inductor took the router's ids as written by the align and 2.11 then
failed to schedule every compiled MoE block with an align launch (KeyError in Scheduler.compute_ancestors, H100).
The CPU suite ran the kernels through the interpreter and saw nothing.

Here the kernels are launched through the interpreter to record their arguments, then compiled to TTIR for sm_90
(a stand-in driver answers the target query) and analyzed as Inductor analyzes them: the pointers found written
must be the kernel's outputs, no more, no fewer. Checked: the MoE, routing, linear_group, RMSNorm, MLA and quantized
matmul kernels (the FP8 activation pre-kernel among them).
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from triton.runtime.interpreter import InterpretedFunction

from deepfuse.runtime.kernels import linear_group, mla, moe, quant, rms_norm, routing

# Each generated kernel's outputs: the pointer arguments it stores to.
OUTPUTS = {
    "moe_align_kernel": {"SortedSlots", "BlockExpert", "NumPadded"},
    "moe_align_count_kernel": {"ChunkCounts"},
    "moe_align_place_kernel": {"SortedSlots", "BlockExpert", "NumPadded"},
    "moe_gate_up_act_kernel": {"Out"},
    "moe_down_weighted_kernel": {"Out"},
    "moe_experts_fused_kernel": {"Partials"},
    "moe_routing_kernel": {"Weights", "Ids"},
    "moe_router_partial_kernel": {"Partials"},
    # a launch's GROUPS weights each have their output
    "linear_group_kernel": lambda args: {f"Y{g}" for g in range(args["GROUPS"])},
    "rms_norm_kernel": {"Y"},
    "add_rms_norm_kernel": {"Y", "H"},
    "mla_absorb_query_kernel": {"QLat"},
    "mla_decode_partial_kernel": {"PartOut", "PartLse"},
    "mla_decode_reduce_kernel": {"Out"},
    "mla_absorb_output_kernel": {"Out"},
    "mla_prefill_kernel": {"Out"},
    "act_quant_kernel": {"XQ", "XS"},
    "fp8_block_quantize_matmul_kernel": {"Y"},
    "fp8_block_prequantized_matmul_kernel": {"Y"},
    "fp8_block_prequantized_matmul_tma_kernel": {"Y"},
    "fp8_weight_only_matmul_kernel": {"Y"},
    "int8_weight_only_matmul_kernel": {"Y"},
}


@pytest.fixture
def launches(monkeypatch):
    """Every interpreted launch while the test runs: (kernel function, its arguments by name)."""
    seen = []
    run = InterpretedFunction.run

    def recording(self, *args, grid, warmup, **kwargs):
        seen.append((self.fn, {**dict(zip(self.arg_names, args)), **kwargs}))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)
    monkeypatch.setattr(InterpretedFunction, "run", recording)
    return seen


# Run in a process of its own: the interpreter's launches leave triton.language patched for interpretation, and a
# TTIR build needs it as a GPU build has it. Reads the launches as JSON on stdin, prints what each writes.
_ANALYZE = """
import importlib.util, json, sys
import torch, triton
from triton.backends.compiler import GPUTarget
from torch._higher_order_ops import triton_kernel_wrap as wrap

class Sm90:  # answers Inductor's target query on a machine without a GPU
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

triton.runtime.driver.set_active(Sm90())
modules, out = {}, []
for path, name, args in json.load(sys.stdin):
    if path not in modules:
        spec = importlib.util.spec_from_file_location(f"generated_{len(modules)}", path)
        modules[path] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(modules[path])
    kwargs = {key: torch.empty(1, dtype=getattr(torch, v[1])) if isinstance(v, list) else v for key, v in args.items()}
    kernel = getattr(modules[path], name)
    if hasattr(wrap, "identify_accessed_tensors"):  # torch 2.13: reads and writes
        written = [dep.name for dep in wrap.identify_accessed_tensors(kernel, kwargs, {}).read_writes.writes]
    else:  # torch 2.11: mutations
        written = wrap.identify_mutated_tensors(kernel, kwargs, {})
    out.append(sorted(written))
print(json.dumps(out))
"""


def _written(launches) -> list:
    """For each (kernel function, arguments) launch, the arguments Inductor's analysis finds written."""
    def arg(v):
        return ["tensor", str(v.dtype).replace("torch.", "")] if isinstance(v, torch.Tensor) else v
    todo = [[fn.__code__.co_filename, fn.__name__, {k: arg(v) for k, v in kwargs.items()}] for fn, kwargs in launches]
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", _ANALYZE], input=json.dumps(todo), capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [set(w) for w in json.loads(done.stdout.strip().splitlines()[-1])]


def _run_every_kernel():
    """The families' launches at small shapes: each MoE kernel (one token without align, a few tokens with the
    single-program align, more with the parallel one; shared experts; the one-launch form; FP8 experts), the
    routing kernels (logits, and the router matmul split in front), the projections group with its norm, both
    RMSNorm kernels, MLA's decode and prefill kernels, the quantized matmuls of each format at one row and 37,
    and the descriptor-fed FP8 GEMM in its scaled-sum and RESCALE forms."""
    gen = torch.Generator().manual_seed(0)
    e, h, i = 8, 64, 32
    w1, w2 = torch.randn(e, 2 * i, h, generator=gen) / 8, torch.randn(e, h, i, generator=gen) / 6
    shared = (torch.randn(i, h, generator=gen) / 8, torch.randn(i, h, generator=gen) / 8,
              torch.randn(h, i, generator=gen) / 6)
    for t, k in [(1, 2), (5, 2), (40, 8)]:
        x = torch.randn(t, h, generator=gen)
        ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)])
        weights = torch.rand(t, k, generator=gen)
        moe.moe_experts(x, ids, weights, w1, w2, interpret=True, shared=shared if t == 5 else None)
    moe.moe_experts(x[:1], ids[:1], weights[:1], w1, w2, interpret=True, config=moe.FUSED_CANDIDATES[0])
    (q1, s1), (q2, s2) = moe.quantize_experts(torch.randn(e, 256, 128, generator=gen)), moe.quantize_experts(
        torch.randn(e, 128, 128, generator=gen))
    moe.moe_experts(torch.randn(3, 128, generator=gen), ids[:3, :2], weights[:3, :2], q1, q2, interpret=True,
                    weight_scales=(s1, s2))
    spec = routing.RoutingSpec(2, "sigmoid", bias=True, renormalize=True)
    routing.route(torch.randn(3, e, generator=gen), torch.randn(e, generator=gen), spec, torch.float32,
                  interpret=True)
    routing.route_hidden(x[:3], torch.randn(e, h, generator=gen), torch.randn(e, generator=gen), spec,
                         torch.float32, torch.float32, interpret=True)
    linear_group.linear_group(x[:2], [torch.randn(24, h, generator=gen), torch.randn(8, h, generator=gen)],
                              interpret=True, norm_weight=torch.rand(h, generator=gen), eps=1e-6)
    rms_norm.launch(x[:3], torch.rand(h, generator=gen), None, 1e-6, True, torch.float32, interpret=True)
    rms_norm.launch(x[:3], torch.rand(h, generator=gen), x[3:6], 1e-6, True, torch.float32, interpret=True)
    for s, t, path in [(1, 37, "absorbed"), (5, 5, "expanded")]:  # decode's four launches, prefill's one
        heads, dn, r, c = 2, 16, 8, 32
        mla.mla_attention(torch.randn(1, s, heads, dn, generator=gen), torch.randn(1, s, heads, r, generator=gen),
                          torch.randn(1, t, c, generator=gen), torch.randn(1, t, r, generator=gen),
                          torch.randn(heads * (dn + 16), c, generator=gen) / 6, 0.2, True, path=path, interpret=True)
    for fmt, act_quant, prequantize in [("fp8-block", True, False), ("fp8-block", True, True),
                                        ("fp8-block", False, None), ("int8-channel", False, None)]:
        w, scale = quant.quantize_weight(torch.randn(200, 256, generator=gen), fmt)
        for m in (1, 37):  # the decode and the tiled forms
            quant.quant_matmul(torch.randn(m, 256, generator=gen), w, scale, torch.randn(200, generator=gen), fmt,
                               act_quant, prequantize=prequantize, interpret=True)
    w, scale = quant.quantize_weight(torch.randn(200, 256, generator=gen), "fp8-block")
    for cfg in quant.TMA_LARGE_CONFIGS[0], next(c for c in quant.RESCALE_CONFIGS if c.get("M_HALVES")):
        quant.quant_matmul(torch.randn(37, 256, generator=gen), w, scale, torch.randn(200, generator=gen), "fp8-block",
                           True, prequantize=True, interpret=True, config=cfg)


def test_inductor_finds_each_kernel_writing_its_outputs_alone(launches):
    _run_every_kernel()
    unlisted = {fn.__name__ for fn, _ in launches} - set(OUTPUTS)
    assert not unlisted, f"launched, with no outputs listed here: {sorted(unlisted)}"
    ours = [(fn, kwargs) for fn, kwargs in launches if fn.__name__ in OUTPUTS]
    for (fn, kwargs), written in zip(ours, _written(ours)):
        outputs = OUTPUTS[fn.__name__]
        outputs = outputs(kwargs) if callable(outputs) else outputs
        assert written == outputs, (f"{fn.__name__}: Inductor's analysis finds {sorted(written)} written, the kernel "
                                    f"writes {sorted(outputs)}")
    missing = set(OUTPUTS) - {fn.__name__ for fn, _ in ours}
    assert not missing, f"not launched: {sorted(missing)}"
