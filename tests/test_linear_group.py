"""Decode-sized projections of one input in one launch (deepfuse.passes.linear_group): the kernel through Triton's
interpreter against float64 over poisoned outputs, and the pass grouping the matmuls that share their input (the
bundled model's q_proj and kv_a_proj at a decode step) while leaving alone single matmuls, prefill sizes, cast or
computed weights and symbolic row counts, and leaving the graph untouched on CPU unless asked."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import deepfuse
from conftest import TOL, rel_err
from deepfuse.runtime.kernels import linear_group as lg
from deepfuse.runtime.kernels import quant


def _ref(x, w):
    return x.reshape(-1, x.shape[-1]).double() @ w.double().t()


def _normed(x, g, eps):
    """RMSNorm(x) with weight g, in float64."""
    xd = x.double()
    return xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps) * g.double()


@pytest.mark.parametrize("config", lg.CONFIGS, ids=lambda c: f"n{c['BLOCK_N']}-k{c['BLOCK_K']}")
@pytest.mark.parametrize("m,ns,k", [(1, [48, 16], 256), (5, [40, 7, 33], 200), (16, [5, 16, 70, 64], 130)],
                         ids=str)
def test_interpreted_linear_group_matches_float64(config, m, ns, k):
    """Every tile; 2 to 4 weights, N off the N tile (one of 5 rows, one shorter than a tile), K off the K tile (a
    masked last step), 1 to 16 rows; every output element written (the outputs start as NaN)."""
    for dtype in (torch.float32, torch.float16):
        x = torch.randn(m, k).to(dtype)
        ws = [(torch.randn(n, k) / k ** 0.5).to(dtype) for n in ns]
        out = [torch.full((m, n), float("nan"), dtype=dtype) for n in ns]
        ys = lg.linear_group(x, ws, interpret=True, config=config, out=out)
        for y, o, w in zip(ys, out, ws):
            assert y.shape == (m, w.shape[0]) and y.dtype == dtype and y.data_ptr() == o.data_ptr()
            assert rel_err(y, _ref(x, w)) < TOL[dtype]


@pytest.mark.parametrize("m,ns,k", [(1, [48, 16], 256), (5, [40, 7, 33], 200), (16, [5, 70], 130)], ids=str)
def test_interpreted_linear_group_with_rms_norm_matches_float64(m, ns, k):
    """RMSNorm(x) then the projections, in one launch (NORM): each tile, x with large rows (the rsqrt matters), the
    norm weight in fp32 and in x's dtype, K off the K tile; outputs start as NaN."""
    for config in lg.CONFIGS:
        for dtype in (torch.float32, torch.float16):
            x = (torch.randn(m, k) * torch.rand(m, 1) * 8).to(dtype)
            ws = [(torch.randn(n, k) / k ** 0.5).to(dtype) for n in ns]
            g = (torch.rand(k) + 0.5).to(dtype if config is lg.CONFIGS[0] else torch.float32)
            out = [torch.full((m, n), float("nan"), dtype=dtype) for n in ns]
            ys = lg.linear_group(x, ws, interpret=True, config=config, out=out, norm_weight=g, eps=1e-5)
            for y, w in zip(ys, ws):
                assert rel_err(y, _ref(_normed(x, g, 1e-5), w)) < TOL[dtype], (config, dtype)


def _fp8(ws):
    """Each weight in FP8 128 x 128 blocks: (weights, scales)."""
    parts = [quant.quantize_weight(w, "fp8-block") for w in ws]
    return [q for q, _ in parts], [sc for _, sc in parts]


def _w8a8_ref(x, qs, scales):
    """The FP8 W8A8 layers in float64: x quantized per row and 128-wide tile, the weights dequantized."""
    return [quant.reference(x, q, sc, None, "fp8-block", True, compute=torch.float64) for q, sc in zip(qs, scales)]


@pytest.mark.parametrize("config", lg.FP8_CONFIGS, ids=lambda c: f"n{c['BLOCK_N']}-s{c['num_stages']}")
@pytest.mark.parametrize("m,ns,k", [(1, [48, 16], 256), (5, [40, 7, 200], 200), (3, [130, 64, 5, 16], 384)],
                         ids=str)
