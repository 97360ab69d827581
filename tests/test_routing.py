"""MoE routing: the generated kernel against a float64 reference, and the pass that checks a graph's router
before handing it to the kernel."""
import dataclasses

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
    RoutingSpec(2, "sqrtsoftplus", bias=True, renormalize=True, scale=1.5),  # DeepSeek-V4
    RoutingSpec(2, renormalize=True, expert_scale=True),  # Gemma 4: times each chosen expert's own scale
    RoutingSpec(3, "sigmoid", bias=True, groups=4, topk_group=2, renormalize=True, scale=2.0, expert_scale=True),
]


MODEL_SPECS = [  # (spec, experts) of the real routers
    (RoutingSpec(6, scale=1.0), 64),  # V2-Lite
    (RoutingSpec(8, "sigmoid", bias=True, groups=8, topk_group=4, group_score="top2_sum", renormalize=True,
                 scale=2.5), 256),  # V3
    (RoutingSpec(6, "sqrtsoftplus", bias=True, renormalize=True, scale=1.5), 256),  # V4
    (RoutingSpec(8, renormalize=True, expert_scale=True), 128),  # Gemma 4 26B-A4B
]


def _expert_scale(spec, e, gen, device="cpu"):
    """A per-expert scale away from 1 (so an ignored one shows) when the spec takes one."""
    return (torch.rand(e, generator=gen) + 0.5).to(device) if spec.expert_scale else None


def _grid_logits(t, e, gen, span=2048):
    """Logits no two alike per row, held exactly by fp16 (span 2048) or bf16 (span 256): ties are tested on
    purpose, not met by rounding."""
    grid = torch.stack([torch.randperm(span, generator=gen)[:e] for _ in range(t)]) if t else torch.zeros(0, e)
    return (grid.double() - span / 2) * (8 / span)


def test_sqrtsoftplus_scores_hold_far_below_zero():
    """DeepSeek-V4's scoring at logits where log(1 + exp(x)) would round to 0 in fp32: the kernel's weights keep
    their ratios (softplus(x) ~ exp(x) there), as torch's log1p form does."""
    spec = RoutingSpec(2, "sqrtsoftplus", renormalize=True)
    logits = torch.tensor([[-30.0, -31.0, -35.0, -40.0], [25.0, 3.0, -30.0, 0.5]])
    got = routing.route(logits, None, spec, torch.float32, interpret=True)
    want = routing.reference(logits.double(), None, spec)
    assert routing.same_routing(got, want, 1e-5), (got, want)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_interpreted_routing_equals_float64(spec, dtype):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    for t, e in [(5, 64), (1, 24), (0, 16), (3, 40)]:  # 40 and 24: groups of 5 and 3, padded in the kernel
        if e % spec.groups:
            continue
        logits = _grid_logits(t, 2 * e, gen)[:, ::2].to(dtype)  # non-contiguous rows
        bias = torch.randn(e, generator=gen) * 0.5 if spec.bias else None
        scale = _expert_scale(spec, e, gen)
        weights, ids = routing.route(logits, bias, spec, dtype, interpret=True, expert_scale=scale)
        want = routing.reference(logits.double(), None if bias is None else bias.double(), spec,
                                 expert_scale=None if scale is None else scale.double())
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


def test_a_per_expert_scale_must_match_the_spec():
    with pytest.raises(ValueError, match="takes a per-expert scale of shape"):
        routing.route(torch.randn(2, 8), None, RoutingSpec(2, expert_scale=True), torch.float32, interpret=True)
    with pytest.raises(ValueError, match="has no per-expert scale"):
        routing.route(torch.randn(2, 8), None, RoutingSpec(2), torch.float32, interpret=True,
                      expert_scale=torch.ones(8))
    with pytest.raises(ValueError, match=r"of shape \(8,\)"):
        routing.route(torch.randn(2, 8), None, RoutingSpec(2, expert_scale=True), torch.float32, interpret=True,
                      expert_scale=torch.ones(4))


class _Router(torch.nn.Module):
    """A router and the experts as a gathered-weights product: what the pass sees in any model."""

    def __init__(self, squash=False, per_token=False, scale_buffer=False, e=8, h=16, i=8, k=2, fp32_router=False,
                 return_logits=False):
        super().__init__()
        self.squash, self.per_token, self.k = squash, per_token, k
        self.fp32_router, self.return_logits = fp32_router, return_logits
        self.scale = torch.nn.Buffer(torch.tensor(2.0)) if scale_buffer else None
        self.gate = torch.nn.Linear(h, e, bias=False)
        if fp32_router:  # DeepSeek's and HF's form: a half-precision router weight multiplied in fp32
            self.gate.half()
        self.w1 = torch.nn.Parameter(torch.randn(e, 2 * i, h) / h ** 0.5)
        self.w2 = torch.nn.Parameter(torch.randn(e, h, i) / i ** 0.5)

    def forward(self, x):
        if self.fp32_router:
            logits = torch.nn.functional.linear(x.half().float(), self.gate.weight.float())
        else:
            logits = self.gate(x)
        scores = logits.softmax(-1)
        weights, ids = scores.topk(self.k, dim=-1)
        if self.squash:  # outside the routing space: the weights squared
            weights = weights * weights
        if self.per_token:  # reads the hidden states: not a function of the logits alone
            weights = weights * x[:, :1].sigmoid()
        if self.scale is not None:  # a scale held in a buffer: a graph input, not a constant
            weights = weights * self.scale
        y = gathered_experts(x, ids, weights, self.w1, self.w2, torch.nn.functional.silu)
        return (y, logits) if self.return_logits else y


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


