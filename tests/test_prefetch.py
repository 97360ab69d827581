"""The L2 prefetch hint (runtime/kernels/prefetch.py): which weights a launch asks for, that it reaches the kernel
compiled for Hopper, and that torch's analysis of which arguments a kernel writes does not take a prefetched weight
for one (Inductor would then copy the weight before every launch). Values with the hint on are compared on the GPU
(tests/test_gpu_mla.py)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from deepfuse.fusion import upcoming_weights
from deepfuse.runtime.kernels import prefetch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MB = 1 << 20


def _graph(sizes_mb):
    """A graph reading weights of the given sizes (fp32 rows of 1024) one after the other: x + sum(x @ w_i.T) for
    each; its weights are the placeholders after x."""
    ws = [torch.randn(int(mb * MB) // (4 * 1024), 1024) for mb in sizes_mb]

    def f(x, *ws):
        for w in ws:
            x = x + (x @ w.T).sum(-1, keepdim=True)
        return x

    gm = make_fx(f, tracing_mode="fake")(torch.randn(1, 1024), *ws)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    mms = [n for n in gm.graph.nodes if n.target == torch.ops.aten.mm.default]
    return gm.graph, placeholders[1:], mms


def test_upcoming_weights_in_order_of_first_read_after_the_node():
    graph, ws, mms = _graph([1, 2, 3, 4])
    assert upcoming_weights(graph, mms[0], 64 * MB, 4) == ws[1:]  # w0 is read at (not after) the node
    assert upcoming_weights(graph, mms[1], 64 * MB, 4) == ws[2:]
    assert upcoming_weights(graph, mms[-1], 64 * MB, 4) == []


def test_upcoming_weights_budget_and_limit():
    graph, ws, mms = _graph([1, 2, 3, 4, 0.5])
    before = next(iter(graph.nodes))  # x: every weight is read after it
    assert upcoming_weights(graph, before, 6 * MB, 4) == ws[:3]  # 1 + 2 + 3 fit, the fourth would not: stop
    assert upcoming_weights(graph, before, 64 * MB, 2) == ws[:2]
    assert upcoming_weights(graph, before, 2.5 * MB, 4) == ws[:1]  # 1 fits, 1 + 2 does not: stop there
    # a weight larger than the whole budget is passed over, not an end
    assert upcoming_weights(graph, before, 1.5 * MB, 4) == [ws[0], ws[4]]


def test_small_weights_are_not_worth_a_prefetch():
    graph, ws, mms = _graph([0.0625, 1])  # 64 KB, below PREFETCH_MIN_BYTES
    assert upcoming_weights(graph, next(iter(graph.nodes)), 64 * MB, 4) == [ws[1]]


def test_launch_args_take_nothing_in_the_interpreter_or_off_hopper():
    w = torch.randn(256, 256)
    like = torch.empty(4)
    for interpret in (True, False):  # on the CPU: not supported either way
        args = prefetch.launch_args([w], like, interpret)
        assert args["PREFETCH"] == 0
        assert all(args[f"prefetch_bytes{i}"] == 0 for i in range(prefetch.MAX_TENSORS))
        assert all(args[f"Prefetch{i}"] is like for i in range(prefetch.MAX_TENSORS))


def test_prefetchable_reads_the_layout():
    w = torch.randn(64, 64)
    assert prefetch.prefetchable(w)
    assert not prefetch.prefetchable(w.T)  # not contiguous
    assert not prefetch.prefetchable(w.view(-1)[1:17])  # starts 4 bytes into the allocation
    assert prefetch.prefetchable(w.view(-1)[4:8])  # 16 bytes in, 16 bytes long
    assert not prefetch.prefetchable(w.view(-1)[4:7])  # 12 bytes


SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
import torch, triton
from triton.backends.compiler import GPUTarget
import kernel_resources as kr

rows = []
for config, fn, pointers, scalars, constexprs in kr.mla_decode(False):
    if config["BLOCK_T"] == 32 and config["num_warps"] == 4 and config["num_stages"] == 3 and config["HAS_MASK"]:
        got = kr.resources(fn, pointers, scalars, constexprs, 4, 3)
        rows.append(["mla", config["PREFETCH"], got["l2_prefetches"], got["loop_loads"], got["spill_stores"]])
for config, fn, pointers, scalars, constexprs, _ in kr.rms_norm(True):
    if config["num_warps"] == 4:
        got = kr.resources(fn, pointers, scalars, constexprs, 4, 1)
        rows.append(["rms", config["PREFETCH"], got["l2_prefetches"], got["loop_loads"], got["spill_stores"]])

# torch's analysis of the arguments a kernel writes, as Inductor runs it, against the sm_90 target
class Hopper:
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)
    def get_active_torch_device(self):
        return torch.device("cpu")
triton.runtime.driver.set_active(Hopper())
from torch._higher_order_ops.triton_kernel_wrap import identify_accessed_tensors
import inspect
from deepfuse.runtime.kernels import routing


def written_by(fn, constexprs, pointers):
    # the arguments torch's analysis finds written, the kernel's other arguments filled in: a tensor for each of
    # the pointers, 16 for a size or stride
    kwargs = {}
    for name in inspect.signature(fn.fn).parameters:
        kwargs[name] = (constexprs[name] if name in constexprs
                        else torch.empty(16, dtype=torch.float32) if name in pointers else 16)
    return sorted(dep.name for dep in identify_accessed_tensors(fn, kwargs, {}).read_writes.writes)


written = {}
config, fn, pointers, scalars, constexprs = next(c for c in kr.mla_decode(False) if c[0]["PREFETCH"] == 2)
written["mla"] = written_by(fn, {**constexprs, "STAGES": 3}, pointers)
config, fn, pointers, scalars, constexprs, _ = next(c for c in kr.rms_norm(True) if c[0]["PREFETCH"] == 2)
written["rms"] = written_by(fn, constexprs, pointers)
gen = routing.kernel_for(routing.RoutingSpec(6, renormalize=True), router_matmul=torch.bfloat16)
prefetched = [f"Prefetch{i}" for i in range(4)]
written["router_partial"] = written_by(gen.module.moe_router_partial_kernel,
                                       {"BLOCK_E": 64, "BLOCK_K": 128, "PREFETCH": 2},
                                       ["X", "RouterWeight", "Partials"] + prefetched)
written["routing"] = written_by(gen.module.moe_routing_kernel, {
    "NUM_SPLITS": 16, "SPLIT_CHUNK": 16, "GROUPS": 1, "PER_GROUP": 64, "TOPK_GROUP": 1, "K": 6, "GROUPS_POW2": 1,
    "PER_GROUP_POW2": 64, "K_POW2": 8, "SCALE": 1.0, "PREFETCH": 2}, ["Partials", "Bias", "Weights", "Ids"] + prefetched)
print(json.dumps({"rows": rows, "written": written}))
"""