def test_interpreted_fp8_linear_group_matches_its_w8a8_layers(config, m, ns, k):
    """FP8 weights in 128 x 128 blocks, one launch: each tile against the W8A8 layers in float64 (x quantized per
    row and 128-wide tile), N off the tiles and the scale blocks, K off the scale block (a ragged last tile), a few
    activations 100x the rest; outputs start as NaN."""
    for dtype in (torch.float32, torch.float16):
        x = torch.randn(m, k)
        x.view(-1)[::37] *= 100
        x = x.to(dtype)
        qs, scales = _fp8([torch.randn(n, k) / k ** 0.5 for n in ns])
        out = [torch.full((m, n), float("nan"), dtype=dtype) for n in ns]
        ys = lg.linear_group(x, qs, interpret=True, config=config, out=out, weight_scales=scales)
        for y, want in zip(ys, _w8a8_ref(x, qs, scales)):
            assert y.dtype == dtype and torch.isfinite(y).all()
            # one e4m3 rounding step apart now and then (fp32 against float64 scales); a wrong scale is off by far more
            assert rel_err(y, want) < max(TOL[dtype], 1e-3), (config, dtype)


def test_interpreted_linear_group_one_weight_no_rows_and_strided_activations():
    w = torch.randn(24, 64) / 8
    x = torch.randn(2, 3, 128)[:, :, ::2]  # [2, 3, 64] with a stride-2 last dim: copied into rows
    (y,) = lg.linear_group(x, [w], interpret=True)
    assert y.shape == (2, 3, 24) and rel_err(y, _ref(x, w).view(2, 3, 24)) < 1e-5
    empty = lg.linear_group(torch.randn(0, 64), [w, w[:8]], interpret=True)
    assert [tuple(e.shape) for e in empty] == [(0, 24), (0, 8)]


def test_linear_group_bad_input_is_a_clear_error():
    x, w = torch.randn(1, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match="1 to 4 weights"):
        lg.linear_group(x, [w] * 5, interpret=True)
    with pytest.raises(ValueError, match="do not chain"):
        lg.linear_group(x, [w, torch.randn(4, 9)], interpret=True)
    with pytest.raises(TypeError, match="read in x's dtype"):
        lg.linear_group(x, [w, w.half()], interpret=True)
    with pytest.raises(ValueError, match="contiguous"):
        lg.linear_group(x, [torch.randn(8, 4).t()], interpret=True)
    with pytest.raises(ValueError, match="at most 16 rows"):
        lg.linear_group(torch.randn(17, 8), [w], interpret=True)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        lg.linear_group(x.double(), [w.double()], interpret=True)
    with pytest.raises(ValueError, match="norm weight must be"):
        lg.linear_group(x, [w], interpret=True, norm_weight=torch.ones(9))
    (q,), (sc,) = _fp8([torch.randn(4, 8)])
    with pytest.raises(TypeError, match="read in x's dtype"):
        lg.linear_group(x, [q], interpret=True)
    with pytest.raises(TypeError, match="must be float8_e4m3fn"):
        lg.linear_group(x, [w], interpret=True, weight_scales=[sc])
    with pytest.raises(ValueError, match=r"scales must be fp32 \(1, 1\)"):
        lg.linear_group(x, [q], interpret=True, weight_scales=[torch.ones(2, 1)])
    with pytest.raises(ValueError, match="do not take a norm_weight"):
        lg.linear_group(x, [q], interpret=True, weight_scales=[sc], norm_weight=torch.ones(8))
    with pytest.raises(ValueError, match="FP8 tiles take BLOCK_K 128"):
        lg.linear_group(x, [q], interpret=True, weight_scales=[sc], config=lg.CONFIGS[0])


