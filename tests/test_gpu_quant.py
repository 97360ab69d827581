"""The quantized-matmul kernels compiled for the GPU, in bf16 (which the interpreter cannot check), at
DeepSeek-V2-Lite projection shapes and odd ones, against float64 math on the dequantized operands."""
import pytest
import torch

from conftest import rel_err
from deepfuse.runtime.kernels import quant

pytestmark = pytest.mark.gpu

MODES = [("fp8-block", True, False), ("fp8-block", True, True), ("fp8-block", False, None),
         ("int8-channel", False, None)]
SHAPES = [(1, 3072, 2048), (16, 2048, 10944), (128, 4096, 512), (4096, 2048, 2048), (333, 1000, 1000), (0, 256, 256)]


@pytest.mark.parametrize("mode", MODES, ids=["fp8-fused-quant", "fp8-prequant", "fp8-weight-only", "int8"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"m{m}n{n}k{k}" for m, n, k in SHAPES])
def test_quant_matmul_bf16_on_gpu(mode, shape):
    fmt, act_quant, pre = mode
    m, n, k = shape
    x = torch.randn(m, k + 8, device="cuda", dtype=torch.bfloat16)
    if m:
        x.view(-1)[torch.randint(0, x.numel(), (m * k // 300 + 1,), device="cuda")] *= 100
    x = x[:, :k]  # non-contiguous rows
    w = torch.randn(n, k, device="cuda") / k ** 0.5
    w.view(-1)[torch.randint(0, n * k, (n * k // 500 + 1,), device="cuda")] *= 100
    wq, scale = quant.quantize_weight(w, fmt)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    out = quant.quant_matmul(x, wq, scale, bias, fmt, act_quant, prequantize=pre)
    assert out.shape == (m, n) and out.dtype == torch.bfloat16
    if m:
        ref = quant.reference(x.double(), wq, scale, bias.double(), fmt, act_quant, compute=torch.float64)
        assert rel_err(out, ref) < 1e-2


def test_fp8_quantization_error_against_bf16():
    """W8A8 block FP8 against the unquantized bf16 product: the error the format itself costs (~3%)."""
    x = torch.randn(256, 2048, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2048, 2048, device="cuda") / 2048 ** 0.5
    wq, scale = quant.quantize_weight(w, "fp8-block")
    out = quant.quant_matmul(x, wq, scale, None, "fp8-block", True)
    assert rel_err(out, x.double() @ w.double().t()) < 0.06
