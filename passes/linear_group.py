"""Decode-sized projections of one input, in one launch: the matmuls of a decode step that read the same
activation (V2-Lite's q_proj and kv_a_proj_with_mqa, V3's q_a_proj and kv_a_proj_with_mqa, a dense MLP's
gate_proj and up_proj), fused horizontally.

At a few rows each of them is bandwidth-bound and short, so much of its time is the launch and the ramp up to
full bandwidth; one launch over all of the weights pays those once (``deepfuse.runtime.kernels.linear_group``).
The pass:
1. groups the ``mm`` nodes with a static row count of at most ``MAX_M`` whose data operand is one value (the same
   node, or the same view of one node) and whose other operand is a weight the model holds: a graph input
   [N, K], contiguous, in the activation's dtype, seen through a transpose (``deepfuse.passes.linear``'s test);
   up to ``MAX_GROUPS`` weights a launch, in graph order;
2. on a GPU, times the kernel's tiles against the graph's own matmuls one after another (cuBLAS), on tensors of
   the real shapes replayed as CUDA graphs over weight copies past the L2, and keeps the matmuls where they are
   faster (the choice is cached per GPU and shapes like any autotune result; explain gives the reason);
3. rewrites each group it takes into one ``deepfuse::linear_group``, whose outputs replace the matmuls'; when
   their input is an RMSNorm's output that nothing else reads (a decoder layer's input_layernorm before q_proj and
   kv_a_proj), the norm joins the launch: its kernel computes the squares' sum beside the dot and scales the
   accumulator by the row's rsqrt, so the norm's launch and its output's round trip are gone. Opt-in
   (``DEEPFUSE_LINEAR_GROUP_NORM=1``): on H100 the launch with the norm took 17-18 us a layer against 9.2 for the
   group and 1.5 for the norm's own kernel (bench/RESULTS.md), the x tile's trip through registers (times the
   norm weight, then back into the dot's layout) in every K step being the likely cost.
Without a GPU there is nothing to time: there it rewrites only when ``options["passes"]`` names it (to run the
kernel through Triton's interpreter), and otherwise leaves the graph as it is (the debug log says so).
It runs after the families that fuse matmuls of their own (a shared MLP in the MoE launches), before ``rms_norm``
(which takes the norms it leaves) and before ``linear``, which takes what is left one matmul at a time.
"""
from __future__ import annotations

import os
from typing import Optional, Union

import torch
import torch.fx as fx

from deepfuse.fusion import RegionBinding, escape_reason, replace_region_first_traced
from deepfuse.log import log
from deepfuse.options import Options
from deepfuse.passes.linear import CUBLAS, FLOATS, stored_weight
from deepfuse.passes.rms_norm import RMSNormPass, rms_pattern
from deepfuse.pattern import HostGraph
from deepfuse.report import Declined, Match, Report, module_path, source_line
from deepfuse.runtime import autotune
from deepfuse.runtime import ops  # noqa: F401  (registers torch.ops.deepfuse.*)
from deepfuse.runtime.kernels import linear_group as kernel
from deepfuse.shapes import value

aten = torch.ops.aten
VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}


def fold_norms() -> bool:
    """Whether an input RMSNorm joins the group's launch (see the module's docstring): opt-in, slower where timed."""
    return os.environ.get("DEEPFUSE_LINEAR_GROUP_NORM") == "1"