@pytest.fixture(scope="module")
def compiled():
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-c", SCRIPT, os.path.join(ROOT, "bench")], capture_output=True,
                         text=True, env=env, timeout=600)
    if out.returncode:
        raise AssertionError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kernel", ["mla", "rms"])
def test_the_launch_issues_the_prefetch_only_when_asked(compiled, kernel):
    """The MLA decode's split launch and the norm: no prefetch instruction at PREFETCH 0, one in each l2_prefetch
    loop at 2, kept by the compiler; no load waited in a loop and no spills either way."""
    by_count = {pf: (n, loads, spills) for name, pf, n, loads, spills in compiled["rows"] if name == kernel}
    assert by_count[0][0] == 0
    assert by_count[2][0] >= 2
    assert by_count[2][1:] == by_count[0][1:] == (0, 0)


def test_torch_does_not_take_a_prefetched_weight_for_a_written_one(compiled):
    assert compiled["written"] == {"mla": ["PartLse", "PartOut"], "rms": ["H", "Y"], "router_partial": ["Partials"],
                                   "routing": ["Ids", "Weights"]}


def test_the_switch_keys_inductors_graph_cache(monkeypatch):
    """A graph compiled with DEEPFUSE_L2_PREFETCH=1 carries the prefetch in its launches: Inductor's FX-graph cache
    must not hand it to a compile without (or the other way round)."""
    from deepfuse.options import Options
    from deepfuse.pipeline import DeepfuseGraphPass
    from deepfuse.report import Report

    keys = []
    for flag in ("0", "1", "0"):
        monkeypatch.setenv("DEEPFUSE_L2_PREFETCH", flag)
        keys.append(DeepfuseGraphPass(Options.from_user({}), Report()).uuid())
    assert keys[0] != keys[1] and keys[0] == keys[2]
