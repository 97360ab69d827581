"""The pattern engine on hand-built and real graphs: variants, exact operands, escapes, speed."""
import time

import torch

from deepfuse.pattern import HostGraph, Input, Op, Pattern, find

aten = torch.ops.aten


def _graph(fn, *args):
    from torch.fx.experimental.proxy_tensor import make_fx

    return make_fx(fn, tracing_mode="fake")(*args).graph


SILU_MUL = Pattern(
    "silu_mul",
    {
        "g": Input(),
        "u": Input(),
        "to32": Op((torch.ops.prims.convert_element_type.default, aten._to_copy.default), ("g",), optional=True),
        "act": Op((aten.silu.default,), ("to32",)),
        "prod": Op((aten.mul.Tensor,), ("act", "u")),
    },
    outputs=("prod",),
)


def test_matches_with_and_without_optional_node():
    g1 = _graph(lambda a, b: torch.nn.functional.silu(a) * b, torch.randn(4), torch.randn(4))
    g2 = _graph(lambda a, b: torch.nn.functional.silu(a.float()) * b, torch.randn(4).half(), torch.randn(4))
    (b1,), (b2,) = find([SILU_MUL], g1), find([SILU_MUL], g2)
    assert not b1.has("to32") and b2.has("to32")
    assert b2["act"].target == aten.silu.default


def test_commutative_operand_order_and_no_overlap():
    g = _graph(lambda a, b, c: (b * torch.nn.functional.silu(a)) + (torch.nn.functional.silu(c) * a),
               torch.randn(4), torch.randn(4), torch.randn(4))
    bindings = find([SILU_MUL], g)
    assert len(bindings) == 2
    assert not set(bindings[0].interior) & set(bindings[1].interior)


def test_extra_operand_is_not_a_match():
    """An op node may read only the pattern inputs declared for it: add(neg(x), 1) matches, add(neg(x), y)
    has a hidden operand and does not."""
    plus_const = Pattern(
        "neg_plus_const",
        {"x": Input(), "n": Op((aten.neg.default,), ("x",)), "s": Op((aten.add.Tensor,), ("n",))},
        outputs=("s",),
    )
    assert len(find([plus_const], _graph(lambda x: -x + 1.0, torch.randn(4)))) == 1
    assert find([plus_const], _graph(lambda x, y: -x + y, torch.randn(4), torch.randn(4))) == []


def test_escaping_interior_is_reported():
    from deepfuse.fusion import escape_reason

    def fn(a, b):
        act = torch.nn.functional.silu(a)
        return act * b, act.sum()  # the silu is used outside the silu*mul region

    (b,) = find([SILU_MUL], _graph(fn, torch.randn(4), torch.randn(4)))
    assert "used outside the region" in escape_reason(b.interior, b.outputs)
    (b,) = find([SILU_MUL], _graph(lambda a, c: torch.nn.functional.silu(a) * c, torch.randn(4), torch.randn(4)))
    assert escape_reason(b.interior, b.outputs) is None


