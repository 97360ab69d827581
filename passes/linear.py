"""Decode-sized matmuls over a model's float weights: a generated split-K kernel where it beats cuBLAS.

A decode step's projections (q, kv_a, o, a dense MLP, the router) multiply a few rows by a weight the model
holds: bandwidth-bound, every weight byte read once per step, and cuBLAS's small-M kernels stream them at about
a third of an H200's HBM bandwidth (bench/RESULTS.md). The pass:
1. anchors at each ``mm``/``addmm`` with a static row count of at most ``DECODE_MAX_M``;
2. takes its weight operand when that is a graph input (a parameter) [N, K] seen through a transpose, and
   optionally one dtype cast (a bf16 router weight multiplied in fp32): the kernel reads the weight as stored
   and widens it in registers, so the cast copy is never made;
3. on a GPU, times the kernel's tiles against the graph's own form (the cast, if any, and cuBLAS) on tensors of
   the real shapes, each replayed as a CUDA graph, and leaves the matmul alone where cuBLAS is faster (the
   choice is cached per GPU and shape like any autotune result, and explain gives the reason);
4. rewrites the rest into ``deepfuse::decode_linear``.
It runs after the other families, so the matmuls they fuse (a shared MLP in the MoE launches) stay theirs.

Opt-in (``options={"passes": [..., "linear"]}``): measured on H200 in the 27-layer V2-Lite decode step, the
kernel took as long as cuBLAS at the q, kv_a and o projections (17.5 against 17.2 us per layer, its split-K
partial sums two launches more), and compiling the step took 37.7 s against 28.5 (bench/RESULTS.md).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.fx as fx

from deepfuse.fusion import RegionBinding, replace_region_first_traced
from deepfuse.log import log
from deepfuse.options import Options
from deepfuse.report import Declined, Match, Report, module_path, source_line
from deepfuse.runtime import autotune
from deepfuse.runtime import ops  # noqa: F401  (registers torch.ops.deepfuse.*)
from deepfuse.runtime.kernels import quant as kernel
from deepfuse.shapes import value

aten = torch.ops.aten
FLOATS = (torch.float16, torch.bfloat16, torch.float32)
CUBLAS = {"CUBLAS": True}  # the autotune candidate that keeps the graph's matmul


class DecodeLinearPass:
    family = "linear"

    def run(self, graph: fx.Graph, options: Options, report: Report) -> int:
        changed = 0
        for mm in [n for n in graph.nodes if n.target in (aten.mm.default, aten.addmm.default)]:
            found = _operands(mm)
            if found is None:
                continue  # not a decode-sized matmul over a weight the model holds: nothing to say
            where = (source_line(mm), module_path(mm))
            impl = options.kernel_impl(value(mm).device.type)
            config = _tuned(mm, found) if impl == "triton" and options.inline else None
            if config is CUBLAS:
                reason = "cuBLAS timed faster than the decode kernel's tiles at this shape on this GPU"
                report.declined.append(Declined(self.family, reason, *where))
                log.info("declined linear at %s (%s): %s", where[1] or "?", where[0], reason)
                continue
            kernel_file = _rewrite(graph, mm, found, impl, options.inline, config,
                                   f"{where[1] or '?'} ({where[0]})")
            if kernel_file is False:
                reason = "the rewrite could not be traced into the graph (see the warning)"
                report.declined.append(Declined(self.family, reason, *where))
                continue
            w = value(found["w"])
            shown = {"rows": value(mm).shape[0], "out_features": w.shape[0], "in_features": w.shape[1],
                     "weight_dtype": str(w.dtype).replace("torch.", ""),
                     "dtype": str(value(mm).dtype).replace("torch.", ""), "bias": found["bias"] is not None,
                     "weight_cast_fused": found["cast"] is not None}
            report.matches.append(Match(self.family, "deepfuse::decode_linear", shown, *where, impl=impl,
                                        kernel_file=kernel_file))
            log.info("matched linear -> deepfuse::decode_linear [%s] at %s (%s) %s", impl, where[1] or "?",
                     where[0], shown)
            changed += 1
        return changed


def _operands(mm: fx.Node) -> Optional[dict]:
    """x, the weight leaf w [N, K] (with the transpose and the cast between it and the matmul) and the bias,
    or None when the matmul is not one this pass takes."""
    if mm.kwargs:  # addmm's alpha / beta
        return None
    bias, x, w_t = (mm.args if mm.target == aten.addmm.default else (None, *mm.args))
    out, xv, wtv = value(mm), value(x), value(w_t)
    if out is None or xv is None or wtv is None or xv.dim() != 2 or out.dtype not in FLOATS:
        return None
    rows = out.shape[0]
    if not isinstance(rows, int) or not 0 < rows <= kernel.DECODE_MAX_M:
        return None  # a symbolic row count may be large at run time; prefill sizes are compute-bound
    if bias is not None and (value(bias) is None or value(bias).dim() != 1):
        return None
    stored = stored_weight(w_t)
    if stored is None:
        return None
    w, cast, weight_nodes = stored
    return {"x": x, "w": w, "bias": bias, "cast": cast, "interior": [mm] + weight_nodes}


def stored_weight(w_t: fx.Node) -> Optional[tuple[fx.Node, Optional[fx.Node], list[fx.Node]]]:
    """A matmul's [K, N] operand seen as a weight the model holds: (the graph input w [N, K], the dtype cast
    between them or None, the transpose and cast nodes only the matmul uses), or None if it is anything else."""
    transposed = (w_t.target == aten.t.default
                  or (w_t.target == aten.permute.default and list(w_t.args[1]) == [1, 0])
                  or (w_t.target == aten.transpose.int and sorted(a % 2 for a in w_t.args[1:3]) == [0, 1]))
    if not transposed:
        return None
    w, cast = w_t.args[0], None
    if is_plain_cast(w):
        w, cast = w.args[0], w
    wv = value(w)
    if w.op not in ("placeholder", "get_attr") or wv is None or wv.dim() != 2 or wv.dtype not in FLOATS:
        return None
    nodes = []
    if len(w_t.users) == 1:
        nodes.append(w_t)
        if cast is not None and all(u is w_t for u in cast.users):
            nodes.append(cast)
    return w, cast, nodes


def is_plain_cast(node: fx.Node) -> bool:
    """A dtype conversion and nothing else (no device move, no layout change)."""
    if node.target == aten._to_copy.default:
        return set(node.kwargs) <= {"dtype"} and len(node.args) == 1
    return node.target == torch.ops.prims.convert_element_type.default and len(node.args) == 2


def _tuned(mm: fx.Node, found: dict) -> dict:
    """The fastest of the kernel's decode tiles and the graph's own form (``CUBLAS``) at this shape, timed on
    random tensors of the real shapes, strides and dtypes (compile time; cached per GPU)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    xv, wv = value(found["x"]), value(found["w"])
    bv = value(found["bias"]) if found["bias"] is not None else None
    with unset_fake_temporarily():
        device = torch.device(xv.device)

        @autotune.once
        def inputs():  # made only if the choice is timed
            return (torch.randn(tuple(xv.shape), dtype=xv.dtype, device=device),
                    autotune.cold_copies(wv, device, cap=16),  # a 12.6 MB q_proj fits an H200's 60 MB L2 4 times
                    torch.randn(tuple(bv.shape), dtype=bv.dtype, device=device) if bv is not None else None)

        def run(cfg):
            x, ws, bias = inputs()
            for w in ws:
                if cfg is CUBLAS:
                    w_t = w.to(x.dtype).t()
                    torch.mm(x, w_t) if bias is None else torch.addmm(bias, x, w_t)
                else:
                    kernel.decode_linear(x, w, bias, config=cfg)

        key = (f"decode_linear|{wv.shape[0]}x{wv.shape[1]}|{wv.dtype}->{xv.dtype}"
               + ("|bias" if bv is not None else ""))
        return autotune.choose(key, xv.shape[0], kernel.DENSE_DECODE_CONFIGS + [CUBLAS], run, device)


def _rewrite(graph, mm, found, impl, inline, config, origin) -> Union[str, None, bool]:
    """The kernel file (None for the reference), or False if neither form could be traced in."""
    x_src, w_src, bias = found["x"], found["w"], found["bias"]
    args = (x_src, w_src) + ((bias,) if bias is not None else ())
    gen = kernel.kernels_for("dense", value(x_src).dtype, origin)[0] if impl != "reference" else None

    def via_kernel(x, w, b=None):
        return (kernel.decode_linear(x, w, b, config=config, origin=origin),)

    def via_op(x, w, b=None):
        return (torch.ops.deepfuse.decode_linear(x, w, b, impl),)

    launchers = ([via_kernel] if impl == "triton" and inline else []) + [via_op]
    if not replace_region_first_traced(graph, RegionBinding(found["interior"], mm), launchers, args,
                                       "decode-sized matmul"):
        return False
    return str(gen.path) if gen is not None else None
