"""Quantized matmuls: a matmul whose weight the graph dequantizes from a quantized tensor, found by what it computes.

Models write weight dequantization many ways (a cast and a broadcast multiply, ``repeat_interleave`` of the scale
grid, a reshape into [N/128, 128, K/128, 128] blocks, a ``weight_dequant`` helper); all of them lower to a
subgraph whose only tensor inputs are a quantized tensor q (float8_e4m3fn or int8) and a float32 scale tensor s.
So the pass:
1. anchors at each ``mm``/``addmm``;
2. takes the weight operand's ancestry; it must reach exactly one quantized tensor and one fp32 scale tensor
   (parameters, buffers or constants) and nothing that varies per call;
3. on the activation side, looks for a quantize-dequantize of an activation (a cast to float8 in its ancestry);
4. runs both subgraphs on random values against ``dequant(q, s)`` for each format and block size that fits
   the shapes (fp8 in blocks of [bn, bk], int8 per output channel), and the activation subgraph against the
   per-token, per-bk-tile quantization;
5. rewrites a matmul that matches into ``deepfuse::quant_matmul`` (FP8 x FP8 when the activations are
   quantized, weight-only otherwise) and declines, with the reason, one whose weight comes from a quantized
   tensor but matches no format. A matmul of a float weight gets no row.
The dequantized weight is no longer computed (unless something else reads it): the kernel reads q and s.

Decode-sized FP8 W8A8 layers (128 x 128 blocks, at most ``linear_group.MAX_M`` rows, no bias) that quantize the
same activation (a decode step's q_proj and kv_a_proj, a dense MLP's gate and up) may run as one
``deepfuse::linear_group`` launch over their FP8 weights instead, up to four a launch, a layer alone too: on a GPU
each such group is timed at compile time against its quant_matmuls one after another and kept only where it is
faster (``explain`` shows a ``linear_group`` row for it); off the GPU only when ``options["passes"]`` names
``linear_group``, and never when the ``linear_group`` family is off. Past decode sizes (a static row count), the
W8A8 layers that quantize one activation run as one ``deepfuse::quant_matmuls``: its quantization launched once for
all of them.
"""
from __future__ import annotations

import itertools
from typing import Any, Optional, Union

import torch
import torch.fx as fx
import triton

from deepfuse.fusion import (RegionBinding, ancestors, checked_once, region_key, region_module, rel_err,
                             replace_region_first_traced)
from deepfuse.log import log
from deepfuse.options import Options
from deepfuse.report import Declined, Match, Report, module_path, source_line
from deepfuse.runtime import ops  # noqa: F401  (registers torch.ops.deepfuse.*)
from deepfuse.runtime import autotune
from deepfuse.runtime.kernels import linear_group
from deepfuse.runtime.kernels import quant as kernel
from deepfuse.shapes import hint, value

aten = torch.ops.aten
QUANTIZED = (torch.float8_e4m3fn, torch.int8)
FLOATS = (torch.float16, torch.bfloat16, torch.float32)
BOUNDARIES = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten._grouped_mm.default}
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


