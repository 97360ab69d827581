"""MoE routing: the generated kernel against a float64 reference, and the pass that checks a graph's router
before handing it to the kernel."""
import pytest
import torch

from deepfuse.runtime.kernels import routing
from deepfuse.runtime.kernels.routing import RoutingSpec
from conftest import compile_and_compare, gathered_experts

SPECS = [
    RoutingSpec(2),  # Mixtral without renormalization
    RoutingSpec(2, renormalize=True),  # Mixtral, Qwen
    RoutingSpec(6, scale=16.0),  # DeepSeek-V2 greedy
    RoutingSpec(3, groups=4, topk_group=2, group_score="max", fill=0.0, scale=16.0),  # V2 group-limited (HF)
    RoutingSpec(4, "sigmoid", bias=True, groups=4, topk_group=2, group_score="top2_sum", renormalize=True,
                scale=2.5),  # V3 noaux_tc
    RoutingSpec(1, "sigmoid", bias=True, groups=8, topk_group=1, group_score="top2_sum", fill=0.0),
    RoutingSpec(3, "none"),  # a bare top-k
]


def _grid_logits(t, e, gen, span=2048):
    """Logits no two alike per row, held exactly by fp16 (span 2048) or bf16 (span 256): ties are tested on
    purpose, not met by rounding."""
    grid = torch.stack([torch.randperm(span, generator=gen)[:e] for _ in range(t)]) if t else torch.zeros(0, e)
    return (grid.double() - span / 2) * (8 / span)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_interpreted_routing_equals_float64(spec, dtype):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    for t, e in [(5, 64), (1, 24), (0, 16), (3, 40)]:  # 40 and 24: groups of 5 and 3, padded in the kernel
        if e % spec.groups:
            continue
        logits = _grid_logits(t, 2 * e, gen)[:, ::2].to(dtype)  # non-contiguous rows
        bias = torch.randn(e, generator=gen) * 0.5 if spec.bias else None
        weights, ids = routing.route(logits, bias, spec, dtype, interpret=True)
        want = routing.reference(logits.double(), None if bias is None else bias.double(), spec)
        assert weights.shape == ids.shape == (t, spec.top_k) and weights.dtype == dtype and ids.dtype == torch.int64
        assert routing.same_routing((weights, ids), want, 1e-5 if dtype == torch.float32 else 2e-3), spec
        assert all(len(set(row)) == spec.top_k for row in ids.tolist())  # each expert once per token


def test_interpreted_routing_ties_and_nan():
    spec = RoutingSpec(3, "none")
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.5, 3.0, 0.0, 0.0, 0.0],
                           [0.0, float("nan"), 5.0, 1.0, float("inf"), 0.0, 0.0, 0.0]])
    _, ids = routing.route(logits, None, spec, torch.float32, interpret=True)
    assert ids.tolist() == [[1, 2, 4], [1, 4, 2]]  # ties to the lower index; NaN the largest
    # a tie between groups goes to the lower group, within the kept groups to the lower expert
    spec = RoutingSpec(2, "none", groups=4, topk_group=1)
    _, ids = routing.route(torch.tensor([[1.0, 2.0, 2.0, 1.0, 2.0, 2.0, 0.0, 0.0]]), None, spec, torch.float32,
                           interpret=True)
    assert ids.tolist() == [[1, 0]]


@pytest.mark.parametrize("spec,experts,message", [
    (RoutingSpec(9), 8, "top_k=9"),
    (RoutingSpec(2, groups=3), 8, "3 groups do not divide 8"),
    (RoutingSpec(2, groups=4, topk_group=5), 8, "topk_group=5"),
    (RoutingSpec(2, groups=8, group_score="top2_sum"), 8, "at least 2 experts per group"),
    (RoutingSpec(2, scoring="relu"), 8, "scoring 'relu'"),
    (RoutingSpec(2), 2048, "up to 1024"),
])
def test_invalid_routing_is_a_clear_error(spec, experts, message):
    with pytest.raises(ValueError, match=message):
        routing.route(torch.randn(2, experts), None, spec, torch.float32, interpret=True)


