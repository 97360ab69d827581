"""Decode-sized matmuls over float weights (deepfuse.passes.linear): the split-K kernel through Triton's
interpreter against float64, and the pass taking a model's projections (and a router's fp32-cast weight) at a few
rows while leaving prefill sizes, computed weights and symbolic row counts alone."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import deepfuse
from conftest import TOL, rel_err
from deepfuse.runtime.kernels import quant


def _ref(x, w, bias=None):
    y = x.double() @ w.double().t()
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("config", quant.DENSE_DECODE_CONFIGS, ids=lambda c: f"n{c['BLOCK_N']}-split{c.get('SPLIT_K', 'auto')}")
@pytest.mark.parametrize("m,n,k", [(1, 72, 256), (5, 100, 200), (16, 40, 1000)], ids=str)
def test_interpreted_decode_linear_matches_float64(config, m, n, k):
    """Every decode tile, K off the 128-wide tile (a masked last step), N off the N tile, 1 to 16 rows."""
    for dtype in (torch.float32, torch.float16):
        x = torch.randn(m, k).to(dtype)
        w = (torch.randn(n, k) / k ** 0.5).to(dtype)
        out = quant.decode_linear(x, w, interpret=True, config=config)
        assert out.shape == (m, n) and out.dtype == dtype
        assert rel_err(out, _ref(x, w)) < TOL[dtype]


def test_interpreted_decode_linear_weight_in_its_own_dtype_transposed_storage_and_bias():
    """A router's form: fp32 activations against an fp16 weight read as stored (widened in registers), the weight
    held [K, N] and seen transposed, a bias, 3-D activations, non-contiguous rows."""
    x = torch.randn(2, 3, 128)[:, ::2]  # [2, 2, 128], not contiguous
    w = (torch.randn(128, 64) / 128 ** 0.5).half().t()  # [64, 128] with strides (1, 64)
    bias = torch.randn(64)
    out = quant.decode_linear(x, w, bias, interpret=True)
    assert out.shape == (2, 2, 64) and out.dtype == torch.float32
    assert rel_err(out, _ref(x.reshape(-1, 128), w, bias).view(2, 2, 64)) < 1e-6


def test_decode_linear_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="do not chain"):
        quant.decode_linear(torch.randn(1, 8), torch.randn(4, 9), interpret=True)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        quant.decode_linear(torch.randn(1, 8).double(), torch.randn(4, 8), interpret=True)
    with pytest.raises(ValueError, match="bias"):
        quant.decode_linear(torch.randn(1, 8), torch.randn(4, 8), torch.randn(5), interpret=True)


class Projections(nn.Module):
    """An attention-style block's projections and a router multiplying in fp32 over a bf16-stored weight (here
    fp16, which the interpreter computes right), as DeepSeek and HF routers write it."""

    def __init__(self, hidden=64, out=96, experts=8):
        super().__init__()
        self.q = nn.Linear(hidden, out, bias=False)
        self.o = nn.Linear(out, hidden, bias=True)
        self.router = nn.Parameter((torch.randn(experts, hidden) / hidden ** 0.5).half())

    def forward(self, x):
        h = self.o(torch.relu(self.q(x)))
        logits = F.linear(h.float(), self.router.float())
        return h, logits


def _compile(model, *inputs, **options):
    with torch.no_grad():
        report = deepfuse.Report()
        with deepfuse.collect(report):
            out = torch.compile(model, backend="deepfuse",
                                options={"interpret": True, "passes": ["moe", "mla", "rms_norm", "linear"],
                                         **options})(*inputs)
    return out, report


def _linear(report):
    return [m for m in report.matches if m.family == "linear"]


def test_decode_projections_and_the_router_cast_are_fused():
    model = Projections()
    x = torch.randn(1, 1, 64)
    (h, logits), report = _compile(model, x)
    found = _linear(report)
    assert len(found) == 3, report
    assert sorted(m.params["out_features"] for m in found) == [8, 64, 96]
    router = next(m for m in found if m.params["out_features"] == 8)
    assert router.params["weight_cast_fused"] and router.params["weight_dtype"] == "float16"
    assert next(m for m in found if m.params["out_features"] == 64).params["bias"]
    with torch.no_grad():
        h_ref, logits_ref = model(x)
    assert rel_err(h, h_ref) < 1e-5 and rel_err(logits, logits_ref) < 1e-5


def test_the_family_is_opt_in():
    """Not in the default passes (it measured no faster than cuBLAS on H200): named, it runs; unnamed, not."""
    with torch.no_grad():
        report = deepfuse.Report()
        with deepfuse.collect(report):
            torch.compile(Projections(), backend="deepfuse", options={"interpret": True})(torch.randn(1, 64))
    assert not _linear(report)


def test_prefill_sizes_computed_weights_and_symbolic_rows_are_left_alone():
    model = Projections()
    _, report = _compile(model, torch.randn(1, 40, 64))  # 40 rows: past the decode sizes
    assert not _linear(report)

    class Scaled(nn.Module):  # the weight is computed every call: not one the kernel can read as stored
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(16, 32))

        def forward(self, x):
            return F.linear(x, self.w * 2.0)

    scaled, x = Scaled(), torch.randn(1, 32)
    out, report = _compile(scaled, x)
    assert not _linear(report)
    assert rel_err(out, _ref(x, scaled.w.detach() * 2.0)) < 1e-5
    torch._dynamo.reset()
    x = torch.randn(3, 64)
    torch._dynamo.mark_dynamic(x, 0)  # a row count known only at run time may be a prefill's
    _, report = _compile(Projections(), x)
    assert not _linear(report)


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k,x_dtype,w_dtype", [
    (1, 3072, 2048, torch.bfloat16, torch.bfloat16),   # V2-Lite q_proj
    (1, 576, 2048, torch.bfloat16, torch.bfloat16),    # kv_a_proj_with_mqa
    (16, 2048, 2048, torch.bfloat16, torch.bfloat16),  # o_proj at 16 rows
    (1, 64, 2048, torch.float32, torch.bfloat16),      # the router: fp32 activations, bf16 weight widened
    (7, 10944, 2048, torch.float16, torch.float16),    # a dense MLP's gate
], ids=str)
def test_gpu_decode_linear_every_tile_matches_float64(m, n, k, x_dtype, w_dtype):
    x = torch.randn(m, k, device="cuda").to(x_dtype)
    w = (torch.randn(n, k, device="cuda") / k ** 0.5).to(w_dtype)
    bias = torch.randn(n, device="cuda").to(x_dtype)
    for config in quant.DENSE_DECODE_CONFIGS:
        out = quant.decode_linear(x, w, bias, config=config)
        assert out.dtype == x_dtype and torch.isfinite(out).all()
        assert rel_err(out, _ref(x, w, bias)) < {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[x_dtype]