@pytest.mark.parametrize("variant,tokens,where", [
    ({}, 6, "in deepfuse's router kernels (split over the hidden size"),
    ({"fp32_router": True}, 6, "in deepfuse's router kernels (split"),  # both casts read through
    ({}, 65, "(tiled over tokens and experts, fp32 products in IEEE precision)"),  # past the split form's tokens
    ({"fp32_router": True}, 65, "(tiled over tokens and experts, fp16 products on the tensor cores)"),
    ({"return_logits": True}, 6, "read outside the router"),
    ({"e": 16, "h": 32}, 2, "KiB up to which the fused router matmul is tried"),  # 2 KiB fp32, past a 1 KiB limit
    ({"e": 16, "h": 32}, 65, "in deepfuse's router kernels"),  # the tiled form reads it once per 16 tokens
])
def test_router_matmul_runs_in_deepfuse_kernels_split_or_tiled(variant, tokens, where, monkeypatch):
    """The logits' matmul runs in deepfuse's launches, its operands read as stored (a half weight and
    half-rounded hidden states multiplied in fp32 included): split over the hidden size at a few tokens, tiled
    past them; past the split form's weight limit (lowered here, so that the interpreter runs a small model), or
    with the logits needed elsewhere, it stays with Inductor and the routing kernel takes the logits. Outputs
    checked against eager."""
    monkeypatch.setattr(routing, "ROUTER_MATMUL_MAX_WEIGHT_BYTES", 1 << 10)  # the others' weights are 512 B
    report = compile_and_compare(_Router(**variant), (torch.randn(tokens, variant.get("h", 16)),), 1e-5,
                                 interpret=True)
    (m,) = [m for m in report.matches if m.family == "moe"]
    assert m.params["routing"] == "kernel: softmax, top-2", m.params
    assert where in m.params["router_matmul"], m.params


@pytest.mark.parametrize("tokens", [40, 100])
def test_interpreted_router_matmul_equals_float64(tokens):
    """route_hidden against the matmul in float64 then the reference routing: mixed operand dtypes, a matmul
    dtype that rounds (fp16), a hidden size off the K tile, a non-contiguous router weight, V3's routing; split
    over the hidden size at 40 tokens, tiled at 100 (its fp16 products on the tensor cores, the fp32 ones in
    IEEE precision, the last of seven 16-token tiles ragged, hidden states with a row stride past their width;
    bf16's dot is the GPU test's: the interpreter's is wrong)."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    spec = SPECS[4]
    for x_dtype, w_dtype, mm_dtype in [(torch.float16, torch.float16, torch.float32),
                                       (torch.float32, torch.float16, torch.float16),
                                       (torch.float32, torch.float32, torch.float32),
                                       (torch.bfloat16, torch.bfloat16, torch.float32)]:
        if tokens > routing.ROUTER_MATMUL_MAX_TOKENS and x_dtype == torch.bfloat16:
            continue
        x = torch.randn(tokens, 232, generator=gen).to(x_dtype)[:, :200]
        w = (torch.randn(200, 16, generator=gen) / 200 ** 0.5).to(w_dtype).t()  # [16, 200], strides (1, 16)
        bias = torch.randn(16, generator=gen) * 0.1
        logits = torch.nn.functional.linear(x.to(mm_dtype), w.to(mm_dtype))  # the graph's own rounding
        want = routing.reference(logits.double(), bias.double(), spec)
        got = routing.route_hidden(x, w, bias, spec, torch.float32, mm_dtype, interpret=True)
        if mm_dtype == torch.float32:  # and with a per-expert scale on the weights (Gemma 4's)
            scaled = dataclasses.replace(spec, expert_scale=True)
            scale = torch.rand(16, generator=gen) + 0.5
            got_scaled = routing.route_hidden(x, w, bias, scaled, torch.float32, mm_dtype, interpret=True,
                                              expert_scale=scale)
            assert torch.equal(got_scaled[1], got[1]) and torch.allclose(got_scaled[0], got[0] * scale[got[1]])
        # Rows whose choices (sigmoid + bias) lie within a few of the matmul dtype's ulps of each other may rank
        # those experts either way: the kernel's and torch's summation orders differ.
        choice = logits.double().sigmoid() + bias.double()
        gap = choice.sort(dim=-1).values.diff(dim=-1).min(dim=-1).values
        rows = gap > torch.finfo(mm_dtype).eps * (1 + logits.double().abs().amax(dim=-1))
        assert rows.sum() >= 4
        assert routing.same_routing(tuple(v[rows] for v in got), tuple(v[rows] for v in want),
                                    1e-5 if mm_dtype == torch.float32 else 2e-3), (x_dtype, mm_dtype)


@pytest.mark.parametrize("tokens", [5, 70])
def test_interpreted_router_matmul_of_many_experts_and_splits(tokens):
    """V3's router (256 experts in 8 groups, sigmoid, bias) at a hidden size of 2100: at 5 tokens 17 splits x 4
    expert blocks of one 64 x 128 weight tile each, the last split ragged, summed by the routing kernel 16 splits
    at a time; at 70, tiles of 16 tokens x 64 experts, the last K step of 64 ragged."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    spec, e = MODEL_SPECS[1]
    x = torch.randn(tokens, 2100, generator=gen).half()
    w = (torch.randn(e, 2100, generator=gen) / 2100 ** 0.5).half()
    bias = torch.randn(e, generator=gen) * 0.1
    logits = torch.nn.functional.linear(x.float(), w.float())
    want = routing.reference(logits.double(), bias.double(), spec)
    got = routing.route_hidden(x, w, bias, spec, torch.float32, torch.float32, interpret=True)
    choice = (logits.double().sigmoid() + bias.double()).sort(dim=-1, descending=True).values
    rows = choice[:, spec.top_k - 1] - choice[:, spec.top_k] > 1e-5  # the k-th choice clear of the next
    assert rows.sum() >= 2
    assert routing.same_routing(tuple(v[rows] for v in got), tuple(v[rows] for v in want), 1e-5)


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
@pytest.mark.parametrize("spec,experts", MODEL_SPECS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_routing_equals_float64(t, spec, experts, dtype):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    logits = _grid_logits(t, experts, gen, 256 if dtype == torch.bfloat16 else 2048).to("cuda", dtype)
    bias = (torch.randn(experts, generator=gen) * 0.5).cuda() if spec.bias else None
    scale = _expert_scale(spec, experts, gen, "cuda")
    weights, ids = routing.route(logits, bias, spec, torch.float32, expert_scale=scale)
    want = routing.reference(logits.double(), None if bias is None else bias.double(), spec,
                             expert_scale=None if scale is None else scale.double())
    assert routing.same_routing((weights, ids), want, 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 7, 64, 65, 2048])
