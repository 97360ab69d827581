"""The generated RMSNorm kernels against a float64 reference: through Triton's interpreter on CPU (fp16/fp32),
natively on the GPU (bf16 too, marked gpu)."""
import pytest
import torch

from deepfuse.runtime.kernels import rms_norm as kernel
from conftest import TOL, rel_err


def _ref64(x, w, r, eps, cast_first, out_dtype):
    """float64 math with the model's roundings: h rounds to the input dtype, and so does the normalized row
    where the model casts before the weight."""
    h = (x.double() + r.double()).to(x.dtype) if r is not None else x
    hd = h.double()
    normed = hd * torch.rsqrt(hd.pow(2).mean(-1, keepdim=True) + eps)
    if cast_first:
        normed = normed.to(x.dtype).double()
    return (normed * w.double()), h


def _check(shape, dtype, residual, cast_first, device, interpret, w_dtype=None, noncontig=False):
    n = shape[-1]
    gen = torch.Generator(device="cpu").manual_seed(int(torch.randint(0, 2**31, ())))
    make = lambda *s: (torch.randn(*s, generator=gen) * 3).to(device=device, dtype=dtype)  # noqa: E731
    if noncontig:
        x = make(*shape[:-1], 2 * n)[..., ::2]
        assert x.numel() == 0 or not x.is_contiguous()
    else:
        x = make(*shape)
    r = make(*shape) if residual else None
    w = (torch.rand(n, generator=gen) + 0.5).to(device=device, dtype=w_dtype or dtype)
    out_dtype = torch.promote_types(w.dtype, dtype) if cast_first else torch.promote_types(w.dtype, torch.float32)
    y, h = kernel.launch(x, w, r, 1e-6, cast_first, out_dtype, interpret=interpret)
    ref_y, ref_h = _ref64(x, w, r, 1e-6, cast_first, out_dtype)
    assert y.shape == x.shape and y.dtype == out_dtype
    assert torch.isfinite(y).all()
    if x.numel():
        assert rel_err(y, ref_y) < TOL[dtype] * 2
        if residual:
            assert torch.equal(h, ref_h)  # the add is one rounding, exactly as eager does it
    # and against the plain torch reference the op falls back to
    ry, rh = kernel.reference(x, w, r, 1e-6, cast_first, out_dtype)
    if x.numel():
        assert rel_err(y, ry) < TOL[dtype] * 2


SHAPES = [(1, 64), (7, 96), (2, 3, 128), (0, 64), (5, 1)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("cast_first", [True, False])
def test_interpreted_kernel(shape, dtype, residual, cast_first):
    _check(shape, dtype, residual, cast_first, "cpu", interpret=True)


def test_interpreted_noncontiguous_and_mixed_weight_dtype():
    _check((4, 64), torch.float16, True, False, "cpu", interpret=True, w_dtype=torch.float32, noncontig=True)


def test_outputs_fully_written():
    """Poison the output allocation: every element the kernel owns must be overwritten."""
    x = torch.randn(9, 80, dtype=torch.float16)
    w = torch.rand(80, dtype=torch.float16)
    orig_empty, orig_empty_like = torch.empty, torch.empty_like
    torch.empty = lambda *a, **k: orig_empty(*a, **k).fill_(float("nan"))
    torch.empty_like = lambda *a, **k: orig_empty_like(*a, **k).fill_(float("nan"))
    try:
        y, h = kernel.launch(x, w, x.clone(), 1e-6, True, torch.float16, interpret=True)
    finally:
        torch.empty, torch.empty_like = orig_empty, orig_empty_like
    assert torch.isfinite(y).all() and torch.isfinite(h).all()


def test_bad_weight_shape_is_a_clear_error():
    with pytest.raises(ValueError, match="weight shape"):
        kernel.launch(torch.randn(2, 8), torch.ones(9), None, 1e-6, True, torch.float32, interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 2048), (4096, 2048), (33, 7168), (0, 512), (3, 5, 1536)], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("residual", [False, True])
def test_gpu_kernel(shape, dtype, residual):
    _check(shape, dtype, residual, True, "cuda", interpret=False)
    _check(shape, dtype, residual, False, "cuda", interpret=False, noncontig=True)
