"""Fused RMSNorm, optionally preceded by the residual add: h = x + r; y = w * (h / rms(h)).

Designed against the memory floor: one program per row reads x (and r) once and writes y (and h) once, so
the kernel moves (2 or 4) * N * itemsize bytes per row and nothing else; the whole row lives in registers
(BLOCK_N = next power of two of N), which is what makes the single pass possible.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton

from deepfuse.codegen import KernelTemplate, cache_dir, generate, memo
from deepfuse.runtime.kernels import TRITON_DTYPES
from deepfuse.runtime import autotune

TEMPLATE = KernelTemplate(
    "rms_norm",
    '''
import triton
import triton.language as tl


@triton.jit
def ${kernel_name}(
    X, R, W, Y, H,
    stride_x, stride_r, stride_y, stride_h,
    N, eps,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    # the weight loaded before the reduction: compiled for sm_90a its loads then issue during the row's
    # reduction, where written after it they issued behind both of its barriers, a second memory round trip at
    # one row (a decode step), where the kernel is all latency
    w = tl.load(W + cols, mask=mask, other=0.0)
    ${prologue}
    xf = x.to(tl.float32)
    # mean of squares over the true N (masked lanes contribute 0), accumulated in fp32
    variance = tl.sum(xf * xf, axis=0) / N
    normed = xf * tl.rsqrt(variance + eps)
    ${epilogue}
    tl.store(Y + row * stride_y + cols, y.to(${out_dtype}), mask=mask)
''',
)

# The residual add rounds to the input dtype before normalizing, exactly as eager `residual + x` does.
_PROLOGUE_RESIDUAL = """\
r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
x = (x.to(tl.float32) + r.to(tl.float32)).to(${in_dtype})
tl.store(H + row * stride_h + cols, x, mask=mask)"""
_PROLOGUE_NONE = "# no residual add in this specialization"

# HF/DeepSeek order: round the normalized row to the input dtype, then scale by the weight.
_EPILOGUE_CAST_FIRST = "y = w.to(tl.float32) * normed.to(${in_dtype}).to(tl.float32)"
_EPILOGUE_FP32 = "y = normed * w.to(tl.float32)"

CONFIGS = [{"num_warps": w} for w in (4, 1, 2, 8, 16)]



def _block(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


_generated = memo()


def kernel_for(n: int, in_dtype, w_dtype, out_dtype, residual: bool, cast_first: bool, origin: str = ""):
    """The generated kernel module for this specialization and its kernel's name (memoized: launches stay
    cheap; ``origin`` only labels the file the first time it is written)."""
    key = (int(n), in_dtype, w_dtype, out_dtype, residual, cast_first)
    where = str(cache_dir())
    if (where, key) not in _generated:
        _generated[where, key] = _generate(*key, origin)
    return _generated[where, key]


def _generate(n, in_dtype, w_dtype, out_dtype, residual, cast_first, origin):
    spec = {
        "hidden": int(n),
        "in_dtype": str(in_dtype),
        "weight_dtype": str(w_dtype),
        "out_dtype": str(out_dtype),
        "residual_add": residual,
        "cast_before_weight": cast_first,
    }
    name = "add_rms_norm" if residual else "rms_norm"
    in_tl = TRITON_DTYPES[in_dtype]
    slots = {
        "kernel_name": f"{name}_kernel",
        "prologue": (_PROLOGUE_RESIDUAL if residual else _PROLOGUE_NONE).replace("${in_dtype}", in_tl),
        "epilogue": (_EPILOGUE_CAST_FIRST if cast_first else _EPILOGUE_FP32).replace("${in_dtype}", in_tl),
        "out_dtype": TRITON_DTYPES[out_dtype],
    }
    header = (
        f"Pattern family: rms_norm{' (with the residual add fused in front)' if residual else ''}.\n"
        f"Computes: {'h = x + r; ' if residual else ''}y = w * normalize(h) with normalize = h * rsqrt(mean(h^2) + eps),\n"
        f"one program per row, the whole row ({_block(n)} lanes) in registers.\n"
        + (f"First generated for: {origin}" if origin else "")
    )
    return generate(TEMPLATE, spec, slots, header), f"{name}_kernel"


def _check(x, weight, residual, out_dtype):
    n = x.shape[-1]
    if tuple(weight.shape) != (n,):
        raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} does not match hidden size {n}")
    if x.dtype not in TRITON_DTYPES or weight.dtype not in TRITON_DTYPES or out_dtype not in TRITON_DTYPES:
        raise TypeError(f"rms_norm: unsupported dtypes x={x.dtype} weight={weight.dtype} out={out_dtype}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError("rms_norm: residual must have the input's shape and dtype")


def launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    residual: Optional[torch.Tensor],
    eps: float,
    cast_first: bool,
    out_dtype: torch.dtype,
    interpret: bool = False,
    config: Optional[dict] = None,
    origin: str = "",
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Allocate the outputs and launch the kernel. Traceable: under make_fx the launch becomes Inductor's
    user-defined-Triton-kernel node (``wrap_triton``), which is how compiled graphs call it with Inductor's
    own launcher. ``config`` None: autotune now (eager, real tensors)."""
    _check(x, weight, residual, out_dtype)
    n = x.shape[-1]
    x2 = _rows(x, n)
    r2 = _rows(residual, n) if residual is not None else None
    weight = weight.contiguous()
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=out_dtype, device=x.device)
    h = torch.empty((m, n), dtype=x.dtype, device=x.device) if r2 is not None else None
    gen, name = kernel_for(n, x.dtype, weight.dtype, out_dtype, r2 is not None, cast_first, origin)
    fn = gen.function(name, interpret=interpret)
    if not interpret:
        fn = torch.library.wrap_triton(fn)
    args = (
        x2, r2 if r2 is not None else x2, weight, y, h if h is not None else y,
        x2.stride(0), r2.stride(0) if r2 is not None else 0, y.stride(0), h.stride(0) if h is not None else 0,
        n, eps,
    )

    def run(cfg):
        fn[(m,)](*args, BLOCK_N=_block(n), **({} if interpret else cfg))

    if not (isinstance(m, int) and m == 0):
        if config is None:
            config = autotune.choose(gen.key, m, CONFIGS, run, x.device, enabled=not interpret)
        run(config)
    out_shape = x.shape[:-1] + (n,)
    return y.view(out_shape), (h.view(out_shape) if h is not None else None)


def tune(shape, in_dtype, w_dtype, out_dtype, residual: bool, cast_first: bool, device, origin: str = "") -> dict:
    """The autotuned config for this specialization at ``shape`` (compile time, on real random tensors)."""
    x = torch.randn(shape, dtype=in_dtype, device=device)
    w = torch.rand(shape[-1], dtype=w_dtype, device=device)
    r = torch.randn(shape, dtype=in_dtype, device=device) if residual else None
    gen, _ = kernel_for(shape[-1], in_dtype, w_dtype, out_dtype, residual, cast_first, origin)
    m = x.numel() // shape[-1]
    if m == 0:
        return CONFIGS[0]
    return autotune.choose(gen.key, m, CONFIGS, lambda cfg: launch(x, w, r, 1e-6, cast_first, out_dtype, config=cfg),
                           torch.device(device))


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    residual: Optional[torch.Tensor],
    eps: float,
    cast_first: bool,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The same computation in plain torch, op for op as the models write it."""
    h = x + residual if residual is not None else x
    hf = h.float()
    normed = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * normed.to(h.dtype) if cast_first else normed * weight
    return y.to(out_dtype), (h if residual is not None else None)