class Block(nn.Module):
    """An attention-style block's first projections, all of the normed input (q, kv, and three more to pass the
    four weights one launch takes), then an output projection of something else, and a router multiplying in
fp32 over an fp16-stored weight."""

    def __init__(self, hidden=64, extra=0):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.q = nn.Linear(hidden, 96, bias=False)
        self.kv = nn.Linear(hidden, 40, bias=False)
        self.more = nn.ModuleList(nn.Linear(hidden, 24, bias=False) for _ in range(extra))
        self.o = nn.Linear(96, hidden, bias=False)
        self.router = nn.Parameter((torch.randn(8, hidden) / hidden ** 0.5).half())  # cast: not grouped

    def forward(self, x):
        h = self.norm(x)
        q, kv = self.q(h), self.kv(h)
        out = self.o(torch.relu(q)) + kv.sum(-1, keepdim=True)
        for proj in self.more:
            out = out + proj(h).mean(-1, keepdim=True)
        return out, F.linear(h.float(), self.router.float())


def _compile(model, x, passes=("moe", "mla", "rms_norm", "linear_group"), **options):
    torch._dynamo.reset()
    report = deepfuse.Report()
    with torch.no_grad(), deepfuse.collect(report):
        out = torch.compile(model, backend="deepfuse",
                            options={"interpret": True, "passes": passes and list(passes), **options})(x)
    return out, report


def _groups(report):
    return [m for m in report.matches if m.family == "linear_group"]


def test_projections_of_one_input_are_one_launch():
    model = Block()
    x = torch.randn(1, 2, 64)
    (out, logits), report = _compile(model, x)
    (found,) = _groups(report)
    assert found.params["out_features"] == [96, 40] and found.params["projections"] == ["q", "kv"], found
    assert found.params["rows"] == 2 and found.kernel_file.endswith(".py")
    with torch.no_grad():
        ref, ref_logits = model(x)
    assert rel_err(out, ref) < 1e-5 and rel_err(logits, ref_logits) < 1e-5


def test_more_projections_than_one_launch_takes_are_cut_in_graph_order():
    """Six projections of one input: a launch of four, then one of two."""
    model = Block(extra=4)
    x = torch.randn(3, 64)
    (out, _), report = _compile(model, x)
    assert [m.params["out_features"] for m in _groups(report)] == [[96, 40, 24, 24], [24, 24]]
    with torch.no_grad():
        assert rel_err(out, model(x)[0]) < 1e-5


def test_prefill_sizes_single_matmuls_and_symbolic_rows_are_left_alone():
    model = Block()
    _, report = _compile(model, torch.randn(1, 40, 64))  # 40 rows: past the decode sizes
    assert not _groups(report)

    class Computed(nn.Module):  # one weight is computed every call, the other cast: neither read as stored
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.randn(16, 32))
            self.b = nn.Parameter(torch.randn(16, 32).half())
            self.c = nn.Parameter(torch.randn(16, 32))

        def forward(self, x):
            return F.linear(x, self.a * 2.0) + F.linear(x, self.b.float()) + F.linear(x, self.c)

    computed, x = Computed(), torch.randn(1, 32)
    out, report = _compile(computed, x)
    assert not _groups(report)
    with torch.no_grad():
        assert rel_err(out, computed(x)) < 1e-5
    x = torch.randn(3, 64)
    torch._dynamo.reset()
    torch._dynamo.mark_dynamic(x, 0)  # a row count known only at run time may be a prefill's
    _, report = _compile(Block(), x)
    assert not _groups(report)


class NormedBlock(nn.Module):
    """A decoder layer's start: RMSNorm (HF's form), then the projections of its output; with ``also_read`` the
    normed values also leave the block."""

    def __init__(self, hidden=64, also_read=False):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(hidden) + 0.5)
        self.q = nn.Linear(hidden, 96, bias=False)
        self.kv = nn.Linear(hidden, 40, bias=False)
        self.also_read = also_read

    def forward(self, x):
        h = x.float()
        h = self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
        out = self.q(h).sum(-1, keepdim=True) + self.kv(h)
        return (out, h) if self.also_read else out