def test_engine_scales_linearly_to_a_27_layer_graph():
    """The RMSNorm patterns over the aten graph of a 27-layer decoder (4 norms a layer) cost about 9 times the
    3-layer graph's (linear in the graph), not 81 (quadratic). A ratio of CPU times in one process, so the
    machine's speed and load cancel; the absolute bound only catches a pathological slowdown."""
    from deepfuse.passes.rms_norm import RMSNormPass

    class Layer(torch.nn.Module):
        def __init__(self, n=32):
            super().__init__()
            self.w = torch.nn.ParameterList([torch.nn.Parameter(torch.ones(n)) for _ in range(4)])
            self.lin = torch.nn.ModuleList([torch.nn.Linear(n, n) for _ in range(4)])
            self.up = torch.nn.ModuleList([torch.nn.Linear(n, 2 * n) for _ in range(4)])

        def norm(self, x, w):
            d = x.dtype
            x = x.float()
            return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)).to(d)

        def forward(self, x):
            for w, lin, up in zip(self.w, self.lin, self.up):  # a gated MLP after each norm
                gate, val = up(self.norm(x, w)).chunk(2, dim=-1)
                x = x + lin(torch.nn.functional.silu(gate) * val)
            return x

    from torch.fx.experimental.proxy_tensor import make_fx

    def matching(layers: int) -> float:
        model = torch.nn.Sequential(*[Layer() for _ in range(layers)]).half()
        with torch.no_grad():
            graph = make_fx(model, tracing_mode="real")(torch.randn(3, 32).half()).graph
        assert len(graph.nodes) > 90 * layers
        times = []
        for _ in range(2):  # the faster of two: CPU time of this process, the engine's work alone
            start = time.process_time()
            host = HostGraph(graph)
            bindings = [b for p in RMSNormPass.patterns for b in p.match(host, set())]
            times.append(time.process_time() - start)
        assert len([b for b in bindings if b.pattern.family == "add_rms_norm"]) >= layers * 4 - 1
        return min(times)

    small, large = matching(3), matching(27)
    assert large < 20 * small, f"27 layers took {large:.2f}s, 3 layers {small:.3f}s: worse than linear"
    assert large < 5.0, f"matching took {large:.2f}s"


def test_pattern_validation():
    import pytest

    with pytest.raises(ValueError, match="unknown node"):
        Pattern("bad", {"a": Op((aten.relu.default,), ("zz",))}, outputs=("a",))
    with pytest.raises(ValueError, match="optional node"):
        Pattern("bad", {"x": Input(), "y": Input(), "a": Op((aten.add.Tensor,), ("x", "y"), optional=True)}, outputs=("a",))


def test_a_rewrite_of_another_dtype_is_refused_and_the_region_kept():
    """A replacement whose output dtype differs from the value it replaces (a pass's bug) raises RewriteError and
    leaves the graph as it was; the pipeline logs it as a decline and goes on with the next pass."""
    import pytest
    import torch.fx as fx
    from torch._subclasses.fake_tensor import FakeTensorMode

    import deepfuse
    from deepfuse import passes, pipeline
    from deepfuse.errors import RewriteError
    from deepfuse.fusion import RegionBinding, replace_region
    from deepfuse.options import Options

    def traced():
        graph = fx.Graph()
        x = graph.placeholder("x")
        y = graph.call_function(torch.ops.aten.mul.Tensor, (x, 2.0))
        z = graph.call_function(torch.ops.aten.add.Tensor, (y, 1.0))
        graph.output(z)
        with FakeTensorMode() as mode:
            x.meta["val"] = mode.from_tensor(torch.randn(3, 4, dtype=torch.bfloat16))
            y.meta["val"] = x.meta["val"] * 2.0
            z.meta["val"] = y.meta["val"] + 1.0
        return graph, y, z

    graph, y, z = traced()
    before = [(n.op, n.target) for n in graph.nodes]
    with pytest.raises(RewriteError, match="returns torch.float32"):  # the op's fake output is fp32
        replace_region(graph, RegionBinding([y, z], z), torch.ops.prims.convert_element_type.default,
                       (y.args[0], torch.float32), 1)
    graph.lint()
    assert [(n.op, n.target) for n in graph.nodes] == before

    class Buggy:  # a pass whose rewrite returns the wrong dtype
        def run(self, graph, options, report):
            y = next(n for n in graph.nodes if n.target == torch.ops.aten.mul.Tensor)
            z = next(iter(y.users))
            return replace_region(graph, RegionBinding([y, z], z), torch.ops.prims.convert_element_type.default,
                                  (y.args[0], torch.float32), 1)

    graph, _, _ = traced()
    report = deepfuse.Report()
    original = dict(passes.PASSES)
    try:
        passes.PASSES.clear()
        passes.PASSES["buggy"] = Buggy
        pipeline.run_passes(graph, Options(passes=("buggy",)), report)
    finally:
        passes.PASSES.clear()
        passes.PASSES.update(original)
    assert [(n.op, n.target) for n in graph.nodes] == before
    assert [d.family for d in report.declined] == ["buggy"] and "returns torch.float32" in report.declined[0].reason
