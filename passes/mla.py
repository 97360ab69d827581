"""Multi-head Latent Attention: the attention over a low-rank latent, found by what it computes.

The bundled model's absorbed and naive forms, HF DeepseekV2/V3 with SDPA or eager attention, prefill or
decode over a cache, all lower to different aten graphs; every one of them computes the same function of
the same values: the per-head queries (q_nope, q_pe), the latent c_kv [B, T, C] (after the cache update),
the head-shared roped key k_pe [B, T, R], kv_b_proj's weight W [H*(DN+DV), C] and an optional mask:

    out = softmax(scale * (q_nope . (W_UK c_kv) + q_pe . k_pe) + mask) . (W_UV c_kv)

So the pass:
1. anchors at each attention softmax (an exp normalized by its own sum downstream of a batched matmul of
   two activations) or SDPA call;
2. finds the attention output O: the input of the next projection (o_proj) every path from the softmax
   passes through;
3. finds W and c_kv: a weight and a [.., C] value that reach O both through the scores and around them
   (the key side and the value side share them; a plain MHA shares nothing of the kind);
4. takes the region downstream of W or c_kv (or the softmax) and upstream of O, plus the layout ops and
   scalar scalings only it uses; its other inputs are the queries, k_pe and the mask, told apart by
   whether they enter a matmul (and on which side) or only add to the scores;
5. runs the region on random inputs against the canonical formula above, over the possible layouts, the
   scale constants found in the region and causal or not; it is rewritten only if one matches, and
   declined with the reason if none does.
Then two things about its inputs are settled by running how they are made:
- a mask built in the graph from sizes alone that is the bottom-right causal one becomes the kernels' own
  causality (no mask read, hidden tiles skipped); any other mask stays one the kernels read;
- a latent that is FP8 rows times per-token scales (the FP8 latent cache) is handed to the kernels as those
  rows and scales, never as the dequantized copy.
An attention where no weight and latent lead to a region of that shape (a plain MHA) gets no report row;
the debug log says why.
The projections, norms, rope and cache writes around it stay with Inductor.
"""
from __future__ import annotations

import itertools
import math
import operator
from typing import Any, Optional, Union

import sympy
import torch
import torch.fx as fx

from deepfuse.fusion import (RegionBinding, ancestors, descendants, escape_reason, post_dominates, region_module,
                             rel_err, replace_region_first_traced)
from deepfuse.log import log
from deepfuse.options import Options
from deepfuse.passes.quant import activation_source, is_dequantized_weight
from deepfuse.report import Declined, Match, Report, module_path, source_line
from deepfuse.runtime import ops  # noqa: F401  (registers torch.ops.deepfuse.*)
from deepfuse.runtime.kernels import mla as kernel
from deepfuse.shapes import hint, value

aten = torch.ops.aten

SDPA = {
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten.scaled_dot_product_attention.default,
}
MATMULS = {aten.bmm.default, aten.mm.default, aten.addmm.default, aten.matmul.default}
LAYOUT = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.permute.default,
    aten.transpose.int, aten.t.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.default,
    aten.squeeze.dims, aten.expand.default, aten.clone.default, aten.slice.Tensor, aten.select.int,
    aten.alias.default, torch.ops.prims.convert_element_type.default, aten._to_copy.default,
}
SCALINGS = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar}
ROLES = ("q", "q_nope", "q_pe", "c_kv", "k_pe", "w", "mask", "kv_scale")  # the region's inputs, in call order
FP8 = torch.float8_e4m3fn