class QuantPass:
    family = "quant"

    def run(self, graph: fx.Graph, options: Options, report: Report) -> int:
        matched, checked = [], {}  # checked: region key -> what running it found (_verify)
        for mm in [n for n in graph.nodes if n.target in (aten.mm.default, aten.addmm.default)]:
            found = weight_side(mm)
            if found is None:
                continue  # a float weight: not a quantized matmul, nothing to say
            where = (source_line(mm), module_path(mm))
            params = found if isinstance(found, str) else _verify(mm, found, checked)
            if isinstance(params, str):
                report.declined.append(Declined(self.family, params, *where))
                log.info("declined quant at %s (%s): %s", where[1] or "?", where[0], params)
                continue
            matched.append((mm, found, params))
        changed, grouped = _fp8_groups(graph, matched, options, report)
        shared, taken = _shared_quantization(graph, [m for m in matched if m[0] not in grouped], options, report)
        changed, grouped = changed + shared, grouped | taken
        for mm, found, params in matched:
            if mm in grouped:
                continue
            where = (source_line(mm), module_path(mm))
            impl = options.kernel_impl(value(mm).device.type)
            kernel_file = _rewrite(graph, mm, found, params, impl, options.inline, f"{where[1] or '?'} ({where[0]})")
            if kernel_file is False:
                reason = "the rewrite could not be traced into the graph (see the warning)"
                report.declined.append(Declined(self.family, reason, *where))
                continue
            shown = {k: v for k, v in params.items() if not k.startswith("_")}
            report.matches.append(Match(self.family, "deepfuse::quant_matmul", shown, *where, impl=impl,
                                        kernel_file=kernel_file))
            log.info("matched quant -> deepfuse::quant_matmul [%s] at %s (%s) %s", impl, where[1] or "?", where[0],
                     shown)
            changed += 1
        return changed


# -- FP8 layers of one activation in one launch ----------------------------------------------------------------

QUANT_MATMULS = {"QUANT_MATMUL": True}  # the autotune candidate that keeps the layers as quant_matmuls


def _groupable(mm: fx.Node, found: dict, params: dict) -> bool:
    """A layer the FP8 linear_group launch computes: W8A8 in 128 x 128 blocks, its weight stored [N, K] contiguous
    with its [N/128, K/128] scales, no bias, a static row count of at most MAX_M, the output in x's dtype."""
    if (params["format"] != "fp8-block" or not params["act_quant"] or tuple(params["_block"]) != (128, 128)
            or params["_transposed"] or params["_bias"] is not None):
        return False
    out, xv, qv, sv = value(mm), value(params["_x"]), value(found["q"]), value(found["s"])
    rows = out.shape[0]
    n, k = params["out_features"], params["in_features"]
    return (isinstance(rows, int) and 0 < rows <= linear_group.MAX_M and out.dtype == xv.dtype
            and qv.is_contiguous() and sv.is_contiguous()
            and tuple(sv.shape) == (triton.cdiv(n, 128), triton.cdiv(k, 128)) and qv.device == xv.device)


def _fp8_groups(graph: fx.Graph, matched: list, options: Options, report: Report) -> tuple[int, set]:
    """Rewrite the groups of FP8 layers (``_groupable``) that quantize one activation into linear_group launches
    where they are faster (module docstring); returns how many launches and which matmuls they took."""
    changed, taken = 0, set()
    if not options.enabled("linear_group"):  # (the family that owns one launch over several weights)
        return changed, taken
    by_x: dict = {}
    for mm, found, params in matched:
        if _groupable(mm, found, params):
            by_x.setdefault(params["_x"], []).append((mm, found, params))
    named = options.passes is not None and "linear_group" in options.passes
    for members in by_x.values():
        for i in range(0, len(members), linear_group.MAX_GROUPS):
            group = members[i:i + linear_group.MAX_GROUPS]
            first = group[0][0]
            impl = options.kernel_impl(value(first).device.type)
            if impl != "triton" and not named:
                continue
            where = (source_line(first), module_path(first))
            config = _tuned_group(group) if impl == "triton" and options.inline else None
            if config is QUANT_MATMULS:
                log.info("linear_group at %s: the FP8 layers stay quant_matmuls (timed faster one after another)",
                         where[1] or "?")
                continue
            kernel_file = _rewrite_group(graph, group, impl, options.inline, config, f"{where[1] or '?'} ({where[0]})")
            if kernel_file is False:
                continue  # (the layers go on as quant_matmuls)
            shown = {"rows": value(first).shape[0], "in_features": group[0][2]["in_features"],
                     "out_features": [p["out_features"] for _, _, p in group], "dtype": "float8_e4m3fn",
                     "format": "fp8-block 128 x 128, activations quantized per row and 128-wide tile (W8A8)",
                     "projections": [module_path(mm) or mm.name for mm, _, _ in group]}
            report.matches.append(Match("linear_group", "deepfuse::linear_group", shown, *where, impl=impl,
                                        kernel_file=kernel_file))
            log.info("matched linear_group -> deepfuse::linear_group [%s] at %s (%s) %s", impl, where[1] or "?",
                     where[0], shown)
            taken.update(mm for mm, _, _ in group)
            changed += 1
    return changed, taken