def test_an_rms_norm_read_by_the_projections_alone_joins_their_launch(monkeypatch):
    """Asked for (DEEPFUSE_LINEAR_GROUP_NORM=1), the norm's launch is gone: the group computes it (explain's
    ``rms_norm``), the rms_norm pass finds nothing left; when the normed values are read elsewhere too, or in fp16,
    the norm stays its own kernel. Not asked for, it stays its own kernel."""
    x = torch.randn(1, 2, 64) * 4
    model = NormedBlock()
    out, report = _compile(model, x)
    (found,) = _groups(report)
    assert "rms_norm" not in found.params and [m for m in report.matches if m.family == "rms_norm"], str(report)
    with torch.no_grad():
        assert rel_err(out, model(x)) < 1e-5
    monkeypatch.setenv("DEEPFUSE_LINEAR_GROUP_NORM", "1")
    out, report = _compile(model, x)
    (found,) = _groups(report)
    assert found.params["rms_norm"] == "in the launch (eps=1e-06)", found.params
    assert not [m for m in report.matches if m.family == "rms_norm"], str(report)
    with torch.no_grad():
        assert rel_err(out, model(x)) < 1e-5
    model = NormedBlock(also_read=True)
    (out, h), report = _compile(model, x)
    (found,) = _groups(report)
    assert "rms_norm" not in found.params and [m for m in report.matches if m.family == "rms_norm"], str(report)
    with torch.no_grad():
        ref, ref_h = model(x)
    assert rel_err(out, ref) < 1e-5 and rel_err(h, ref_h) < 1e-5
    model = NormedBlock().half()  # fp16: x * weight before the normalization could overflow, so the norm stays
    out, report = _compile(model, x.half())
    (found,) = _groups(report)
    assert "rms_norm" not in found.params and [m for m in report.matches if m.family == "rms_norm"], str(report)


def test_on_cpu_the_family_waits_to_be_named():
    """By default it rewrites only what it timed faster on a GPU: on CPU the graph keeps its matmuls."""
    _, report = _compile(Block(), torch.randn(1, 64), passes=None)  # the default families
    assert not _groups(report) and not [d for d in report.declined if d.family == "linear_group"]


def test_bundled_decode_step_groups_the_projections_of_one_input(monkeypatch):
    """The bundled tiny model's decode step (static cache, batch 2): each layer's q_a_proj (the tiny config has
    V3's query LoRA) and kv_a_proj_with_mqa read the input norm's output and become one launch with that norm (the
    fold asked for), as do the dense layer's gate_proj and up_proj; the logits equal eager's."""
    from deepfuse.models import DeepSeekForCausalLM, get_config

    monkeypatch.setenv("DEEPFUSE_LINEAR_GROUP_NORM", "1")
    cfg = get_config("tiny")
    model = DeepSeekForCausalLM.from_config(cfg, seed=int(torch.randint(0, 1000, ())))
    prompt, step = torch.randint(0, cfg.vocab_size, (2, 5)), torch.randint(0, cfg.vocab_size, (2, 1))
    eager_cache, cache = model.new_cache(2, 8), model.new_cache(2, 8)
    torch._dynamo.reset()
    report = deepfuse.Report()
    with torch.no_grad():
        model(prompt, torch.tensor(0), eager_cache)
        model(prompt, torch.tensor(0), cache)
        expected = model(step, torch.tensor(5), eager_cache)
        compiled = torch.compile(model, backend="deepfuse",
                                 options={"interpret": True, "passes": ["moe", "mla", "rms_norm", "linear_group"]})
        with deepfuse.collect(report):
            logits = compiled(step, torch.tensor(5), cache)
    names = sorted(tuple(p.rsplit(".", 1)[-1] for p in g.params["projections"]) for g in _groups(report))
    dense = cfg.first_k_dense_replace
    assert names == ([("gate_proj", "up_proj")] * dense
                     + [("q_a_proj", "kv_a_proj_with_mqa")] * cfg.num_hidden_layers), str(report)
    # each group's input norm (input_layernorm, the dense MLP's post_attention_layernorm) in its launch; the
    # residual adds in front of them stay with Inductor
    assert all("rms_norm" in g.params for g in _groups(report)), str(report)
    assert rel_err(logits, expected) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("m,ns,k,dtype", [
    (1, [3072, 576], 2048, torch.bfloat16),   # V2-Lite q_proj + kv_a_proj_with_mqa
    (1, [1536, 576], 7168, torch.bfloat16),   # V3 q_a_proj + kv_a_proj_with_mqa
    (16, [10944, 10944], 2048, torch.bfloat16),  # a dense MLP's gate and up at 16 rows
    (3, [100, 7, 33, 64], 200, torch.float16),   # four weights, N and K off the tiles
    (2, [96, 40], 256, torch.float32),
], ids=str)
def test_gpu_linear_group_every_tile_matches_float64(m, ns, k, dtype):
    x = torch.randn(m, k, device="cuda").to(dtype)
    ws = [(torch.randn(n, k, device="cuda") / k ** 0.5).to(dtype) for n in ns]
    for config in lg.CONFIGS:
        out = [torch.full((m, n), float("nan"), device="cuda", dtype=dtype) for n in ns]
        ys = lg.linear_group(x, ws, config=config, out=out)
        for y, w in zip(ys, ws):
            assert y.dtype == dtype and torch.isfinite(y).all()
            assert rel_err(y, _ref(x, w)) < TOL[dtype], config


