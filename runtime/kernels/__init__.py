"""Kernel units: each module holds one fused kernel's template, its autotune configs, its launcher and its
plain-torch reference, named after what it computes."""

import torch

# The Triton spelling of each dtype the templates are rendered for.
TRITON_DTYPES = {torch.float16: "tl.float16", torch.bfloat16: "tl.bfloat16", torch.float32: "tl.float32"}


def size_hint(n) -> int:
    """A launcher's concrete choice (a path, a tile) for a size that may be symbolic: the traced example."""
    return int(n.node.hint) if isinstance(n, torch.SymInt) and n.node.hint is not None else int(n)


def loop_stages(cfg: dict) -> int:
    """The stage count of a kernel's ``tl.range`` K loop (its STAGES argument): the launch's ``num_stages``, or
    Triton's own default for CUDA launches (3) where the config names none, as a plain ``range`` loop had. The loops
    are ``tl.range`` loops so that loads not feeding the dot (FP8 scales, a norm weight, a mask) are pipelined too:
    a plain ``range`` pipelines only the dot's operands (tests/test_pipelined_loads.py)."""
    return cfg.get("num_stages", 3)