def _tuned_group(group: list) -> dict:
    """The fastest of the FP8 linear_group tiles and the layers' own quant_matmuls one after another
    (``QUANT_MATMULS``), timed on random tensors of the real shapes (compile time; cached per GPU)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    xv = value(group[0][2]["_x"])
    rows, k = value(group[0][0]).shape[0], group[0][2]["in_features"]
    ns = [p["out_features"] for _, _, p in group]
    with unset_fake_temporarily():
        device = torch.device(xv.device)

        @autotune.once
        def inputs():  # made only if the choice is timed: the layers' weights, and clones past twice the L2
            x = torch.randn((rows, k), dtype=xv.dtype, device=device)
            layers = [kernel.quantize_weight(torch.randn((n, k), device=device), "fp8-block") for n in ns]
            total = torch.empty(sum(ns) * k, dtype=torch.float8_e4m3fn, device="meta")
            sets = [[(q if i == 0 else q.clone(), sc) for q, sc in layers]
                    for i in range(autotune.copies_past_l2(total, device, 16))]
            return x, sets

        quant_configs = [kernel.tune(rows, n, k, "fp8-block", True, (128, 128), xv.dtype, device, False) for n in ns]

        def run(cfg):
            x, sets = inputs()
            for layers in sets:
                if cfg is QUANT_MATMULS:
                    for (q, sc), qc in zip(layers, quant_configs):
                        kernel.quant_matmul(x, q, sc, None, "fp8-block", True, config=qc)
                else:
                    linear_group.linear_group(x, [q for q, _ in layers], config=cfg,
                                              weight_scales=[sc for _, sc in layers])

        key = f"linear_group_fp8|{'+'.join(map(str, ns))}x{k}|{xv.dtype}"
        return autotune.choose(key, rows, linear_group.FP8_CONFIGS + [QUANT_MATMULS], run, device)


def _rewrite_group(graph, group, impl, inline, config, origin) -> Union[str, None, bool]:
    """One linear_group launch for the group's FP8 layers (the kernel file, None for the reference, or False if
    neither form could be traced in)."""
    x = group[0][2]["_x"]
    ns = [p["out_features"] for _, _, p in group]
    args = (x, *(f["q"] for _, f, _ in group), *(f["s"] for _, f, _ in group))
    gen = linear_group.kernels_for(value(x).dtype, origin) if impl != "reference" else None

    def via_kernel(x, *qs):
        ys = linear_group.linear_group(x, list(qs[:len(ns)]), config=config, origin=origin,
                                       weight_scales=list(qs[len(ns):]))
        return tuple(y.reshape(-1, n) for y, n in zip(ys, ns))

    def via_op(x, *qs):
        ys = torch.ops.deepfuse.linear_group(x, list(qs[:len(ns)]), impl, None, 0.0, list(qs[len(ns):]))
        return tuple(y.reshape(-1, n) for y, n in zip(ys, ns))

    return _replace_group(graph, group, impl, inline, (via_kernel, via_op), args, gen)


def _replace_group(graph, group, impl, inline, launchers, args, gen) -> Union[str, None, bool]:
    """Replace the layers of ``group`` (their matmuls, dequantized weights and activation quantizations) by what
    the first of ``launchers`` (via_kernel, via_op) that traces computes: the kernel file, None for the reference,
    or False if neither traced."""
    interior = set()
    for mm, found, params in group:
        interior |= {mm} | found["w_nodes"] | {found["w_op"]} | (params["_x_nodes"] or set())
    via_kernel, via_op = launchers
    tried = ([via_kernel] if impl == "triton" and inline else []) + [via_op]
    binding = RegionBinding(interior, [mm for mm, _, _ in group])
    if not replace_region_first_traced(graph, binding, tried, args, "FP8 layers of one activation"):
        return False
    return str(gen.path) if gen is not None else None


# -- FP8 layers of one activation past decode sizes: the activation quantized once ---------------------------


def _prequantized(mm: fx.Node, params: dict) -> bool:
    """A W8A8 fp8-block layer whose GEMM reads activations quantized by a pre-kernel: a static row count past
    decode sizes (a symbolic one may be a decode step's at run time, where the quantization in the K loop, one
    launch a layer, is the faster form)."""
    rows = value(mm).shape[0]
    return (params["format"] == "fp8-block" and params["act_quant"] and isinstance(rows, int)
            and rows > kernel.DECODE_MAX_M)


def _shared_quantization(graph: fx.Graph, matched: list, options: Options, report: Report) -> tuple[int, set]:
    """Rewrite the W8A8 layers that quantize one activation past decode sizes (``_prequantized``: a prefill's
    q_a and kv_a projections, a dense MLP's gate and up) into one ``deepfuse::quant_matmuls``: the activation
    quantized once, each layer's GEMM reading it, where each would have run its own pre-kernel over the same x.
    Returns how many layers it took and which matmuls."""
    changed, taken = 0, set()
    by_x: dict = {}
    for mm, found, params in matched:
        if _prequantized(mm, params):
            key = (params["_x"], tuple(params["_block"]), value(mm).dtype)
            by_x.setdefault(key, []).append((mm, found, params))
    for group in (g for g in by_x.values() if len(g) > 1):
        first = group[0][0]
        impl = options.kernel_impl(value(first).device.type)
        where = (source_line(first), module_path(first))
        kernel_file = _rewrite_shared(graph, group, impl, options.inline, f"{where[1] or '?'} ({where[0]})")
        if kernel_file is False:
            continue  # (the layers go on one by one)
        names = [module_path(mm) or mm.name for mm, _, _ in group]
        for mm, _, params in group:
            shown = {k: v for k, v in params.items() if not k.startswith("_")}
            shown["activations_quantized_with"] = [n for n in names if n != (module_path(mm) or mm.name)]
            report.matches.append(Match("quant", "deepfuse::quant_matmuls", shown, source_line(mm), module_path(mm),
                                        impl=impl, kernel_file=kernel_file))
        log.info("matched quant -> deepfuse::quant_matmuls [%s] at %s (%s): %s, the activation quantized once",
                 impl, where[1] or "?", where[0], names)
        taken.update(mm for mm, _, _ in group)
        changed += len(group)
    return changed, taken


def _rewrite_shared(graph, group, impl, inline, origin) -> Union[str, None, bool]:
    """One activation quantization and a GEMM per layer for ``group`` (the kernel file, None for the reference,
    or False if neither form could be traced in)."""
    x = group[0][2]["_x"]
    block = tuple(group[0][2]["_block"])
    out_dtype = value(group[0][0]).dtype
    ns = [p["out_features"] for _, _, p in group]
    transposed = [p["_transposed"] for _, _, p in group]
    biases = [p["_bias"] for _, _, p in group]
    args = (x, *(f["q"] for _, f, _ in group), *(f["s"] for _, f, _ in group), *(b for b in biases if b is not None))
    gen = kernel.kernels_for("prequantized", value(x).dtype, origin)[0] if impl != "reference" else None
    configs = None
    if impl == "triton":
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily():
            configs = [kernel.tune(hint(value(mm).shape[0]), p["out_features"], p["in_features"], "fp8-block", True,
                                   block, value(x).dtype, value(mm).device, p["_bias"] is not None)
                       for mm, _, p in group]

    def operands(tensors):
        x, rest = tensors[0], list(tensors[1:])
        qs, ss, given = rest[:len(ns)], rest[len(ns):2 * len(ns)], iter(rest[2 * len(ns):])
        qs = [q.t() if t else q for q, t in zip(qs, transposed)]
        ss = [s.t() if t else s for s, t in zip(ss, transposed)]
        return x, qs, ss, [next(given) if b is not None else None for b in biases]

    def via_kernel(*tensors):
        ys = kernel.quant_matmuls(*operands(tensors), block, out_dtype, configs=configs, origin=origin)
        return tuple(y.reshape(-1, n) for y, n in zip(ys, ns))

    def via_op(*tensors):
        ys = torch.ops.deepfuse.quant_matmuls(*operands(tensors), block[0], block[1], out_dtype, impl)
        return tuple(y.reshape(-1, n) for y, n in zip(ys, ns))

    return _replace_group(graph, group, impl, inline, (via_kernel, via_op), args, gen)


# -- finding the parts ---------------------------------------------------------------------------------------


def _operands(mm: fx.Node) -> tuple[Optional[fx.Node], fx.Node, fx.Node]:
    """(bias, activation, weight) operands of an ``mm``/``addmm``; the weight operand is [K, N]."""
    if mm.target == aten.addmm.default:
        return mm.args[0], mm.args[1], mm.args[2]
    return None, mm.args[0], mm.args[1]


def _is_leaf(n: fx.Node) -> bool:
    return n.op in ("placeholder", "get_attr")


def is_dequantized_weight(node: fx.Node, limit: int = 64) -> bool:
    """Is ``node`` a 2-D float value computed from one quantized tensor and one fp32 scale tensor alone (a
    dequantized weight)? A bounded walk: activations have long ancestries and are rejected early."""
    val = value(node)
    if val is None or val.dim() != 2 or not val.dtype.is_floating_point or _is_leaf(node):
        return False
    seen, stack, leaves = {node}, [node], []
    while stack:
        for a in stack.pop().all_input_nodes:
            if a in seen:
                continue
            seen.add(a)
            if len(seen) > limit:
                return False
            if _is_leaf(a):
                if value(a) is not None and value(a).numel() > 0:
                    leaves.append(a)
            else:
                stack.append(a)
    dtypes = sorted(str(value(a).dtype) for a in leaves)
    return len(leaves) == 2 and any(value(a).dtype in QUANTIZED for a in leaves) and "torch.float32" in dtypes


def weight_side(mm: fx.Node) -> Union[dict, str, None]:
    """The quantized tensor and scale the weight operand is computed from, or None for a float weight (or a
    str: the reason a quantized-looking weight cannot be taken)."""
    w_op = _operands(mm)[2]
    nodes = ancestors([w_op])
    leaves = [n for n in nodes if _is_leaf(n) and value(n) is not None]
    quantized = [n for n in leaves if value(n).dtype in QUANTIZED]
    if not quantized:
        return None
    others = [n for n in leaves if value(n).dtype not in QUANTIZED]
    if len(quantized) != 1 or value(quantized[0]).dim() != 2:
        return "the weight is computed from more than one quantized tensor, or from one that is not 2-D"
    if len(others) != 1 or value(others[0]).dtype != torch.float32:
        return "the dequantized weight reads tensors other than one quantized weight and one fp32 scale tensor"
    scales = others
    return {"w_op": w_op, "q": quantized[0], "s": scales[0], "w_nodes": nodes - set(leaves)}


def _is_boundary(n: fx.Node) -> bool:
    """A matmul or a kernel: where one layer's input side ends and an earlier layer's begins."""
    return (n.target in BOUNDARIES or isinstance(n.target, torch._ops.HigherOrderOperator)
            or (isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "deepfuse"))


def _act_side(mm: fx.Node, k: int):
    """(x_src, nodes): the activation the matmul's input is a quantize-dequantize of, if it is one."""
    x_op = _operands(mm)[1]
    # Only this layer's input side: the walk stops at earlier matmuls and kernels (an earlier layer's own
    # activation quantization is not this one's).
    nodes = ancestors([x_op], stop=_is_boundary)
    fp8 = [n for n in nodes if n.op == "call_function" and value(n) is not None
           and value(n).dtype == torch.float8_e4m3fn]
    if not fp8:
        return x_op, set(), False
    order = {n: i for i, n in enumerate(mm.graph.nodes)}
    before = ancestors(fp8) - set(fp8)
    numel = hint(value(x_op).numel())  # hints, not symbolic comparisons: those would add guards
    candidates = [n for n in before if value(n) is not None and value(n).dtype in FLOATS and value(n).dim() > 0
                  and hint(value(n).shape[-1]) == k and hint(value(n).numel()) == numel]
    for cand in sorted(candidates, key=order.__getitem__, reverse=True):
        region = ancestors([x_op], blocked={cand}) - {cand}
        tensor_inputs = [a for n in region for a in n.all_input_nodes if a not in region and value(a) is not None
                         and hint(value(a).numel()) > 1]
        if all(a is cand for a in tensor_inputs) and all(not _is_leaf(n) or value(n) is None for n in region):
            # x.float() quantizes exactly as x does: hand the kernel the narrower tensor
            while (cand.target == torch.ops.prims.convert_element_type.default and value(cand).dtype == torch.float32
                   and value(cand.args[0]) is not None and value(cand.args[0]).dtype in FLOATS):
                region.add(cand)
                cand = cand.args[0]
            return cand, region, True
    return x_op, None, True  # a quantized activation, but not one computed from a single activation here


def activation_source(mm: fx.Node) -> fx.Node:
    """The activation a matmul reads: its input operand, or what that operand is a quantize-dequantize of."""
    return _act_side(mm, hint(value(_operands(mm)[2]).shape[0]))[0]


def _block_candidates(n: int, k: int, scale_shape: tuple) -> list[tuple[int, int]]:
    sn, sk = scale_shape

    def fits(size, count):  # DeepSeek's 128 first: where several sizes give the same grid, it is the one meant
        guesses = dict.fromkeys((128, triton.cdiv(size, count), triton.next_power_of_2(triton.cdiv(size, count))))
        return [g for g in guesses if triton.cdiv(size, g) == count]

    return list(itertools.product(fits(n, sn), fits(k, sk)))


# -- checking what they compute ------------------------------------------------------------------------------


def _verify(mm: fx.Node, found: dict, checked: dict) -> Union[dict[str, Any], str]:
    """Run the weight (and activation) subgraphs on random values; accept the first format, block and weight
    orientation they compute, with the activation quantization they compute. A subgraph that computes what one
    in ``checked`` computed, over inputs of the same shapes (the same layer in the next block of a model compiled
    whole), takes that check's finding."""
    q, s, w_op = found["q"], found["s"], found["w_op"]
    k = hint(value(w_op).shape[0])  # the matmul's weight operand is [K, N]
    match = checked_once(checked, region_key(found["w_nodes"] | {w_op}, [q, s], [w_op]), lambda: _weight_format(found))
    if isinstance(match, str):
        return match
    fmt, block, transposed = match
    x_src, x_nodes, act_quant = _act_side(mm, k)
    if act_quant and x_nodes is None:
        return "the activations are cast to float8, but not by a quantization of one activation in this graph"
    if act_quant:
        if fmt != "fp8-block":
            return "quantized activations with an int8 weight: only int8 weight-only is supported"
        x_op = _operands(mm)[1]
        key = region_key(x_nodes | {x_op}, [x_src], [x_op])
        reason = checked_once(checked, key and f"{key} {block[1]}", lambda: _verify_act(x_src, x_nodes, mm, block[1]))
        if reason:
            return reason
    n = hint(value(w_op).shape[1])
    x_val = value(x_src)
    if x_val.dtype not in FLOATS or value(mm).dtype not in FLOATS:
        return f"activations in {x_val.dtype} (float16, bfloat16 or float32 supported)"
    bias = _operands(mm)[0]
    if bias is not None:
        if mm.kwargs.get("beta", 1) != 1 or mm.kwargs.get("alpha", 1) != 1:
            return "addmm with alpha or beta other than 1"
        if value(bias) is None or tuple(hint(d) for d in value(bias).shape) != (n,):
            return "the bias is not one value per output feature"
    bf16_bytes = n * k * 2
    return {
        "format": fmt,
        "act_quant": act_quant,
        "block": list(block) if fmt == "fp8-block" else None,
        "out_features": n,
        "in_features": k,
        "bias": bias is not None,
        "activation_dtype": str(x_val.dtype).replace("torch.", ""),
        "out_dtype": str(value(mm).dtype).replace("torch.", ""),
        "weight_layout": "[K, N] (transposed)" if transposed else "[N, K]",
        "weight_bytes": kernel.weight_bytes(n, k, fmt, block),
        "bf16_weight_bytes": bf16_bytes,
        "_block": block,
        "_transposed": transposed,
        "_x": x_src,
        "_x_nodes": x_nodes,
        "_bias": bias,
    }


def _weight_format(found: dict) -> Union[tuple, str]:
    """(format, block, stored transposed) that the weight dequantization computes, checked by running it on
    random values; or why none."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    q, s, w_op = found["q"], found["s"], found["w_op"]
    qv, sv, wv = value(q), value(s), value(w_op)
    k, n = (hint(d) for d in wv.shape)  # the matmul's weight operand is [K, N]
    try:
        w_module = region_module(found["w_nodes"] | {w_op}, [q, s], w_op)
    except ValueError as err:
        return f"the weight dequantization {err}"
    q_shape, s_shape = tuple(hint(d) for d in qv.shape), tuple(hint(d) for d in sv.shape)
    candidates = []  # (format, block, q stored transposed)
    for transposed in (False, True):
        qn, qk = (q_shape[1], q_shape[0]) if transposed else q_shape
        if (qn, qk) != (n, k):
            continue
        s_nk = tuple(reversed(s_shape)) if transposed and len(s_shape) == 2 else s_shape
        if qv.dtype == torch.float8_e4m3fn and len(s_nk) == 2:
            candidates += [("fp8-block", blk, transposed) for blk in _block_candidates(n, k, s_nk)]
        if qv.dtype == torch.int8 and s_nk in ((n,), (n, 1)) and not transposed:
            candidates.append(("int8-channel", (1, 1), transposed))
    if not candidates:
        return (f"a {qv.dtype} weight {q_shape} with scales {s_shape} fits no supported format (fp8 e4m3 with a "
                f"block scale grid, int8 with one scale per output channel) for a [{n}, {k}] matmul weight")
    device = qv.device
    with unset_fake_temporarily(), torch.no_grad():
        gen = torch.Generator(device="cpu").manual_seed(2024)
        if qv.dtype == torch.int8:
            q_rand = torch.randint(-127, 128, q_shape, generator=gen, dtype=torch.int8)
        else:
            q_rand = (torch.randn(q_shape, generator=gen) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
        s_rand = torch.rand(s_shape, generator=gen) * 0.02 + 0.001
        q_rand, s_rand = q_rand.to(device), s_rand.to(device)
        try:
            got = w_module(q_rand, s_rand)
        except Exception as err:
            return f"the weight dequantization could not be run for checking: {type(err).__name__}: {str(err)[:120]}"
        for fmt, block, transposed in candidates:
            qq, ss = (q_rand.t(), s_rand.t() if s_rand.dim() == 2 else s_rand) if transposed else (q_rand, s_rand)
            want = kernel.dequantize_weight(qq, ss.reshape(-1) if fmt == "int8-channel" else ss, fmt, block)
            if got.shape == (k, n) and rel_err(got, want.t()) < TOL[wv.dtype]:
                return fmt, block, transposed
    return f"the {qv.dtype} weight's dequantization matches no supported format and block ({len(candidates)} tried)"


def _verify_act(x_src: fx.Node, x_nodes: set, mm: fx.Node, group: int) -> Optional[str]:
    """Is the matmul's activation operand the per-token, per-``group``-tile fp8 quantize-dequantize of x_src?"""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    x_op = _operands(mm)[1]
    try:
        module = region_module(x_nodes | {x_op}, [x_src], x_op)
    except ValueError as err:
        return f"the activation quantization {err}"
    xv = value(x_src)
    with unset_fake_temporarily(), torch.no_grad():
        gen = torch.Generator(device="cpu").manual_seed(7)
        shape = tuple(max(hint(d), 1) for d in xv.shape)
        x = torch.randn(shape, generator=gen)
        x.view(-1)[torch.randint(0, x.numel(), (max(1, x.numel() // 200),), generator=gen)] *= 50  # outliers
        x = x.to(xv.device, xv.dtype)
        try:
            got = module(x).float()
        except Exception as err:
            return f"the activation quantization could not be run for checking: {type(err).__name__}: {str(err)[:120]}"
        want = kernel.dequantize_activation(*kernel.quantize_activation(x, group), group).reshape(got.shape)
        # Rounding ties may land one fp8 step apart (x * (448 / amax) against x / (amax / 448)); a different
        # grouping (per row, per tensor) differs almost everywhere.
        off = ((got - want).abs() > 1e-6 * want.abs() + 1e-30).float().mean().item()
    if off > 0.01:
        return (f"the activations are quantized to float8, but not per token and per {group}-wide tile "
                f"(s = max|x| / 448) as the weight blocks are ({off:.0%} of values differ)")
    return None


# -- the rewrite -----------------------------------------------------------------------------------------------


def _rewrite(graph, mm, found, params, impl, inline, origin) -> Union[str, None, bool]:
    """The kernel file (None for the reference), or False if neither form could be traced in."""
    fmt, act_quant, block = params["format"], params["act_quant"], params["_block"]
    transposed, x_src, bias = params["_transposed"], params["_x"], params["_bias"]
    out_dtype, n, k = value(mm).dtype, params["out_features"], params["in_features"]
    args = (x_src, found["q"], found["s"]) + ((bias,) if bias is not None else ())
    gen = None
    config = None
    if impl != "reference":
        gen, _ = kernel.kernels_for(kernel._mode(fmt, act_quant, hint(value(mm).shape[0]) > kernel.DECODE_MAX_M),
                                    value(x_src).dtype, origin)
    if impl == "triton":
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily():
            config = kernel.tune(hint(value(mm).shape[0]), n, k, fmt, act_quant, block, value(x_src).dtype,
                                 value(mm).device, bias is not None)

    def operands(x, q, s, b=None):
        if transposed:
            q, s = q.t(), (s.t() if s.dim() == 2 else s)
        return x, q, (s.reshape(-1) if fmt == "int8-channel" else s), b

    def via_kernel(*tensors):
        x, q, s, b = operands(*tensors)
        y = kernel.quant_matmul(x, q, s, b, fmt, act_quant, block, out_dtype, config=config, origin=origin)
        return (y.reshape(-1, n),)

    def via_op(*tensors):
        x, q, s, b = operands(*tensors)
        y = torch.ops.deepfuse.quant_matmul(x, q, s, b, fmt, act_quant, block[0], block[1], out_dtype, impl)
        return (y.reshape(-1, n),)

    interior = {mm} | found["w_nodes"] | {found["w_op"]} | (params["_x_nodes"] or set())
    launchers = ([via_kernel] if impl == "triton" and inline else []) + [via_op]
    if not replace_region_first_traced(graph, RegionBinding(interior, mm), launchers, args, "quantized matmul"):
        return False
    return str(gen.path) if gen is not None else None