@pytest.mark.gpu
@pytest.mark.parametrize("m,ns,k", [(1, [3072, 576], 2048), (1, [2048], 2048), (16, [1536, 576], 7168)], ids=str)
def test_gpu_fp8_linear_group_every_tile_matches_its_w8a8_layers(m, ns, k):
    """FP8 W8A8 projections in one launch at V2-Lite's (q_proj + kv_a_proj; o_proj alone) and V3's shapes, bf16
    activations with outliers, every FP8 tile, against the layers in float64."""
    x = torch.randn(m, k, device="cuda")
    x.view(-1)[::97] *= 100
    x = x.bfloat16()
    qs, scales = _fp8([torch.randn(n, k, device="cuda") / k ** 0.5 for n in ns])
    want = _w8a8_ref(x, qs, scales)
    for config in lg.FP8_CONFIGS:
        out = [torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16) for n in ns]
        ys = lg.linear_group(x, qs, config=config, out=out, weight_scales=scales)
        for y, w in zip(ys, want):
            assert torch.isfinite(y).all() and rel_err(y, w) < TOL[torch.bfloat16], config


@pytest.mark.gpu
@pytest.mark.parametrize("m,k", [(1, 2048), (16, 7168)], ids=str)
def test_gpu_linear_group_with_rms_norm_matches_float64(m, k):
    """The input's RMSNorm in the launch, bf16, V2-Lite's and V3's widths, every tile; rows of very different
    scales (the rsqrt per row)."""
    x = (torch.randn(m, k, device="cuda") * torch.rand(m, 1, device="cuda") * 30).bfloat16()
    g = (torch.rand(k, device="cuda") + 0.5).bfloat16()
    ws = [(torch.randn(n, k, device="cuda") / k ** 0.5).bfloat16() for n in (3072, 576)]
    normed = _normed(x, g, 1e-6)
    for config in lg.CONFIGS:
        out = [torch.full((m, w.shape[0]), float("nan"), device="cuda", dtype=torch.bfloat16) for w in ws]
        ys = lg.linear_group(x, ws, config=config, out=out, norm_weight=g, eps=1e-6)
        for y, w in zip(ys, ws):
            assert torch.isfinite(y).all() and rel_err(y, _ref(normed, w)) < TOL[torch.bfloat16], config


@pytest.mark.gpu
def test_gpu_pass_times_the_group_and_keeps_what_is_faster():
    """On a GPU the group is timed against cuBLAS: either it becomes one launch with the eager result, or it is
    declined with the timing as the reason; never both, never silently."""
    model = Block(hidden=2048).cuda().to(torch.bfloat16)
    model.q = nn.Linear(2048, 3072, bias=False, device="cuda", dtype=torch.bfloat16)
    model.kv = nn.Linear(2048, 576, bias=False, device="cuda", dtype=torch.bfloat16)
    model.o = nn.Linear(3072, 2048, bias=False, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, 1, 2048, device="cuda", dtype=torch.bfloat16)
    torch._dynamo.reset()
    report = deepfuse.Report()
    with torch.no_grad(), deepfuse.collect(report):
        out, _ = torch.compile(model, backend="deepfuse")(x)
        ref, _ = model(x)
    groups = _groups(report)
    declined = [d for d in report.declined if d.family == "linear_group"]
    assert len(groups) + len(declined) == 1, str(report)
    assert not declined or "cuBLAS timed faster" in declined[0].reason
    assert rel_err(out, ref) < 1e-2
