"""Kernel units: each module holds one fused kernel's template, its autotune configs, its launcher and its
plain-torch reference, named after what it computes."""

import torch

# The Triton spelling of each dtype the templates are rendered for.
TRITON_DTYPES = {torch.float16: "tl.float16", torch.bfloat16: "tl.bfloat16", torch.float32: "tl.float32"}


def size_hint(n) -> int:
    """A launcher's concrete choice (a path, a tile) for a size that may be symbolic: the traced example."""
    return int(n.node.hint) if isinstance(n, torch.SymInt) and n.node.hint is not None else int(n)