class LinearGroupPass:
    family = "linear_group"

    def run(self, graph: fx.Graph, options: Options, report: Report) -> int:
        groups = _groups(graph)
        if not groups:
            return 0
        device = value(groups[0][0]["mm"]).device.type
        impl = options.kernel_impl(device)
        named = options.passes is not None and self.family in options.passes
        if impl != "triton" and not named:
            log.debug("linear_group: %d group(s) of projections left as they are: on %s there is no timing to "
                      "choose by (name the family in options['passes'] to rewrite them anyway)", len(groups), device)
            return 0
        changed = 0
        norms = _norm_outputs(graph, options) if fold_norms() else {}
        for group in groups:
            first = group[0]["mm"]
            where = (source_line(first), module_path(first))
            config = _tuned(group) if impl == "triton" and options.inline else None
            if config is CUBLAS:  # the graph's own matmuls timed faster
                reason = (f"cuBLAS timed faster, one matmul after another, than one launch over the "
                          f"{len(group)} weights at this shape on this GPU")
                report.declined.append(Declined(self.family, reason, *where))
                log.info("declined linear_group at %s (%s): %s", where[1] or "?", where[0], reason)
                continue
            norm = _foldable_norm(group, norms)
            if isinstance(norm, str):
                log.debug("linear_group at %s: the input's RMSNorm stays apart: %s", where[1] or "?", norm)
                norm = None
            kernel_file = _rewrite(graph, group, impl, options.inline, config, f"{where[1] or '?'} ({where[0]})",
                                   norm)
            if kernel_file is False:
                reason = "the rewrite could not be traced into the graph (see the warning)"
                report.declined.append(Declined(self.family, reason, *where))
                continue
            ws = [value(m["w"]) for m in group]
            shown = {"rows": value(first).shape[0], "in_features": ws[0].shape[1],
                     "out_features": [w.shape[0] for w in ws], "dtype": str(ws[0].dtype).replace("torch.", ""),
                     "projections": [module_path(m["mm"]) or m["mm"].name for m in group],
                     **({"rms_norm": f"in the launch (eps={norm['eps']})"} if norm else {})}
            report.matches.append(Match(self.family, "deepfuse::linear_group", shown, *where, impl=impl,
                                        kernel_file=kernel_file))
            log.info("matched linear_group -> deepfuse::linear_group [%s] at %s (%s) %s", impl, where[1] or "?",
                     where[0], shown)
            changed += 1
        return changed


def _operands(mm: fx.Node) -> Optional[dict]:
    """x and the weight leaf w [N, K] of a decode-sized ``mm`` this pass can group, with the transpose only it
    uses; None for any other matmul."""
    if mm.target != aten.mm.default or mm.kwargs:
        return None
    x, w_t = mm.args
    out, xv = value(mm), value(x)
    if out is None or xv is None or xv.dim() != 2 or out.dtype not in FLOATS:
        return None
    rows = out.shape[0]
    if not isinstance(rows, int) or not 0 < rows <= kernel.MAX_M:
        return None  # a symbolic row count may be large at run time; prefill sizes are compute-bound
    stored = stored_weight(w_t)
    if stored is None or stored[1] is not None:
        return None  # a weight cast on the way (a router in fp32) stays with the single-matmul pass
    w, _, weight_nodes = stored
    wv = value(w)
    if wv.dtype != xv.dtype or not wv.is_contiguous() or wv.device != xv.device:
        return None
    return {"mm": mm, "x": x, "w": w, "interior": [mm] + weight_nodes}


def _input_key(x: fx.Node):
    """Equal for data operands that hold the same values: one node, or the same view of one node."""
    if x.op == "call_function" and x.target in VIEWS and isinstance(x.args[0], fx.Node):
        return ("view", x.args[0], tuple(value(x).shape))
    return ("node", x)


def _groups(graph: fx.Graph) -> list[list[dict]]:
    """Matmuls sharing their data operand, in graph order, cut into launches of at most ``MAX_GROUPS``; a matmul
    left alone by the cut stays out (nothing to fuse it with)."""
    by_input: dict = {}
    for node in graph.nodes:
        found = _operands(node)
        if found is not None:
            by_input.setdefault(_input_key(found["x"]), []).append(found)
    out = []
    for members in by_input.values():
        for i in range(0, len(members), kernel.MAX_GROUPS):
            chunk = members[i:i + kernel.MAX_GROUPS]
            if len(chunk) > 1:
                out.append(chunk)
    return out


def _norm_outputs(graph: fx.Graph, options: Options) -> dict:
    """Each plain RMSNorm's output node (no residual add) -> its binding, as the rms_norm pass would match it."""
    norm_pass = RMSNormPass()
    norm_pass.options = options
    found = {}
    for binding in rms_pattern(residual=False).match(HostGraph(graph), set()):
        reason = escape_reason(binding.interior, binding.outputs)
        found[binding.outputs[0]] = (binding, reason or norm_pass.analyze(binding))
    return found