class _Router(torch.nn.Module):
    """A router and the experts as a gathered-weights product: what the pass sees in any model."""

    def __init__(self, squash=False, per_token=False, scale_buffer=False, e=8, h=16, i=8, k=2):
        super().__init__()
        self.squash, self.per_token, self.k = squash, per_token, k
        self.scale = torch.nn.Buffer(torch.tensor(2.0)) if scale_buffer else None
        self.gate = torch.nn.Linear(h, e, bias=False)
        self.w1 = torch.nn.Parameter(torch.randn(e, 2 * i, h) / h ** 0.5)
        self.w2 = torch.nn.Parameter(torch.randn(e, h, i) / i ** 0.5)

    def forward(self, x):
        scores = self.gate(x).softmax(-1)
        weights, ids = scores.topk(self.k, dim=-1)
        if self.squash:  # outside the routing space: the weights squared
            weights = weights * weights
        if self.per_token:  # reads the hidden states: not a function of the logits alone
            weights = weights * x[:, :1].sigmoid()
        if self.scale is not None:  # a scale held in a buffer: a graph input, not a constant
            weights = weights * self.scale
        return gathered_experts(x, ids, weights, self.w1, self.w2, torch.nn.functional.silu)


@pytest.mark.parametrize("variant,reason", [
    ({}, None),
    ({"squash": True}, "not one the routing kernel computes"),
    ({"per_token": True}, "reads a tensor besides its logits"),
])
def test_pass_fuses_a_router_only_once_checked(variant, reason):
    report = compile_and_compare(_Router(**variant), (torch.randn(6, 16),), 1e-5, interpret=True)
    (m,) = [m for m in report.matches if m.family == "moe"]
    if reason is None:
        assert m.params["routing"] == "kernel: softmax, top-2", m.params
    else:  # the top-k alone runs as a kernel; the rest stays with Inductor, and the output is still right
        assert m.params["routing"].startswith("top-k kernel (") and reason in m.params["routing"], m.params


def test_a_router_scale_held_in_a_buffer_is_not_baked_in():
    """A scale the model keeps in a tensor is an input of the graph: it can change between calls, so the router is
    not fused (the check cannot take its value as a constant) and the new value is used."""
    model, x = _Router(scale_buffer=True), torch.randn(4, 16)
    report = compile_and_compare(model, (x,), 1e-5, interpret=True)
    (m,) = [m for m in report.matches if m.family == "moe"]
    assert m.params["routing"].startswith("top-k kernel (the router reads a value the check cannot make"), m.params
    compiled = torch.compile(model, backend="deepfuse", options={"interpret": True})
    with torch.no_grad():
        model.scale.fill_(3.0)
        assert torch.allclose(compiled(x), model(x), rtol=1e-5, atol=1e-6)


def test_routing_falls_back_to_aten_in_reference_mode():
    report = compile_and_compare(_Router(), (torch.randn(3, 16),), 1e-5)
    (m,) = [m for m in report.matches if m.family == "moe"]
    assert m.params["routing"] == "aten (reference kernels)" and m.impl == "reference"


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 64, 4096])
@pytest.mark.parametrize("spec,experts", [
    (RoutingSpec(6, scale=1.0), 64),  # V2-Lite
    (RoutingSpec(8, "sigmoid", bias=True, groups=8, topk_group=4, group_score="top2_sum", renormalize=True,
                 scale=2.5), 256),  # V3
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_routing_equals_float64(t, spec, experts, dtype):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    logits = _grid_logits(t, experts, gen, 256 if dtype == torch.bfloat16 else 2048).to("cuda", dtype)
    bias = (torch.randn(experts, generator=gen) * 0.5).cuda() if spec.bias else None
    weights, ids = routing.route(logits, bias, spec, torch.float32)
    want = routing.reference(logits.double(), None if bias is None else bias.double(), spec)
    assert routing.same_routing((weights, ids), want, 1e-5)