@pytest.mark.parametrize("spec,experts", MODEL_SPECS)
def test_gpu_router_matmul_equals_float64(t, spec, experts):
    """deepfuse's router matmul (split over the hidden size up to 64 tokens, tiled past them: bf16 products on the
    tensor cores) at the model shapes: bf16 hidden states and router weight multiplied in fp32 (DeepSeek's form),
    against the float64 matmul then the reference routing, on rows whose
    k-th choice is clear of the next one by more than fp32 rounding of the logits moves it."""
    x = torch.randn(t, 2048, device="cuda").bfloat16()
    w = (torch.randn(experts, 2048, device="cuda") / 2048 ** 0.5).bfloat16()
    bias = (torch.randn(experts, device="cuda") * 0.1) if spec.bias else None
    scale = _expert_scale(spec, experts, torch.Generator().manual_seed(7), "cuda")
    logits = x.double() @ w.double().t()
    got = routing.route_hidden(x, w, bias, spec, torch.float32, torch.float32, expert_scale=scale)
    want = routing.reference(logits, None if bias is None else bias.double(), spec,
                             expert_scale=None if scale is None else scale.double())
    choice = routing.reference_scores(logits, spec) + (0 if bias is None else bias.double())
    ranked = choice.sort(dim=-1, descending=True).values
    rows = (ranked[:, spec.top_k - 1] - ranked[:, spec.top_k] > 1e-5).cpu()  # the k-th choice clear of the next
    got, want = tuple(v.cpu()[rows] for v in got), tuple(v.cpu()[rows] for v in want)
    assert routing.same_routing(got, want, 1e-4)


def test_fused_router_timing_runs_both_forms(monkeypatch):
    """The GPU-only compile-time timing of the fused router matmul against the graph's form, run on CPU tensors
    with the GPU queries stubbed: both candidates execute (a Python-level slip in either would raise here) and
    the choice is what autotune returns."""
    import types

    import torch.fx as fx
    from deepfuse.passes import moe as moe_pass
    from deepfuse.runtime import autotune

    graph = fx.Graph()
    nodes = {name: graph.placeholder(name) for name in ("x", "w", "logits", "bias")}
    vals = {"x": torch.randn(3, 64).half(), "w": torch.randn(8, 64).half(), "logits": torch.randn(3, 8),
            "bias": torch.randn(8)}
    for name, node in nodes.items():
        node.meta["val"] = vals[name]
    ran = []

    def choose(key, n, configs, run, device, enabled=True):
        for cfg in configs:
            run(cfg)
            ran.append(cfg["fused"])
        return configs[1]

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(L2_cache_size=1 << 14))
    monkeypatch.setattr(autotune, "choose", choose)
    spec = RoutingSpec(2, "sigmoid", bias=True)
    matmul = {"x": nodes["x"], "w": nodes["w"]}
    assert moe_pass._fused_router_wins(matmul, nodes["logits"], nodes["bias"], spec, torch.float32, "test")
    assert ran == [False, True]
