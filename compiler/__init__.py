"""deepfuse: a torch.compile backend that rewrites DeepSeek-style patterns into generated Triton kernels.

    model = torch.compile(model, backend="deepfuse")           # after `pip install`, no import needed
    report = deepfuse.explain(model, *example_inputs)           # what matched, what was declined, and why
"""
__version__ = "0.1.0"

import os as _os
import sys as _sys


def _enable_interpreter_without_cuda() -> None:
    # Triton's interpreter (options={"interpret": True}) only works if TRITON_INTERPRET=1 is set before
    # triton.language is imported: its reductions are @triton.jit functions themselves. Without CUDA no
    # compiled Triton kernel can run anyway, so turning it on process-wide is free.
    if "triton" in _sys.modules or "TRITON_INTERPRET" in _os.environ:
        return
    import torch

    if not torch.cuda.is_available():
        _os.environ["TRITON_INTERPRET"] = "1"


_enable_interpreter_without_cuda()

from .errors import DeepfuseError  # noqa: E402
from .options import Options  # noqa: E402


def explain(model, *example_inputs, **options):
    """See :func:`deepfuse.explainer.explain`: the report of what deepfuse matches in ``model``."""
    from .explainer import explain as _explain

    return _explain(model, *example_inputs, **options)


def __getattr__(name):  # keep `import deepfuse` light: torch/Inductor machinery loads on first use
    if name == "deepfuse_backend":
        from .backend import deepfuse_backend

        return deepfuse_backend
    if name == "collect":
        from .pipeline import collect

        return collect
    if name == "Report":
        from .report import Report

        return Report
    raise AttributeError(f"module 'deepfuse' has no attribute {name!r}")


__all__ = ["DeepfuseError", "Options", "explain", "deepfuse_backend", "collect", "Report", "__version__"]