class MLAPass:
    family = "mla"

    def run(self, graph: fx.Graph, options: Options, report: Report) -> int:
        _dedupe_views(graph)
        changed = 0
        anchors = _anchors(graph)
        causal_masks: dict[fx.Node, bool] = {}  # one mask serves every layer: checked once
        log.debug("mla: %d softmax anchor(s): %s", len(anchors), [a.name for a in anchors])
        for anchor in anchors:
            if anchor not in _live(graph):
                continue  # consumed by an earlier rewrite
            where = (source_line(anchor), module_path(anchor))
            found = _attention_region(graph, anchor)
            if found is None:
                continue  # an attention that shares no latent: not MLA, nothing to say
            if isinstance(found, str):  # keys and values projected from one latent, in a form not fused
                self._decline(report, found, where)
                continue
            params = _verify(found)
            if isinstance(params, str):
                self._decline(report, params, where)
                continue
            mask = found["roles"]["mask"]
            if mask is not None:
                if mask not in causal_masks:
                    causal_masks[mask] = _is_causal_mask(mask, params)
                if causal_masks[mask]:  # the kernels skip what causality hides and read no mask at all
                    found["roles"] = {**found["roles"], "mask": None}
                    params.update(causal=True, mask=False, mask_form="causal (recognized; not read)")
            impl = options.kernel_impl(value(found["out"]).device.type)
            dequantized = found["roles"]["c_kv"]
            fp8 = _fp8_latent(dequantized)
            if fp8 is not None:  # the kernels read the FP8 rows and their scales, not the dequantized copy
                found["roles"] = {**found["roles"], "c_kv": fp8[0], "kv_scale": fp8[1]}
                params.update(_fp8_params(params, found["roles"]))
            kernel_file = self._rewrite(graph, found, params, impl, where, options.inline)
            if fp8 is not None and kernel_file is not False:
                _erase_if_unused(dequantized)
            if kernel_file is False:
                self._decline(report, "the rewrite could not be traced into the graph (see the warning)", where)
                continue
            shown = {k: v for k, v in params.items() if not k.startswith("_")}
            report.matches.append(Match(self.family, "deepfuse::mla_attention", shown, *where, impl=impl,
                                        kernel_file=kernel_file))
            log.info("matched mla -> deepfuse::mla_attention [%s] at %s (%s) %s", impl, where[1] or "?", where[0],
                     shown)
            changed += 1
        return changed

    def _decline(self, report, reason, where):
        report.declined.append(Declined(self.family, reason, *where))
        log.info("declined mla at %s (%s): %s", where[1] or "?", where[0], reason)

    def _rewrite(self, graph, found, params, impl, where, inline) -> Union[str, None, bool]:
        """The kernel file (None for the reference), or False if neither form could be traced in."""
        roles, out = found["roles"], found["out"]
        origin = f"{where[1] or '?'} ({where[0]})"
        names = [k for k in ROLES if roles.get(k) is not None]
        args = tuple(roles[k] for k in names)
        gen = kernel.kernels_for(params["_dtype"], origin) if impl != "reference" else None
        out_val = value(out)

        def canonical(*tensors):
            return _canonical_inputs(dict(zip(names, tensors)), params)

        def finish(o, tensors):
            t = dict(zip(names, tensors))
            b, s = (_tracked(params[k], t.values()) for k in ("_batch", "_queries"))
            if params["_out_heads_first"]:
                o = o.transpose(1, 2)
            return (o.reshape(_output_shape(out_val, b, s)).to(out_val.dtype),)

        def via_op(*tensors):
            q_nope, q_pe, c_kv, k_pe, w, mask, kv_scale = canonical(*tensors)
            return finish(torch.ops.deepfuse.mla_attention(q_nope, q_pe, c_kv, k_pe, w, mask, params["scale"],
                                                           params["causal"], impl, kv_scale), tensors)

        def via_kernel(*tensors):
            q_nope, q_pe, c_kv, k_pe, w, mask, kv_scale = canonical(*tensors)
            return finish(kernel.mla_attention(q_nope, q_pe, c_kv, k_pe, w, params["scale"], params["causal"],
                                               mask, kv_scale, origin=origin), tensors)

        launchers = ([via_kernel] if impl == "triton" and inline else []) + [via_op]
        if not replace_region_first_traced(graph, RegionBinding(found["region"], out), launchers, args, "MLA"):
            return False
        return str(gen.path) if gen is not None else None


def _live(graph: fx.Graph) -> set:
    return set(graph.nodes)


# -- graph helpers ---------------------------------------------------------------------------------------------


def _dedupe_views(graph: fx.Graph) -> None:
    """Merge identical layout ops of one value (functionalization re-derives a cache slice at every use, so
    the key side and the value side would otherwise read "different" latents)."""
    seen: dict[tuple, fx.Node] = {}
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in LAYOUT:
            continue
        key = (node.target, _hashable(node.args), _hashable(node.kwargs))
        if key in seen:
            node.replace_all_uses_with(seen[key])
            graph.erase_node(node)
        else:
            seen[key] = node


def _hashable(x):
    if isinstance(x, (list, tuple)):
        return tuple(_hashable(a) for a in x)
    if isinstance(x, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in x.items()))
    if isinstance(x, (torch.SymInt, torch.SymFloat)):
        return ("sym", str(x.node.expr))
    return x


def _is_weight(node: fx.Node) -> bool:
    """A 2-D float parameter or constant, or one dequantized from a quantized weight and its scales."""
    val = value(node)
    if node.op in ("placeholder", "get_attr"):
        return val is not None and val.dim() == 2 and val.dtype.is_floating_point
    return is_dequantized_weight(node)


def _through_layout(node: fx.Node, ops=LAYOUT) -> fx.Node:
    """The first input of ``node`` that is not one of ``ops`` applied to the next."""
    while node.op == "call_function" and node.target in ops and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _has_weight_operand(n: fx.Node) -> bool:
    return any(isinstance(x, fx.Node) and _is_weight(_through_layout(x)) for x in n.args[:2])


def _anchors(graph: fx.Graph) -> list[fx.Node]:
    """Attention softmaxes: SDPA calls, and exp(x) / sum(exp(x)) over the last dim whose scores come from a
    batched matmul of two activations (a router's softmax comes from a matmul with a weight)."""
    out = []
    for n in graph.nodes:
        if n.target in SDPA:
            out.append(n)
        elif n.target in (aten.exp.default, aten._softmax.default) and _normalized(n) and _scores_from_bmm(n):
            out.append(n)
    return out


def _normalized(n: fx.Node) -> bool:
    if n.target == aten._softmax.default:
        return True
    sums = [u for u in n.users if u.target == aten.sum.dim_IntList]
    return any(u.target == aten.div.Tensor and u.args[0] is n and u.args[1] in sums for u in n.users)


