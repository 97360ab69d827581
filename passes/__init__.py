"""One module per pattern family: its patterns, the parameters it reads off the graph, its rewrite.

``PASSES`` lists them in the order they run: later families see the graph earlier ones rewrote. Those in
``OPT_IN`` run only when ``options["passes"]`` names them.
"""
from __future__ import annotations

from deepfuse.passes.linear import DecodeLinearPass
from deepfuse.passes.linear_group import LinearGroupPass
from deepfuse.passes.mla import MLAPass
from deepfuse.passes.moe import MoEPass
from deepfuse.passes.quant import QuantPass
from deepfuse.passes.rms_norm import RMSNormPass

PASSES = {
    "moe": MoEPass,
    "mla": MLAPass,
    "quant": QuantPass,
    "linear_group": LinearGroupPass,  # after the families that fuse matmuls of their own; takes in a norm before them
    "rms_norm": RMSNormPass,
    "linear": DecodeLinearPass,  # last: the matmuls other families fuse are theirs
}

# Families that run only when options["passes"] names them. linear: on H200 its kernel was no faster than cuBLAS
# at V2-Lite's decode projections, and compiling the 27-layer decode step took 37.7 s against 28.5 (bench/RESULTS.md).
OPT_IN = frozenset({"linear"})