def _foldable_norm(group: list[dict], norms: dict) -> Union[dict, str, None]:
    """The RMSNorm the group's input is the output of, when the launch can take it in (its input, weight, eps and
    interior nodes), or why not; None when the input is no norm's output."""
    x = group[0]["x"]
    out = x.args[0] if x.op == "call_function" and x.target in VIEWS else x
    if out not in norms:
        return None
    binding, params = norms[out]
    if isinstance(params, str):
        return params
    if params["residual_add"]:
        return "its residual add writes the next residual too"
    h, xv, wv = value(binding["h"]), value(x), value(group[0]["w"])
    if not (h.dtype == value(out).dtype == wv.dtype):
        return f"the norm reads {h.dtype} and writes {value(out).dtype}: the launch reads and multiplies in {wv.dtype}"
    if wv.dtype == torch.float16:
        return "in fp16 the un-normalized x * norm weight the launch multiplies could pass fp16's range"
    if xv.shape[-1] != h.shape[-1]:
        return "the projections read the norm's output reshaped along the normalized dim"
    mms = {m["mm"] for m in group}
    views = [u for u in out.users if u.op == "call_function" and u.target in VIEWS]
    if any(u not in mms and u not in views for u in out.users) or any(set(v.users) - mms for v in views):
        return "the normalized values are read outside the projections"
    if any(m["mm"].args[0] is not out and m["mm"].args[0] not in views for m in group):
        return "the projections read the norm's output through different views"
    return {"h": binding["h"], "w": binding["w"], "eps": params["eps"], "interior": binding.interior + views}


def _tuned(group: list[dict]) -> dict:
    """The fastest of the kernel's tiles and the graph's own matmuls (``CUBLAS``) at these shapes, timed on random
    tensors of the real shapes and dtypes (compile time; cached per GPU)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    xv = value(group[0]["x"])
    wvs = [value(m["w"]) for m in group]
    with unset_fake_temporarily():
        device = torch.device(xv.device)

        @autotune.once
        def inputs():  # made only if the choice is timed
            total = sum(w.numel() for w in wvs)
            stacked = autotune.cold_copies(torch.empty(total, dtype=xv.dtype, device="meta"), device, cap=16)
            return torch.randn(tuple(xv.shape), dtype=xv.dtype, device=device), [
                [part.view(tuple(w.shape)) for part, w in zip(torch.split(s, [w.numel() for w in wvs]), wvs)]
                for s in stacked]

        def run(cfg):
            x, sets = inputs()
            for ws in sets:
                if cfg is CUBLAS:
                    for w in ws:
                        torch.mm(x, w.t())
                else:
                    kernel.linear_group(x, ws, config=cfg)

        key = f"linear_group|{'+'.join(str(w.shape[0]) for w in wvs)}x{wvs[0].shape[1]}|{xv.dtype}"
        return autotune.choose(key, xv.shape[0], kernel.CONFIGS + [CUBLAS], run, device)


def _rewrite(graph, group, impl, inline, config, origin, norm=None) -> Union[str, None, bool]:
    """The kernel file (None for the reference), or False if neither form could be traced in. With ``norm``
    (``_foldable_norm``'s), the launch reads the norm's input and weight, and the norm's nodes are the region's."""
    x = group[0]["x"]
    interior = [n for m in group for n in m["interior"]]
    gen = kernel.kernels_for(value(x).dtype, origin) if impl != "reference" else None
    if norm is None:
        args, eps, rows = (x, *(m["w"] for m in group)), 0.0, None
    else:  # the norm's input as the projections' rows (its last dim is the one normalized)
        args, eps, rows = (norm["h"], norm["w"], *(m["w"] for m in group)), norm["eps"], tuple(value(x).shape)
        interior += norm["interior"]

    def split(x, rest):  # (the projections' rows, the norm weight or None, the weights)
        return (x, None, rest) if rows is None else (x.reshape(rows), rest[0], rest[1:])

    def via_kernel(x, *rest):
        x, g, ws = split(x, rest)
        return tuple(kernel.linear_group(x, list(ws), config=config, origin=origin, norm_weight=g, eps=eps))

    def via_op(x, *rest):
        x, g, ws = split(x, rest)
        return tuple(torch.ops.deepfuse.linear_group(x, list(ws), impl, g, eps, []))

    launchers = ([via_kernel] if impl == "triton" and inline else []) + [via_op]
    binding = RegionBinding(interior, [m["mm"] for m in group])
    if not replace_region_first_traced(graph, binding, launchers, args, "projections of one input"):
        return False
    return str(gen.path) if gen is not None else None