def _scores_from_bmm(n: fx.Node, depth: int = 16) -> bool:
    frontier, seen = [n], {n}
    for _ in range(depth):
        nxt = []
        for node in frontier:
            for a in node.all_input_nodes:
                if a in seen:
                    continue
                seen.add(a)
                if a.target in (aten.bmm.default, aten.mm.default):
                    if not _has_weight_operand(a):  # two activations (a bmm of batch 1 becomes an mm on GPUs)
                        return True
                    continue
                if a.target == aten.addmm.default:
                    continue
                nxt.append(a)
        frontier = nxt
    return False


def _sdpa_parts(anchor: fx.Node):
    """(q, k, v, scale) of an SDPA node (causality is not read: the check tries both)."""
    q, k, v = anchor.args[:3]
    return q, k, v, anchor.kwargs.get("scale")


def _attention_output(graph: fx.Graph, anchor: fx.Node) -> Optional[fx.Node]:
    """The data input of the first projection (a matmul with a weight) downstream of the softmax, if every
    path from the softmax to the graph's outputs passes through it."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    down = descendants([anchor])
    for m in sorted(down, key=order.__getitem__):
        if m.target not in (aten.mm.default, aten.addmm.default):
            continue
        data = [a for a in m.args[-2:] if isinstance(a, fx.Node) and a in down]
        weights = [a for a in m.args[-2:] if isinstance(a, fx.Node) and _is_weight(_through_layout(a))]
        if len(data) != 1 or len(weights) != 1:
            continue
        source = activation_source(m)  # before a quantize-dequantize, for an FP8 o_proj
        data = [source] if source in down else data
        out = _before_output_gate(data[0], down)
        return out if post_dominates(out, anchor) else None
    return None


def _before_output_gate(node: fx.Node, down: set) -> fx.Node:
    """The attention's output before an output gate (A.X K2's attn * sigmoid(x . W_gate), which then stays with
    Inductor): through layout ops and casts, the operand of a product whose other operand the softmax does not
    reach; ``node`` itself without such a gate."""
    seen = node
    while seen.op == "call_function" and (seen.target in LAYOUT or seen.target in CASTS):
        seen = seen.args[0]
    if seen.target != aten.mul.Tensor or len(seen.args) != 2 or not all(isinstance(a, fx.Node) for a in seen.args):
        return node
    attn, gate = seen.args if seen.args[0] in down else seen.args[::-1]
    if attn not in down or gate in down or value(attn) is None or value(gate) is None:
        return node
    return attn


# -- the region ------------------------------------------------------------------------------------------------


def _attention_region(graph: fx.Graph, anchor: fx.Node):
    out = _attention_output(graph, anchor)
    if out is None:
        log.debug("mla: softmax %s: no projection downstream takes everything it feeds", anchor.name)
        return None
    order = {n: i for i, n in enumerate(graph.nodes)}
    if anchor.target in SDPA:
        q, k, v, _ = _sdpa_parts(anchor)
        keys, values = ancestors([q, k]), ancestors([v])
    else:  # the value side: what reaches the output without passing the softmax
        keys, values = ancestors([anchor]), ancestors([out], blocked={anchor})
    common = (keys & values) - {anchor}
    weights = [n for n in common if _is_weight(n)]
    if not weights:
        log.debug("mla: softmax %s: no weight reaches both its keys and its values", anchor.name)
        return None

    def first_matmul(w):
        uses = [u for u in descendants([w]) if u.target in MATMULS]
        return min((order[u] for u in uses), default=-1)

    tried, own = [], None
    for w in sorted(weights, key=first_matmul, reverse=True):
        c = hint(value(w).shape[1])
        from_w = descendants([w])
        # the latent is what w multiplies: upstream of w's products (an indexer's value of the same width, which
        # reaches keys and values only through the mask, is not)
        products = [u for u in _users_through_layout(w) if u.target in MATMULS]
        into_w = ancestors(products)
        latents = [n for n in common if n not in from_w and n in into_w and n.op != "placeholder"
                   and _last_dim(n) == c and value(n).dtype.is_floating_point]
        if not latents:
            continue
        c_kv = max(latents, key=order.__getitem__)
        found = _region_for(graph, anchor, out, w, c_kv, order)
        if isinstance(found, dict):
            return found
        tried.append(found)
        if own is None and _projects_keys_and_values(products, keys, values):
            own = (w, found)
    if own is not None:  # the keys and values are one weight's products of a latent: MLA, in a form not fused
        return (f"keys and values both come from {own[0].name} {list(value(own[0]).shape)} applied to one latent "
                f"(MLA), but the attention is not fused: {own[1]}")
    if tried:  # an attention, but nothing in it reads like a latent: not MLA (a plain MHA, say)
        log.debug("mla: attention at %s is not over a latent: %s", anchor.name, tried[0])
    else:
        log.debug("mla: softmax %s: no activation shared by keys and values has a weight's input width",
                  anchor.name)
    return None


def _projects_keys_and_values(products: list[fx.Node], keys: set, values: set) -> bool:
    """Is one of a weight's ``products`` split, through layout ops alone, into part of the attention's keys and
    part of its values? kv_b_proj's is (k_nope and v); in a plain attention the weights keys and values share are
    earlier layers', and another layer's weight (an indexer's, say) feeds a mask or a score, not both operands."""
    moves = LAYOUT | {operator.getitem, aten.split.Tensor, aten.split_with_sizes.default, aten.cat.default,
                      aten.slice_scatter.default, aten.copy.default}
    for product in products:
        seen, stack = {product}, [product]
        while stack:
            for u in stack.pop().users:
                if u not in seen and u.target in moves:
                    seen.add(u)
                    stack.append(u)
        if seen & keys and seen & (values - keys):  # (a score read past the softmax puts the keys in both)
            return True
    return False


def _users_through_layout(node: fx.Node) -> list[fx.Node]:
    """The users of ``node`` and of the layout ops applied to it."""
    out, stack = [], [node]
    while stack:
        for u in stack.pop().users:
            (stack if u.target in LAYOUT else out).append(u)
    return out


def _last_dim(n: fx.Node) -> Optional[int]:
    val = value(n)
    return hint(val.shape[-1]) if val is not None and val.dim() >= 2 else None


def _region_for(graph, anchor, out, w, c_kv, order):
    upstream = ancestors([out])
    from_w = descendants([w])
    region = ((from_w | descendants([c_kv]) | descendants([anchor])) & upstream) - {w, c_kv}
    region.add(out)
    grew = True
    while grew:
        grew = False
        for n in list(region):
            for a in n.all_input_nodes:
                if a in region or a in (w, c_kv) or a.op != "call_function":
                    continue
                pulls = ((a.target in LAYOUT and not _selects(a)) or _data_free(a)
                         or (a.target in SCALINGS and _scalar_operand(a) is not None)
                         or (a.target in (aten.bmm.default, aten.mm.default)
                             and not _has_weight_operand(a)))  # q_pe . k_pe
                if pulls and all(u in region for u in a.users):
                    region.add(a)
                    grew = True
    region = sorted(region, key=order.__getitem__)
    # a per-head key or value the graph returns: the model caches them expanded (transformers' DeepseekV32 does)
    cached = [n for n in region if n is not out and n in from_w and value(n) is not None and value(n).dim() == 4
              and any(u.op == "output" for u in n.users)]
    if cached:
        return (f"{cached[0].name} {[hint(d) for d in value(cached[0]).shape]}, per-head keys or values made from the "
                "latent, is an output of the graph: the model caches its keys and values expanded, which a latent "
                "attention never forms (without that cache, use_cache=False, it is fused)")
    reason = escape_reason(region, [out])
    if reason:
        return reason
    inside = set(region)
    boundary = []
    for n in region:
        for a in n.all_input_nodes:
            if a not in inside and a not in boundary and a not in (w, c_kv):
                boundary.append(a)
    return _roles(anchor, out, w, c_kv, region, boundary)


CREATION = {aten.empty.memory_format, aten.full.default, aten.zeros.default, aten.ones.default,
            aten.scalar_tensor.default, torch.ops.prims.iota.default, aten.arange.start, aten.arange.default}


def _data_free(n: fx.Node) -> bool:
    """Built from constants alone (an empty buffer a key is assembled in, a zero bias)."""
    return all(a.op == "call_function" and (a.target in CREATION or a.target in LAYOUT or not a.all_input_nodes)
               for a in ancestors([n]))


def _selects(n: fx.Node) -> bool:
    """A slice or select that keeps part of its input (a cache's filled prefix, say): the region's input is
    the part, not the whole buffer."""
    src, out = value(n.args[0]) if isinstance(n.args[0], fx.Node) else None, value(n)
    return src is None or out is None or hint(out.numel()) < hint(src.numel())


def _scalar_operand(n: fx.Node):
    for a in n.args[1:2] if n.target in (aten.div.Tensor, aten.div.Scalar) else n.args[:2]:
        if isinstance(a, (int, float)) and not isinstance(a, bool):
            return float(a)
    return None


def _matmul_side(start: fx.Node, region: set, anchor: fx.Node) -> Optional[str]:
    """Which operand of the first matmul (or SDPA) a region input flows into: "q", "k", "v"; None if it
    reaches the softmax without one (a mask)."""
    frontier, seen = [start], {start}
    while frontier:
        nxt = []
        for n in frontier:
            for u in n.users:
                if u not in region or u in seen:
                    continue
                seen.add(u)
                if u is anchor and u.target not in SDPA:
                    return None
                if u.target in SDPA:
                    pos = [i for i, a in enumerate(u.args[:4]) if a is n]
                    return ("q", "k", "v", None)[pos[0]] if pos else None
                if u.target in MATMULS:
                    return "q" if u.args[-2] is n else "k"
                nxt.append(u)
        frontier = nxt
    return None


def _roles(anchor, out, w, c_kv, region, boundary):
    inside = set(region)
    scores = value(anchor.args[0])
    if anchor.target in SDPA:
        q, k, _, _ = _sdpa_parts(anchor)
        t = hint(value(k).shape[-2])
        rows = hint(value(q).numel()) // hint(value(q).shape[-1])  # B*H*S
    else:
        t = hint(scores.shape[-1])
        rows = hint(scores.numel()) // t
    c = hint(value(w).shape[1])
    bt = hint(value(c_kv).numel()) // c
    if t == 0 or bt % t or rows == 0:
        return "the latent's size does not fit the attention's context length"
    b = bt // t
    qs, ks, masks = [], [], []
    for n in boundary:
        v = value(n)
        if v is None or v.numel() == 1 or isinstance(n.meta.get("val"), (torch.SymInt, int)):
            continue
        side = _matmul_side(n, inside, anchor)
        if side == "q":
            qs.append(n)
        elif side == "k":
            ks.append(n)
        elif side is None and (v.dtype == torch.bool or v.dtype.is_floating_point) and _last_dim(n) == t:
            masks.append(n)
        else:
            return f"the attention region reads a value it should not ({n.name})"
    if len(ks) != 1:
        return f"the attention keys read {len(ks)} inputs besides the latent, expected the rope key alone"
    if not 1 <= len(qs) <= 2 or len(masks) > 1:
        return "the attention region's queries are not one or two tensors (q, or q_nope and q_pe)"
    k_pe = ks[0]
    if hint(value(k_pe).numel()) % bt:
        return "the rope key's size does not fit [batch, context, rope]"
    r = hint(value(k_pe).numel()) // bt
    widths = [hint(value(n).numel()) // rows for n in qs]
    dv_num = hint(value(out).numel())
    if dv_num % rows:
        return "the attention output's size does not fit [batch, heads, queries, v_head_dim]"
    dv = dv_num // rows
    roles: dict[str, Any] = {"c_kv": c_kv, "w": w, "k_pe": k_pe, "mask": masks[0] if masks else None}
    if len(qs) == 1:
        roles["q"] = qs[0]  # [q_nope | q_pe] along the last dim (the check refuses any other order)
        dn = widths[0] - r
    else:
        roles["q_nope"], roles["q_pe"] = (qs[0], qs[1]) if widths[1] == r else (qs[1], qs[0])
        dn = widths[0] if widths[1] == r else widths[1]
    if dn <= 0 or hint(value(w).shape[0]) % (dn + dv):
        return "kv_b_proj's shape does not fit the queries' and values' head dims"
    h = hint(value(w).shape[0]) // (dn + dv)
    if rows % (b * h):
        return "the attention's score rows do not factor into batch x heads x queries"
    s = rows // (b * h)
    dims = {"batch": b, "queries": s, "context": t, "heads": h, "kv_lora_rank": c, "qk_nope_head_dim": dn,
            "qk_rope_head_dim": r, "v_head_dim": dv}
    return {"anchor": anchor, "out": out, "region": region, "roles": roles, "dims": dims,
            "scales": _scale_candidates(anchor, region, dn + r)}


def _scale_candidates(anchor, region, qk_dim) -> list[float]:
    """Softmax scales the region may apply: SDPA's scale (or its default), the scalar factors found on the
    way to the softmax, and their pairwise products (a decomposition may scale q and k by sqrt each)."""
    found = []
    if anchor.target in SDPA:
        found.append(_sdpa_parts(anchor)[3] or 1.0 / math.sqrt(qk_dim))
    pre = ancestors([anchor])
    factors = []
    for n in region:
        if n in pre and n.target in SCALINGS:
            f = _scalar_operand(n)
            if f is not None and f != 0:
                factors.append(1.0 / f if n.target in (aten.div.Tensor, aten.div.Scalar) else f)
    found += factors
    found += [a * b for a, b in itertools.combinations(factors, 2)]
    found.append(1.0 / math.sqrt(qk_dim))
    unique = []
    for f in found:
        if all(abs(f - u) > 1e-9 * abs(u) for u in unique):
            unique.append(f)
    return unique


# -- checking what the region computes -------------------------------------------------------------------------


def _canonical_inputs(t: dict, params: dict):
    """The region's inputs as the op takes them: q_nope/q_pe [B, S, H, d], c_kv [B, T, C], k_pe [B, T, R], the
    mask, and an FP8 latent's scales [B, T] (else None)."""
    b, s, tt = (_tracked(params[k], t.values()) for k in ("_batch", "_queries", "_context"))
    h, dn, r = params["heads"], params["qk_nope_head_dim"], params["qk_rope_head_dim"]

    def q_view(x, d):
        if params["_q_heads_first"]:
            return x.reshape(b, h, s, d).transpose(1, 2)
        return x.reshape(b, s, h, d)

    if "q" in t:
        q = q_view(t["q"], dn + r)
        q_nope, q_pe = q[..., :dn], q[..., dn:]
    else:
        q_nope, q_pe = q_view(t["q_nope"], dn), q_view(t["q_pe"], r)
    c_kv = t["c_kv"].reshape(b, tt, -1)
    k_pe = t["k_pe"].reshape(b, tt, r)
    # The region's own casts (a rope computed in fp32, cast back) happen here: the op runs in one dtype.
    dtype = params["_dtype"]
    q_nope, q_pe, k_pe = (x.to(dtype) for x in (q_nope, q_pe, k_pe))
    kv_scale = t.get("kv_scale")
    if kv_scale is None:
        c_kv = c_kv.to(dtype)
    else:
        kv_scale = kv_scale.reshape(b, tt).to(torch.float32)
    mask = t.get("mask")
    if mask is not None:
        mask = _mask_bhst(mask, params["_mask_layout"], b, s, params["heads"], tt)
    return q_nope, q_pe, c_kv, k_pe, t["w"], mask, kv_scale


def _expr(n):
    return n.node.expr if isinstance(n, torch.SymInt) else int(n)


def _tracked(expr, tensors):
    """A size equal to ``expr``, taken from one of the traced inputs' shapes (so the trace records where it
    comes from): a dimension that is it, or that the shape environment proves equal to it; a plain int when
    the size is static."""
    if not hasattr(expr, "free_symbols") or not expr.free_symbols:
        return int(expr)
    dims = [d for x in tensors if isinstance(x, torch.Tensor) for d in x.shape if isinstance(d, torch.SymInt)]
    for d in dims:
        if d.node.expr == expr or _provably(d, sympy.Eq(d.node.expr, expr)):
            return d
    raise NotImplementedError(f"no input of the region has a dimension equal to {expr}")


def _provably(d: torch.SymInt, claim) -> bool:
    """Does the shape environment prove ``claim`` (two symbols Dynamo made for one size, say: the batch of the
    input ids and of a cache slice taken with it)?"""
    try:
        return bool(d.node.shape_env._maybe_evaluate_static(claim))
    except Exception:  # a shape environment without this method: no proof
        return False


def _output_shape(out_val, b, s):
    """The region output's shape in terms of traced sizes: B, S and B*S dims by expression, else static."""
    known = {_expr(b): b, _expr(s): s, _expr(b) * _expr(s): b * s}
    shape = []
    for d in out_val.shape:
        e = _expr(d)
        if isinstance(e, int):
            shape.append(e)
        elif e in known:
            shape.append(known[e])
        else:
            raise NotImplementedError(f"the attention output dim {e} is not batch, queries or their product")
    return shape


MASK_LAYOUTS = (None, "bhst", "bsht")  # how the region's scores are laid out, for broadcasting its mask


def _mask_bhst(mask: torch.Tensor, layout: str, b, s, h, t) -> torch.Tensor:
    """The mask as a (broadcast, zero-stride) [B, H, S, T] view, given the score layout it broadcasts against."""
    if layout == "bhst":
        return torch.broadcast_to(mask, (b, h, s, t))
    return torch.broadcast_to(mask, (b, s, h, t)).transpose(1, 2)


def _verify(found) -> Union[dict[str, Any], str]:
    """Run the region on random inputs; accept it if it equals the canonical MLA for one layout, scale and
    causality. Random values of the real shapes: what is checked is the function, not these values."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    roles, region, out, dims = found["roles"], found["region"], found["out"], dict(found["dims"])
    names = [k for k in ROLES if roles.get(k) is not None]
    try:
        module = region_module(region, [roles[k] for k in names], out)
    except ValueError as err:
        return f"the attention region {err}"

    b, s, h, t = dims["batch"], dims["queries"], dims["heads"], dims["context"]
    c, dn, r, dv = dims["kv_lora_rank"], dims["qk_nope_head_dim"], dims["qk_rope_head_dim"], dims["v_head_dim"]
    cv = value(roles["c_kv"])
    dtype, device = cv.dtype, cv.device
    with unset_fake_temporarily(), torch.no_grad():
        gen = torch.Generator(device="cpu").manual_seed(4321)

        def rand(*shape, scale=1.0):
            return (torch.randn(*shape, generator=gen) * scale).to(device, dtype)

        q_nope, q_pe = rand(b, s, h, dn), rand(b, s, h, r)
        c_kv, k_pe = rand(b, t, c), rand(b, t, r)
        w = rand(h * (dn + dv), c, scale=c ** -0.5)
        mask = None
        if roles["mask"] is not None:
            mv = value(roles["mask"])
            shape = [hint(d) for d in mv.shape]
            keep = torch.rand(*shape, generator=gen) > 0.3
            keep[..., -1] = True  # every query keeps a key
            mask = keep.to(device) if mv.dtype == torch.bool else \
                torch.zeros(shape).masked_fill(~keep, float("-inf")).to(device, mv.dtype)
        real_w = w.to(value(roles["w"]).dtype)
        for heads_first in (False, True):
            def q_as(x, node):
                y = x.transpose(1, 2) if heads_first else x
                return y.reshape([hint(d) for d in value(node).shape]).to(value(node).dtype)

            kv_node = value(roles["k_pe"])
            feed = {"c_kv": c_kv.reshape([hint(d) for d in cv.shape]),
                    "k_pe": k_pe.reshape([hint(d) for d in kv_node.shape]).to(kv_node.dtype), "w": real_w, "mask": mask}
            if "q" in roles:
                feed["q"] = q_as(torch.cat([q_nope, q_pe], dim=-1), roles["q"])
            else:
                feed["q_nope"], feed["q_pe"] = q_as(q_nope, roles["q_nope"]), q_as(q_pe, roles["q_pe"])
            try:
                got = module(*[feed[k] for k in names]).double()
            except Exception as err:
                return f"the attention region could not be run for checking: {type(err).__name__}: {str(err)[:120]}"
            tol = 1e-4 if dtype == torch.float32 else 3e-2
            acc = [x.double().cpu() for x in (q_nope, q_pe, c_kv, k_pe, real_w)]
            m = mask.cpu() if mask is not None else None
            for causal, mask_layout in itertools.product((False, True), MASK_LAYOUTS):
                if (m is None) != (mask_layout is None):
                    continue
                try:
                    m4 = None if m is None else _mask_bhst(m, mask_layout, b, s, h, t)
                except RuntimeError:
                    continue  # the mask does not broadcast that way
                # each scale the region's constants allow, the nearest kept: two within a bf16 check's tolerance of
                # each other (a YaRN factor near 1, say) are told apart by which is closer, not by which came first
                errors = {}
                for scale in found["scales"]:
                    want = kernel.reference(*acc, scale, causal, m4)
                    for out_heads_first in (False, True):
                        o = want.transpose(1, 2) if out_heads_first else want
                        errors[scale, out_heads_first] = rel_err(got, o.reshape(got.shape).to(got.device))
                if not errors:
                    continue
                (scale, out_heads_first), err = min(errors.items(), key=lambda item: item[1])
                if err < tol:
                    return _params(found, dims, scale, causal, heads_first, out_heads_first, mask_layout)
    return "the attention over the latent is not the MLA computation (checked on random inputs)"


def _params(found, dims, scale, causal, heads_first, out_heads_first, mask_layout) -> dict[str, Any]:
    roles = found["roles"]
    cv = value(roles["c_kv"])
    # Symbolic sizes for the rewrite (the traced graph may be dynamic in batch, queries or context).
    c = dims["kv_lora_rank"]
    bt = cv.numel() // c
    t_sym = _context_size(found)
    params = dict(dims)
    params.update({
        "scale": scale, "causal": causal, "mask": roles["mask"] is not None,
        "query_form": "q (nope|rope)" if "q" in roles else "q_nope, q_pe",
        "dtype": str(value(found["out"]).dtype).replace("torch.", ""),
        "latent_bytes_per_token": (c + dims["qk_rope_head_dim"]) * cv.element_size(),
        "mha_bytes_per_token": kernel.mha_cache_bytes_per_token(dims["heads"], dims["qk_nope_head_dim"],
                                                                dims["qk_rope_head_dim"], dims["v_head_dim"],
                                                                cv.element_size()),
        "_dtype": value(found["out"]).dtype, "_q_heads_first": heads_first, "_out_heads_first": out_heads_first,
        "_mask_layout": mask_layout,
        "_batch": _expr(bt // t_sym), "_context": _expr(t_sym),
        "_queries": _expr(value(found["out"]).numel() // ((bt // t_sym) * dims["heads"] * dims["v_head_dim"])),
    })
    return params


# -- a causal mask built in the graph ---------------------------------------------------------------------------


def _is_causal_mask(mask: fx.Node, params: dict) -> bool:
    """Is the mask the bottom-right causal one (query i of S sees keys 0 .. T - S + i), built in the graph from
    sizes alone (an arange compared with positions, say)? Then the kernels apply causality themselves: they
    skip the hidden tiles and read no mask. Checked by running how the mask is built: at the traced sizes, and,
    where those are symbols, at other values of them too (the expected S and T follow from the same symbols).
    A value at or below half the dtype's lowest counts as hidden (HF's eager masks use finfo.min); any other
    nonzero value (a bias) is not causal. A mask read from an input (padding, a position tensor) is never
    recognized: it stays a mask the kernels read."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    built_from = ancestors([mask])
    if any(n.op == "get_attr" or (n.op == "placeholder" and not isinstance(n.meta.get("val"), (int, torch.SymInt)))
           for n in built_from):
        return False
    if any(n.op == "call_function" and not isinstance(n.target, torch._ops.OpOverload)
           and getattr(n.target, "__module__", None) != "_operator" for n in built_from):
        return False  # a call the check cannot copy faithfully (aten ops and size arithmetic it can)
    position = {n: i for i, n in enumerate(mask.graph.nodes)}
    symbols = sorted((n for n in built_from if n.op == "placeholder"), key=position.__getitem__)
    module = region_module(built_from, symbols, mask)  # the sizes it is built from are its inputs
    exprs = [sympy.sympify(params[k]) for k in ("_batch", "_queries", "_context")]
    traced = [params[k] for k in ("batch", "queries", "context")]
    for moved, values in enumerate(_symbol_assignments(symbols)):
        if not moved:
            b, s, t = traced
        else:
            symbolic = [(n.meta["val"], v) for n, v in zip(symbols, values) if isinstance(n.meta["val"], torch.SymInt)]
            shape_env = symbolic[0][0].node.shape_env
            subs = {sym.node.expr: v for sym, v in symbolic}
            try:
                b, s, t = (_evaluate(e, subs, shape_env) for e in exprs)
            except (KeyError, TypeError):
                return False  # a size no traced value fixes
            if not 0 < s <= t or b <= 0:
                continue
        with unset_fake_temporarily(), torch.no_grad():
            try:
                m = module(*values)
                view = _mask_bhst(m, params["_mask_layout"], b, s, params["heads"], t)
            except Exception:  # noqa: BLE001  (a mask that does not build or broadcast at these sizes)
                return False
            for dim in (0, 1):  # a mask broadcast over batch or heads is checked once for them
                if view.stride(dim) == 0:
                    view = view.narrow(dim, 0, 1)
            if m.dtype == torch.bool:
                seen = view
            else:
                if torch.isnan(view).any():
                    return False
                seen = view > torch.finfo(m.dtype).min / 2
                if (view[seen] != 0).any():
                    return False
            keys = torch.arange(t, device=m.device)
            causal = keys[None, :] <= (t - s) + torch.arange(s, device=m.device)[:, None]
            if not torch.equal(seen, causal.expand_as(seen)):
                return False
    log.debug("mla: mask %s is the causal mask, built in the graph: not read", mask.name)
    return True


def _evaluate(expr, subs: dict, shape_env) -> int:
    """A size expression at the given symbol values; symbols not given keep their traced values."""
    expr = expr.subs(subs)
    return int(expr.subs({sym: shape_env.var_to_val[sym] for sym in expr.free_symbols}))


def _symbol_assignments(symbols: list[fx.Node]):
    """The traced values of the mask's size inputs, then each symbolic one moved (up and down) alone."""
    traced = [hint(n.meta["val"]) for n in symbols]
    yield traced
    for i, n in enumerate(symbols):
        if isinstance(n.meta["val"], torch.SymInt):
            for delta in (1, 5, -1):
                moved = list(traced)
                moved[i] = traced[i] + delta
                if moved[i] >= 0:
                    yield moved


# -- an FP8 latent cache ---------------------------------------------------------------------------------------

CASTS = {torch.ops.prims.convert_element_type.default, aten._to_copy.default}


# Ops that keep a tensor's values in row-major order: a latent read through them is the same rows.
REORDERLESS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
               aten.squeeze.dim, aten.squeeze.default, aten.squeeze.dims, aten.clone.default, aten.alias.default}


def _fp8_latent(c_kv: fx.Node) -> Optional[tuple[fx.Node, fx.Node]]:
    """(FP8 rows [.., T, C], per-token scales [.., T, 1]) if the latent is an FP8 cache dequantized per token:
    a cast of float8_e4m3fn rows times a float tensor of their shape with a last dim of 1 (casts either side
    of the product, reshapes that keep the rows' order after it): what ``deepfuse.runtime.latent_cache``
    returns for ``fp8=True``. That form is its whole meaning, so it is matched exactly; any other
    dequantization (per-tile scales, say) is left as a float latent the attention reads, slower and right."""
    product = _through_layout(c_kv, CASTS | REORDERLESS)
    if product.op != "call_function" or product.target != aten.mul.Tensor:
        return None
    shape = [_expr(d) for d in value(product).shape]
    if shape[-1] != _expr(value(c_kv).shape[-1]):
        return None  # the rows were reshaped across the latent's width: not a latent of these rows
    for x, s in (product.args[:2], product.args[1::-1]):
        if not (isinstance(x, fx.Node) and isinstance(s, fx.Node)):
            continue
        rows, sv = _through_layout(x, CASTS), value(s)
        rv = value(rows)
        if rows is x or rv is None or sv is None or rv.dtype != FP8 or not sv.dtype.is_floating_point:
            continue
        if [_expr(d) for d in rv.shape] == shape and [_expr(d) for d in sv.shape] == shape[:-1] + [1]:
            log.debug("mla: the latent %s is FP8 rows %s dequantized by per-token scales %s", c_kv.name,
                      rows.name, s.name)
            return rows, s
    return None


def _fp8_params(params: dict, roles: dict) -> dict[str, Any]:
    """The explain row of an attention over an FP8 latent: its format and bytes per token."""
    c, r = params["kv_lora_rank"], params["qk_rope_head_dim"]
    scale_bytes = value(roles["kv_scale"]).element_size()
    return {"latent_format": "float8_e4m3fn, one scale per token",
            "latent_bytes_per_token": c + scale_bytes + r * value(roles["k_pe"]).element_size()}


def _erase_if_unused(node: fx.Node) -> None:
    """Erase a dequantization nothing reads any more, and the casts and products it was made of."""
    graph = node.graph
    stack = [node]
    while stack:
        n = stack.pop()
        if n.users or n.op != "call_function" or n.target not in CASTS | REORDERLESS | {aten.mul.Tensor}:
            continue
        inputs = n.all_input_nodes
        graph.erase_node(n)
        stack.extend(inputs)


def _context_size(found):
    anchor = found["anchor"]
    if anchor.target in SDPA:
        return value(_sdpa_parts(anchor)[1]).shape[-2]
    return value(anchor.args[0]).shape[-1]

