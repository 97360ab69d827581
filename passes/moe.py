"""Mixture-of-Experts: the routed experts, found by what they compute rather than by how they are written.

HF's grouped_mm, batched_mm, a model's own sort-and-grouped-GEMM or gather-and-bmm experts all lower to
different aten graphs, but every one of them is a function of the same five values: the hidden states x
[T, H], the top-k expert ids and routing weights [T, k], and the stacked expert weights (gate+up [E, 2I, H],
down [E, H, I], either layout). So the pass:
1. anchors at the router's last ``topk`` over the experts dim (or at expert ids a token-id table holds: hash
   routing, whose ids the router's scores are gathered at);
2. takes the experts region: everything downstream of the top-k that flows into the first [T, H] value
   every path out of the router passes through (its post-dominator), minus the routing weights' own chain
   (gather, renormalization, scaling), plus what only the region uses (weight transposes, x gathers);
3. checks the region reads exactly x, ids, weights and two expert weight tensors;
4. runs the extracted region on random inputs against the canonical MoE formula (each candidate activation
   and weight layout) and accepts it only if one matches: a region that computes anything else is declined;
5. replaces it with the fused experts kernels.
Then the router, from its logits to the (weights, ids) the experts read, is checked the same way against the
routing kernel's space (``RoutingSpec``: scoring, bias, groups, renormalization, scale; candidates read off
its nodes, each run on random logits) and becomes one ``deepfuse::moe_routing``; one outside that space keeps
its aten ops but for the final top-k. A shared MLP added to the routed output (checked by running it too)
runs as always-chosen experts in the same launches, up to ``SHARED_FUSED_MAX_TOKENS`` tokens; so do shared
experts stacked [S, I, H] and multiplied by batched matmuls, each weighted per token (Inkling's). The router
matmul itself is deepfuse's too (``deepfuse::moe_router``, its operands read as the model holds them, then the
routing kernel) for a static token count: at decode sizes (up to ``routing.ROUTER_MATMUL_MAX_TOKENS`` tokens
and a router weight of at most ``routing.ROUTER_MATMUL_MAX_WEIGHT_BYTES``) one launch split over the hidden
size, past them one tiled on the tensor cores; where on a GPU it times faster than the graph's casts and matmul
followed by the routing kernel. Otherwise the matmul stays with Inductor.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import operator
from typing import Any, Optional, Union

import torch
import torch.fx as fx

from deepfuse.fusion import (RegionBinding, ancestors, checked_once, descendants, escape_reason, post_dominates,
                             region_key, rel_err, replace_region, replace_region_first_traced,
                             replace_region_inline_or_op)
from deepfuse.log import log
from deepfuse.options import Options
from deepfuse.report import Declined, Match, Report, module_path, source_line
from deepfuse.shapes import hint, value
from deepfuse.runtime import autotune
from deepfuse.runtime import ops  # noqa: F401  (registers torch.ops.deepfuse.*)
from deepfuse.runtime.kernels import TRITON_DTYPES, moe as kernel, routing
from deepfuse.passes.linear import is_plain_cast, stored_weight
from deepfuse.passes.quant import weight_side

aten = torch.ops.aten
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu2")
VERIFY_TOKENS = 8  # tokens in the semantic check when the traced size is symbolic


class MoEPass:
    family = "moe"

    def run(self, graph: fx.Graph, options: Options, report: Report) -> int:
        changed = 0
        topks = _final_topks(graph)
        hashed = _hash_routed_ids(graph)  # experts chosen by a token-id table (DeepSeek-V4's first layers)
        stacked = _stacked_expert_weights(graph)  # (before any rewrite takes their products away)
        chosen = set()  # what the top-ks' experts regions hold: their stacked experts are theirs to fuse or decline
        checked = {}  # region key -> what running it found (_verify)
        for topk in topks + hashed:
            found = _experts_region(graph, topk)
            where = (source_line(topk), module_path(topk))
            if isinstance(found, str):
                chosen |= _chosen_by(topk)
                self._decline(report, found, where)
                continue
            region, inputs, out = found
            chosen |= set(region)
            params = _verify(region, inputs, out, checked)
            if isinstance(params, str):
                self._decline(report, params, where)
                continue
            _flatten_ids(graph, inputs)
            params.update(_routing_params(topk) if topk.target == aten.topk.default else
                          {"routing": "a token-id table's experts (hash routing), with Inductor"})
            fp8 = _fp8_experts(inputs)
            if params.get("input_weighted") and (fp8 is not None or options.expert_parallel and _distributed()):
                self._decline(report, "routing weights that scale the experts' input run with float experts on "
                              "one device only (not FP8 ones, not expert parallel)", where)
                continue
            act_quant = params.pop("act_quant")
            if fp8 is not None and "ungated" in params:
                self._decline(report, "ungated experts over FP8 weights are not fused (the FP8 kernels are gated)",
                              where)
                continue
            if fp8 is not None:
                params["act_quant"] = act_quant
            elif act_quant:
                self._decline(report, "the experts quantize their activations to FP8 but their weights are not FP8 "
                              "in 128 x 128 blocks (read through deepfuse::fp8_block_dequantize)", where)
                continue
            device = value(out).device.type
            impl = options.kernel_impl(device)
            params["deterministic"] = options.deterministic
            op_name = "deepfuse::moe_experts"
            if options.expert_parallel and _distributed():
                reason = ("FP8 experts are not sharded over ranks (expert parallel runs float experts)"
                          if fp8 is not None else
                          "experts with biases, interleaved gate/up rows, a clamped gated unit or no gate are not "
                          "sharded over ranks" if _gpt_oss_form(params) or params["activation"] not in ACTIVATIONS
                          or "ungated" in params else None)
                reason = reason or self._rewrite_expert_parallel(graph, region, inputs, out, params, impl,
                                                       options.micro_batches, options.expert_parallel_exchange)
                if reason:
                    self._decline(report, reason, where)
                    continue
                op_name = "deepfuse::moe_experts_ep"
                kernel_file = (str(kernel.kernels_for(value(inputs["x"]).dtype, params["activation"],
                                                      f"{where[1] or '?'} ({where[0]})").path)
                               if impl != "reference" else None)
            else:
                considered = set()  # stacked shared experts' batched matmuls, fused or not: this top-k's
                shared = (_shared_experts(graph, out, inputs, params, fp8 is not None and act_quant, considered)
                          if not _gpt_oss_form(params) else None)  # (GPT-OSS has no shared MLP)
                chosen |= considered
                if isinstance(shared, dict) and params.get("input_weighted"):
                    shared = "the routing weights scale the experts' input: only the routed experts join the launches"
                kernel_file = False
                if fp8 is not None:
                    if isinstance(shared, dict) and "scales" not in shared:
                        shared = ("float shared experts do not join the FP8 experts' launches"
                                  if act_quant else "the routed experts are W8A16: shared experts join only W8A8 ones")
                    if isinstance(shared, dict):
                        kernel_file = self._rewrite_fp8(graph, region, inputs, out, params, impl, where,
                                                        options.inline, fp8, shared)
                        params["shared_experts"] = (
                            f"fused: {shared['count']} always-chosen FP8 experts of {params['intermediate']}"
                            + (f", weighted per token by {shared['scale'].name}" if shared["scale"] is not None else "")
                            if kernel_file is not False else "with Inductor (the fused launch could not be traced in)")
                        shared = None
                    if kernel_file is False:
                        kernel_file = self._rewrite_fp8(graph, region, inputs, out, params, impl, where,
                                                        options.inline, fp8)
                    acts = ("quantized per row and 128-wide tile (W8A8)" if params["act_quant"]
                            else "as they are (W8A16)")
                    params["expert_weights"] = (f"fp8-block: read as stored (128 x 128 block scales), activations "
                                                f"{acts}" if kernel_file is not False else
                                                "dequantized from fp8 (the FP8 launch could not be traced in)")
                if isinstance(shared, dict):
                    kernel_file = self._rewrite(graph, list(region) + shared["region"], inputs, shared["out"],
                                                params, impl, where, options.inline, shared)
                    params["shared_experts"] = (f"fused: {shared['count']} always-chosen experts of "
                                                f"{params['intermediate']}{_shared_form(shared)}"
                                                if kernel_file is not False else
                                                "with Inductor (the fused launch could not be traced in)")
                elif shared is not None:
                    params["shared_experts"] = f"with Inductor ({shared})"
                if kernel_file is False:
                    kernel_file = self._rewrite(graph, region, inputs, out, params, impl, where, options.inline)
                if kernel_file is False:  # no form of the launch could be traced in
                    self._decline(report, "the experts launch could not be traced into the graph", where)
                    continue
            if params.get("input_weighted") is not None:
                params["routing_weights"] = (f"scale the experts' input ({params.pop('input_weighted')}); the model "
                                             "runs every expert densely, here only the chosen ones")
            if topk.target == aten.topk.default:
                params.update(self._rewrite_routing(graph, topk, inputs["weights"], inputs["ids"], impl,
                                                    options.inline, where))
            report.matches.append(Match(self.family, op_name, params, *where, impl=impl, kernel_file=kernel_file))
            log.info("matched moe -> deepfuse::moe_experts [%s] at %s (%s) %s", impl, where[1] or "?", where[0], params)
            changed += 1
        # Stacked experts no top-k chooses are not fused: explain says so, not nothing.
        modules = set()
        for weight, user in stacked:
            if user in chosen or module_path(user) in modules:
                continue  # one line per experts module
            modules.add(module_path(user))
            self._decline(report, f"stacked expert weights {weight.name} {list(value(weight).shape)} are multiplied, "
                          "but no torch.topk in this graph chooses their experts: the matcher starts at the router's "
                          "top-k or a token-id table's lookup (a router across a graph break, or one choosing by "
                          "other means as PhiMoE's sparsemixer, is not recognized; experts every token runs through, "
                          "as Inkling's stacked shared experts, stay with Inductor)",
                          (source_line(user), module_path(user)))
        return changed

    def _decline(self, report, reason, where):
        report.declined.append(Declined(self.family, reason, *where))
        log.info("declined moe at %s (%s): %s", where[1] or "?", where[0], reason)

    def _rewrite_routing(self, graph, topk, weights, ids, impl, inline, where) -> dict[str, Any]:
        """The router, from its logits to the experts' (weights, ids), as one generated kernel once it is checked
        to compute a ``RoutingSpec``; failing that its top-k alone. Returns explain's routing parameters, with
        ``routing``: "kernel: <what it computes>", or what runs it instead and why."""
        if impl == "reference":
            return {"routing": "aten (reference kernels)"}
        found = _routing_region(topk, weights, ids)
        checked = _verify_routing(*found, weights, ids) if not isinstance(found, str) else found
        if isinstance(checked, str):
            log.info("moe routing at %s (%s) stays unfused but for its top-k: %s", where[1] or "?", where[0], checked)
            return {"routing": f"{self._rewrite_router_topk(graph, topk, impl, inline, where)} ({checked})"}
        region, logits, _ = found
        spec, bias, expert_scale = checked

        def flat(vector):  # the kernels take [E]: a [1, E] (Ernie 4.5's bias) viewed as [E]
            if vector is None or value(vector).dim() == 1:
                return vector
            with graph.inserting_before(logits):
                node = graph.call_function(aten.view.default, (vector, [value(vector).shape[-1]]))
            node.meta["val"] = value(vector).reshape(-1)
            return node

        bias, expert_scale = flat(bias), flat(expert_scale)
        vectors = tuple(v for v in (bias, expert_scale) if v is not None)

        def split(rest):  # (bias, expert scale) from the launchers' trailing tensors
            rest = list(rest)
            return (rest.pop(0) if bias is not None else None), (rest.pop(0) if expert_scale is not None else None)
        out_dtype = value(weights).dtype
        origin = f"{where[1] or '?'} ({where[0]})"
        spec_args = (spec.top_k, spec.scoring, spec.groups, spec.topk_group, spec.group_score, spec.fill,
                     spec.renormalize, spec.scale, out_dtype, impl)
        matmul = _router_matmul(logits, region)
        if isinstance(matmul, dict) and impl == "triton" and not _fused_router_wins(matmul, logits, bias, spec,
                                                                                    out_dtype, origin, expert_scale):
            matmul = "the graph's matmul then the routing kernel timed faster on this GPU"
        if isinstance(matmul, dict):  # the logits' matmul in deepfuse's launches
            region = list(region) + matmul["nodes"]
            mm_dtype = value(logits).dtype
            args = (matmul["x"], matmul["w"]) + vectors

            def launcher(x_, w_, *rest):
                bias_, scale_ = split(rest)
                return routing.route_hidden(x_, w_, bias_, spec, out_dtype, mm_dtype, origin=origin,
                                            expert_scale=scale_)

            op = torch.ops.deepfuse.moe_router.default

            def op_args():
                return (matmul["x"], matmul["w"], bias, mm_dtype, *spec_args) + (
                    (expert_scale,) if expert_scale is not None else ())
        else:
            args = (logits,) + vectors

            def launcher(logits_, *rest):
                bias_, scale_ = split(rest)
                return routing.route(logits_, bias_, spec, out_dtype, origin=origin, expert_scale=scale_)

            op = torch.ops.deepfuse.moe_routing.default

            def op_args():
                return (logits, bias, *spec_args) + ((expert_scale,) if expert_scale is not None else ())
        binding = RegionBinding(region, [weights, ids])
        if impl == "triton" and inline:
            replace_region_inline_or_op(graph, binding, launcher, args, op, op_args, 2)
        else:
            replace_region(graph, binding, op, op_args(), 2)
        return {"routing": f"kernel: {spec.describe()}",
                "router_matmul": _router_matmul_form(matmul, value(logits)),
                "renormalize": spec.renormalize,
                "routed_scaling": spec.scale, **({"groups": f"best {spec.topk_group} of {spec.groups}"}
                                                 if spec.groups > 1 else {})}

    @staticmethod
    def _rewrite_router_topk(graph, topk, impl, inline, where) -> str:
        """The router's final top-k as one generated kernel (aten launches two). Returns what runs it: "top-k
        kernel", or "aten" and why not."""
        scores, k = topk.args[0], topk.args[1]
        dim = topk.args[2] if len(topk.args) > 2 else topk.kwargs.get("dim", -1)
        largest = topk.args[3] if len(topk.args) > 3 else topk.kwargs.get("largest", True)
        sv = value(scores)
        if impl == "reference":
            return "aten (reference kernels)"
        if sv is None or sv.dim() != 2 or dim not in (-1, 1) or largest is not True or not isinstance(k, int):
            return "aten (not a largest-k over the last dim of [tokens, experts])"
        e = sv.shape[-1]
        if not isinstance(e, int) or e > kernel.ROUTER_TOPK_MAX_EXPERTS or sv.dtype not in TRITON_DTYPES:
            return f"aten ({e} experts in {sv.dtype}: the kernel takes up to {kernel.ROUTER_TOPK_MAX_EXPERTS}, fp16/bf16/fp32)"
        outs = []
        for i in (0, 1):  # both outputs, in the op's order (a missing one is made, and left unused)
            g = _getitem(topk, i)
            if g is None:
                with graph.inserting_after(topk):
                    g = graph.call_function(operator.getitem, (topk, i))
                g.meta["val"] = topk.meta["val"][i]
            outs.append(g)
        binding = RegionBinding([topk, *outs], outs)
        origin = f"{where[1] or '?'} ({where[0]})"

        def launcher(s_):
            return kernel.router_topk(s_, k, origin=origin)

        op = torch.ops.deepfuse.router_topk.default
        if impl == "triton" and inline:
            replace_region_inline_or_op(graph, binding, launcher, (scores,), op, lambda: (scores, k, impl), 2)
        else:
            replace_region(graph, binding, op, (scores, k, impl), 2)
        return "top-k kernel"

    @staticmethod
    def _op_args(graph, out, x, ids, weights, w1, w2, params, impl, biases=(None, None)) -> tuple:
        """Arguments of ``deepfuse::moe_experts``, which takes the canonical layouts (transposed views are free)."""
        with graph.inserting_before(out):
            # (a permute: Inductor lowers the decomposed graph, where aten.transpose has no lowering of its own)
            a = graph.call_function(aten.permute.default, (w1, [0, 2, 1])) if params["gate_up_transposed"] else w1
            b = graph.call_function(aten.permute.default, (w2, [0, 2, 1])) if params["down_transposed"] else w2
        for node, src in ((a, w1), (b, w2)):
            if node is not src:
                node.meta["val"] = value(src).transpose(1, 2)
        args = (x, ids, weights, a, b, params["activation"], value(out).dtype, impl, params["deterministic"])
        given = {"gate_up_bias": biases[0], "down_bias": biases[1], "interleaved": "gate_up_rows" in params,
                 "gated": "ungated" not in params}
        if biases[0] is None and not given["interleaved"] and given["gated"]:
            return args
        # the op's later arguments up to the last given one, by name: the others (shared MLP, FP8) at their defaults
        schema = torch.ops.deepfuse.moe_experts.default._schema.arguments
        last = max(i for i, a in enumerate(schema) if a.name in given)
        return args + tuple(given.get(a.name, a.default_value) for a in schema[len(args):last + 1])

    def _rewrite(self, graph, region, inputs, out, params, impl, where, inline, shared=None):
        """The kernel file (None for the reference); False if the region with shared experts could not be
        traced in (the graph is then untouched)."""
        x, ids, weights, w1, w2 = (inputs[k] for k in ("x", "ids", "weights", "w_gate_up", "w_down"))
        act, t1, t2 = params["activation"], params["gate_up_transposed"], params["down_transposed"]
        biases, interleaved = (inputs.get("b_gate_up"), inputs.get("b_down")), "gate_up_rows" in params
        gated = "ungated" not in params
        out_dtype = value(out).dtype
        origin = f"{where[1] or '?'} ({where[0]})"
        xv = value(x)
        gen = (kernel.kernels_for(xv.dtype, act, origin, shared=shared is not None, biases=biases[0] is not None,
                                  gated=gated) if impl != "reference" else None)
        binding = RegionBinding(region, out)
        config = None
        if impl == "triton" and inline:
            from torch._subclasses.fake_tensor import unset_fake_temporarily

            scaled = params.get("input_weighted") is not None  # launched over T * k rows, each its own token
            with unset_fake_temporarily():
                config = kernel.tune(hint(xv.shape[0]) * (params["top_k"] if scaled else 1), params["hidden"],
                                     params["intermediate"], params["experts"], 1 if scaled else params["top_k"],
                                     xv.dtype, xv.device, act, shared["count"] if shared is not None else 0,
                                     transposed=(t1, t2), biases=biases[0] is not None, interleaved=interleaved,
                                     gated=gated)

        if shared is not None:
            flips = shared["transposed"]

            def canonical(a, b, g, u, d):
                if "fused" in shared:  # gate and up are the halves of one weight
                    g, u = fused_halves(g, flips["gate"], shared["fused"])
                if not gated:  # (ungated: the gate slot holds the up weight again, never read)
                    g = None
                return (a.transpose(1, 2) if t1 else a, b.transpose(1, 2) if t2 else b,
                        *(m.transpose(-1, -2) if m is not None and flips[n] else m
                          for n, m in zip(("gate", "up", "down"), (g, u, d))))

            def factor(scale):  # per token, or per token and stacked shared expert
                return None if scale is None else scale if shared.get("stacked") else scale.reshape(-1)

            def via_kernel(x_, ids_, w_, a, b, g, u, d, like, scale=None):  # like: a value of the sum's shape
                a, b, g, u, d = canonical(a, b, g, u, d)
                w_ = _routed_scaled(w_, shared)
                y = kernel.moe_experts(x_, ids_, w_, a, b, act, config=config, deterministic=params["deterministic"],
                                       shared=(g, u, d), shared_scale=factor(scale), gated=gated)
                return (y.to(out_dtype).view(like.shape),)

            def via_op(x_, ids_, w_, a, b, g, u, d, like, scale=None):
                a, b, g, u, d = canonical(a, b, g, u, d)
                w_ = _routed_scaled(w_, shared)
                y = torch.ops.deepfuse.moe_experts(x_, ids_, w_, a, b, act, out_dtype, impl, params["deterministic"],
                                                   g, u, d, factor(scale),
                                                   **({} if gated else {"gated": False}))
                return (y.view(like.shape),)

            gate = shared["gate"] if gated else shared["up"]
            args = (x, ids, weights, w1, w2, gate, shared["up"], shared["down"], shared["like"]) + (
                (shared["scale"],) if shared["scale"] is not None else ())
            launchers = ([via_kernel] if impl == "triton" and inline else []) + [via_op]
            if not replace_region_first_traced(graph, binding, launchers, args, "MoE with shared experts"):
                return False
        elif params.get("input_weighted") is not None:
            scale, deterministic = params["input_weighted"], params["deterministic"]

            def via_kernel(x_, ids_, w_, a, b):
                a, b = (a.transpose(1, 2) if t1 else a), (b.transpose(1, 2) if t2 else b)
                return (input_weighted(kernel.moe_experts, x_, ids_, w_, scale, a, b, act, config=config,
                                       deterministic=deterministic).to(out_dtype),)

            def via_op(x_, ids_, w_, a, b):
                a, b = (a.transpose(1, 2) if t1 else a), (b.transpose(1, 2) if t2 else b)
                op = torch.ops.deepfuse.moe_experts
                return (input_weighted(lambda *ins: op(*ins, act, out_dtype, impl, deterministic), x_, ids_, w_, scale,
                                       a, b).to(out_dtype),)

            launchers = ([via_kernel] if impl == "triton" and inline else []) + [via_op]
            if not replace_region_first_traced(graph, binding, launchers, (x, ids, weights, w1, w2),
                                               "MoE whose routing weights scale its input"):
                return False
        elif impl == "triton" and inline:
            def launcher(x_, ids_, w_, a, b, *bias):
                a = a.transpose(1, 2) if t1 else a
                b = b.transpose(1, 2) if t2 else b
                return (kernel.moe_experts(x_, ids_, w_, a, b, act, config=config,
                                           deterministic=params["deterministic"], biases=bias or None,
                                           interleaved=interleaved, gated=gated).to(out_dtype),)

            held = tuple(b for b in biases if b is not None)
            replace_region_inline_or_op(graph, binding, launcher, (x, ids, weights, w1, w2, *held),
                                        torch.ops.deepfuse.moe_experts.default,
                                        lambda: self._op_args(graph, out, x, ids, weights, w1, w2, params, impl,
                                                              biases), 1)
        else:
            op_args = self._op_args(graph, out, x, ids, weights, w1, w2, params, impl, biases)
            replace_region(graph, binding, torch.ops.deepfuse.moe_experts.default, op_args, 1)
        return str(gen.path) if gen is not None else None


    def _rewrite_fp8(self, graph, region, inputs, out, params, impl, where, inline, fp8, shared=None):
        """The routed experts over FP8 weights read as stored (``fp8``: their (weight, scale) nodes, those of the
        graph's ``fp8_block_dequantize``), with an FP8 ``shared`` MLP in the same launches when given: the kernel
        file (None for the reference), or False if it could not be traced in."""
        (q1, s1), (q2, s2) = fp8
        x, ids, weights = (inputs[k] for k in ("x", "ids", "weights"))
        act, t1, t2 = params["activation"], params["gate_up_transposed"], params["down_transposed"]
        out_dtype = value(shared["out"] if shared is not None else out).dtype  # what the replaced region returns
        origin = f"{where[1] or '?'} ({where[0]})"
        act_quant = params["act_quant"]
        gen = (kernel.kernels_for(value(x).dtype, act, origin, shared=shared is not None,
                                  weight_format="fp8-block" if act_quant else "fp8-block-weight")
               if impl != "reference" else None)

        config = None
        if impl == "triton" and inline:
            from torch._subclasses.fake_tensor import unset_fake_temporarily

            xv = value(x)
            with unset_fake_temporarily():
                config = kernel.tune(hint(xv.shape[0]), params["hidden"], params["intermediate"], params["experts"],
                                     params["top_k"], xv.dtype, xv.device, act,
                                     shared["count"] if shared is not None else 0,
                                     weight_format="fp8-block" if act_quant else "fp8-block-weight",
                                     transposed=(t1, t2))

        def canonical(q1_, s1_, q2_, s2_):  # the scale blocks transpose with their weights
            flip = lambda t, f: t.transpose(1, 2) if f else t  # noqa: E731
            return flip(q1_, t1), flip(s1_, t1), flip(q2_, t2), flip(s2_, t2)

        def shared_parts(rest):  # (gate, up, down), their scales, what the sum's shape is read off, the factor
            if not rest:
                return None, None, None, None
            return rest[0:6:2], rest[1:6:2], rest[6], (rest[7].reshape(-1) if len(rest) > 7 else None)

        def via_kernel(x_, ids_, w_, q1_, s1_, q2_, s2_, *rest):
            a, sa, b, sb = canonical(q1_, s1_, q2_, s2_)
            sh, sh_scales, like, factor = shared_parts(rest)
            w_ = _routed_scaled(w_, shared)
            y = kernel.moe_experts(x_, ids_, w_, a, b, act, config=config, deterministic=params["deterministic"],
                                   weight_scales=(sa, sb), act_quant=act_quant, shared=sh, shared_scales=sh_scales,
                                   shared_scale=factor).to(out_dtype)
            return (y if like is None else y.view(like.shape),)

        def via_op(x_, ids_, w_, q1_, s1_, q2_, s2_, *rest):
            a, sa, b, sb = canonical(q1_, s1_, q2_, s2_)
            sh, sh_scales, like, factor = shared_parts(rest)
            w_ = _routed_scaled(w_, shared)
            y = torch.ops.deepfuse.moe_experts(x_, ids_, w_, a, b, act, out_dtype, impl, params["deterministic"],
                                               *(sh or (None,) * 3), factor, sa, sb, act_quant,
                                               *(sh_scales or (None,) * 3))
            return (y if like is None else y.view(like.shape),)

        args, binding, what = (x, ids, weights, q1, s1, q2, s2), RegionBinding(region, out), "FP8 MoE experts"
        if shared is not None:
            args += tuple(n for role in ("gate", "up", "down") for n in (shared[role], shared["scales"][role]))
            args += (shared["like"],) + ((shared["scale"],) if shared["scale"] is not None else ())
            binding, what = RegionBinding(list(region) + shared["region"], shared["out"]), "FP8 MoE with shared experts"
        launchers = ([via_kernel] if impl == "triton" and inline else []) + [via_op]
        if not replace_region_first_traced(graph, binding, launchers, args, what):
            return False
        return str(gen.path) if gen is not None else None

    def _rewrite_expert_parallel(self, graph, region, inputs, out, params, impl, micro_batches,
                                 exchange) -> Optional[str]:
        """Shard the layer's real expert parameters over the ranks (this rank keeps its share, the full tensors
        are freed) and call ``deepfuse::moe_experts_ep``. Returns None, or the reason it cannot."""
        from deepfuse.pipeline import bind_per_call, input_position, real_input
        from deepfuse.runtime import expert_parallel as ep

        x, ids, weights, w1, w2 = (inputs[k] for k in ("x", "ids", "weights", "w_gate_up", "w_down"))
        positions = input_position(w1), input_position(w2)
        if None in positions:
            return "expert parallel: the expert weights are not parameters this compile can shard"
        t1, t2 = params["gate_up_transposed"], params["down_transposed"]

        def shard_of(gate_up, down):  # (a layer's weights are sharded, and freed, the first time it runs)
            return ep.shard_parameters(gate_up, down, gate_up.transpose(1, 2) if t1 else gate_up,
                                       down.transpose(1, 2) if t2 else down)
        try:
            key, shard = shard_of(real_input(w1), real_input(w2))
        except Exception as err:  # experts that do not divide over the ranks, say
            return f"expert parallel: {err}"
        slot = ep.new_slot(key)
        bind_per_call(lambda args: ep.set_slot(slot, shard_of(args[positions[0]], args[positions[1]])[0]))
        params["expert_parallel"] = f"rank {shard.rank}/{shard.world}: experts {shard.first}..{shard.first + shard.local - 1}"
        if micro_batches > 1:
            params["micro_batches"] = micro_batches
        if exchange != "splits":
            params["exchange"] = exchange
        op_args = (x, ids, weights, slot, params["activation"], value(out).dtype, impl, params["deterministic"],
                   micro_batches, exchange)
        replace_region(graph, RegionBinding(region, out), torch.ops.deepfuse.moe_experts_ep.default, op_args, 1)
        return None


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# -- finding the region ---------------------------------------------------------------------------------------


def _router(topk: fx.Node) -> set[fx.Node]:
    """The router of a top-k: the nodes between the router matmul(s) and it (group selection included)."""
    seen, stack = {topk}, [topk]
    while stack:
        n = stack.pop()
        if n is not topk and n.target in (aten.mm.default, aten.addmm.default, aten.bmm.default):
            continue  # the router logits: where the router begins
        for a in n.all_input_nodes:
            if a not in seen and a.op != "placeholder":
                seen.add(a)
                stack.append(a)
    return seen


def _flatten_ids(graph: fx.Graph, inputs: dict) -> None:
    """A router that chose before its tokens were flattened hands the experts [B, S, k] ids: the kernels (and the
    routing kernel, whose outputs they then are) take them as [T, k], viewed so once."""
    ids = inputs["ids"]
    if value(ids).dim() == 2:
        return
    k = value(ids).shape[-1]
    with graph.inserting_after(ids):
        flat = graph.call_function(aten.view.default, (ids, [-1, k]))
    flat.meta["val"] = value(ids).reshape(-1, k)
    inputs["ids"] = flat


def _chooses_among_weight_rows(topk: fx.Node) -> bool:
    """Does the top-k choose among the rows of a weight the model holds: is its last dim the output width of a
    router matmul with a stored weight ([tokens, H] x [H, E]), as a router's is and an indexer's q . k is not?"""
    e = hint(value(topk.args[0]).shape[-1])
    return any(n.target in (aten.mm.default, aten.addmm.default) and stored_weight(n.args[-1]) is not None
               and hint(value(n).shape[-1]) == e for n in _router(topk))


def _final_topks(graph: fx.Graph) -> list[fx.Node]:
    """The experts top-k of each router (a group-limited router first takes a top-k over groups)."""
    topks = [n for n in graph.nodes if n.target == aten.topk.default]
    inner = {t for other in topks for t in _router(other) if t is not other and t.target == aten.topk.default}
    return [t for t in topks if t not in inner]


_EXPERT_PRODUCTS = (aten.bmm.default, aten.index.Tensor, aten.index_select.default)  # batched, or experts gathered


def _stacked_expert_weights(graph: fx.Graph) -> list[tuple[fx.Node, fx.Node]]:
    """(weight, the node that multiplies or indexes it) for each 3-D float or FP8 tensor the graph holds (a
    placeholder or attribute of [experts, rows, cols], E >= 2) that reaches a batched or grouped matmul (any
    grouped_mm op: transformers has its own on the CPU) or an expert gather, through casts and transposes that keep
    the experts' dim: what stacked expert weights look like. At most one entry per weight."""
    grouped = getattr(aten, "_grouped_mm", None)
    products = _EXPERT_PRODUCTS + ((grouped.default,) if grouped is not None else ())
    dequantize = getattr(torch.ops.deepfuse, "fp8_block_dequantize", None)
    casts = (torch.ops.prims.convert_element_type.default, aten._to_copy.default) + (
        (dequantize.default,) if dequantize is not None else ())

    def keeps_experts_dim(u: fx.Node) -> bool:  # a cast, or a transpose or permute that leaves dim 0 in place
        if u.target == aten.transpose.int:
            return 0 not in (u.args[1] % 3, u.args[2] % 3)
        if u.target == aten.permute.default:
            return u.args[1][0] % 3 == 0
        return u.target in casts

    found = []
    for w in graph.nodes:
        v = w.meta.get("val")
        if w.op not in ("placeholder", "get_attr") or not isinstance(v, torch.Tensor) or v.dim() != 3 \
                or not (v.dtype.is_floating_point or _is_fp8(w)) or hint(v.shape[0]) < 2:
            continue
        frontier, seen = [w], {w}
        while frontier:
            n = frontier.pop()
            hit = next((u for u in n.users if u.target in products or "grouped_mm" in str(u.target)), None)
            if hit is not None:
                found.append((w, hit))
                break
            for u in n.users:
                if u not in seen and keeps_experts_dim(u):
                    seen.add(u)
                    frontier.append(u)
    return found


def _hash_routed_ids(graph: fx.Graph) -> list[fx.Node]:
    """Expert ids read from a table by token id (hash routing, DeepSeek-V4's first layers): an integer [T, k]
    gather of a [vocab, k] integer tensor the model holds, by a [T] integer index, that a router's scores are
    gathered at (the routing weights). They stand where a router's top-k ids would."""
    found = []
    for n in graph.nodes:
        v = n.meta.get("val")
        if n.target != aten.index.Tensor or not isinstance(v, torch.Tensor) or v.dim() != 2 \
                or v.dtype.is_floating_point or v.dtype == torch.bool:
            continue
        table, index = n.args[0], n.args[1][0] if len(n.args[1]) == 1 else None
        tv, iv = value(table), value(index) if isinstance(index, fx.Node) else None
        if table.op not in ("placeholder", "get_attr") or tv is None or tv.dim() != 2 or tv.dtype.is_floating_point \
                or iv is None or iv.dim() != 1 or iv.dtype.is_floating_point:
            continue
        if any(u.target == aten.gather.default and u.args[2] is n and _router_hidden(u) is not None for u in n.users):
            found.append(n)
    return found


def _topk_ids(anchor: fx.Node) -> Optional[fx.Node]:
    """The expert ids of an anchor: a top-k's indices, or a hash router's ids themselves."""
    return _getitem(anchor, 1) if anchor.target == aten.topk.default else anchor


def _chosen_by(topk: fx.Node) -> set[fx.Node]:
    """What a top-k's expert ids reach up to the first [..., hidden] values on the way (the hidden states the
    experts' sum joins, not gone through): the gathers and grouped products of the experts it chooses where its
    experts region could not be found, and not those of later layers."""
    ids, hidden = _topk_ids(topk), _router_hidden(topk)
    if ids is None:
        return set()
    return _reached(ids, lambda val: val.dtype.is_floating_point and hint(val.shape[-1]) == hidden)


def _reached(start: fx.Node, stops) -> set[fx.Node]:
    """Every node downstream of ``start`` on paths that go through no node whose value ``stops`` (a predicate on
    values of one dim or more): those are reached, not gone through."""
    seen, stack = set(), [start]
    while stack:
        for u in stack.pop().users:
            if u in seen:
                continue
            seen.add(u)
            val = value(u)
            if not (val is not None and val.dim() >= 1 and stops(val)):
                stack.append(u)
    return seen


def _getitem(node: fx.Node, i: int) -> Optional[fx.Node]:
    return next((u for u in node.users if u.target is operator.getitem and u.args[1] == i), None)


def _experts_region(graph: fx.Graph, topk: fx.Node):
    """The experts region a router's top-k (or a hash router's ids) chooses for: (region, inputs, out), or why
    none is found."""
    ids = _topk_ids(topk)
    scores = value(topk.args[0]) if topk.target == aten.topk.default else value(ids)
    if ids is None:
        return "a top-k whose indices nothing reads: no experts follow it"
    dim = (topk.args[2] if len(topk.args) > 2 else topk.kwargs.get("dim", -1)) if topk.target == aten.topk.default \
        else -1
    if scores is None or scores.dim() < 2 or dim not in (-1, scores.dim() - 1):
        shape = list(scores.shape) if scores is not None else "?"
        return f"a top-k over {shape}, not over the last dim of [tokens, experts] scores: no router's"
    if scores.dim() > 2 and not _chooses_among_weight_rows(topk):
        return (f"a top-k over {list(scores.shape)}, not over a router matmul's [..., experts] output (an attention "
                "indexer's, say): no experts follow it")
    # a router may choose before its tokens are flattened ([batch, seq, experts]): its tokens are the leading dims
    *lead, k = value(ids).shape
    t = math.prod(lead)
    hidden = _router_hidden(topk)
    if hidden is None:
        e = hint(scores.shape[-1])
        if any(a.op == "placeholder" and value(a) is not None and value(a).dtype.is_floating_point
               and hint(value(a).shape[-1]) == e for n in _router(topk) for a in n.all_input_nodes):
            return ("the router's logits are an input of this graph (computed outside it: before a Dynamo graph "
                    "break, or passed in): the top-k cannot be tied to the hidden states the experts read")
        return "the top-k scores do not come from a router matmul over the hidden states"
    down = descendants([topk])
    out = _post_dominator(graph, topk, down, t, hidden)
    if out is None:
        reached = _reached(topk, lambda val: hint(val.shape[-1]) == hidden)
        if any(n.op == "output" for n in reached):
            floats = [value(n) for n in reached if n.op != "output" and value(n) is not None and value(n).dim() >= 1
                      and value(n).dtype.is_floating_point]
            if any(hint(v.shape[-1]) == hidden for v in floats):  # experts here, and the routing returned
                return ("the router's top-k results are also outputs of this graph (returned to the caller, or read "
                        "after a graph break): the experts region has no single output to replace")
            return _graph_break_reason()
        return "no [tokens, hidden] value that every path from the router passes through"
    order = {n: i for i, n in enumerate(graph.nodes)}
    found = _ids_within_experts(topk, _region_to(topk, ids, t, k, down, out, order))
    if isinstance(found, str):
        # Experts over a latent (Nemotron-3-Super's: x projected to a narrower width before them, their sum
        # projected back after): the region to the first [tokens, width] value the router's paths all pass
        # through at another width, when that one takes in experts the check can then run.
        for latent in _post_dominators(graph, topk, down, t, exclude=hidden):
            at_latent = _ids_within_experts(topk, _region_to(topk, ids, t, k, down, latent, order))
            if not isinstance(at_latent, str) and hint(value(at_latent[1]["x"]).shape[1]) == hint(
                    value(latent).shape[1]):
                return at_latent
        # The routed experts' own sum, where the router's paths meet only later, past other work its choice
        # steers (Inkling's shared experts, weighted by the router's logits beside the chosen ones): the region
        # to an earlier [tokens, hidden] value, the first that is the output of experts; what it computes is
        # then checked by running it, and the rest stays with Inductor.
        for earlier in sorted(down, key=order.__getitem__):
            if order[earlier] >= order[out] or not _is(earlier, (t, hidden), floating=True):
                continue
            region = _region_to(topk, ids, t, k, down, earlier, order)
            at_earlier = _ids_within_experts(topk, region)
            if not isinstance(at_earlier, str):
                return at_earlier
            if not isinstance(region, str):  # experts there, but not to be fused: that reason, not the first one
                return at_earlier
    return found


def _ids_within_experts(topk: fx.Node, found):
    """``found`` (a region, or why none), unless the router's top-k chooses among more ids than the region has
    experts: the kernels index the experts' weights by those ids, and the check by running draws ids below the
    expert count only, so ids past it (LongCat-Flash's zero-computation experts, which return their input) would
    read past the weights instead of computing what the graph does."""
    if isinstance(found, str) or topk.target != aten.topk.default:  # (a hash router's ids come from its table)
        return found
    choices, experts = hint(value(topk.args[0]).shape[-1]), hint(value(found[1]["mats"][0]).shape[0])
    if choices > experts:
        return (f"the router chooses among {choices} ids, more than the {experts} experts the region reads (experts "
                "that compute nothing, returning their input?)")
    return found


def _region_to(topk, ids, t, k, down, out, order: dict):
    """``_experts_region`` once its output ``out`` is chosen (``order``: the graph's nodes by position)."""
    upstream = ancestors([out])
    candidates = [n for n in down & upstream if n is not out]
    # The routing weights: the last [T, k] float value on the way (after gather / renormalize / scale).
    weights = [n for n in candidates if _is(n, (t, k), floating=True)]
    if not weights:
        return "no [tokens, k] routing weights flow into the experts"
    weights = max(weights, key=order.__getitem__)
    routing = ancestors([weights])
    region = {n for n in candidates if n not in routing} | {out}
    region.discard(ids)
    # Pull in what only the region uses (weight transposes, gathers of x, index arithmetic).
    grew = True
    while grew:
        grew = False
        for n in list(region):
            for a in n.all_input_nodes:
                if a in region or a in (ids, weights) or a.op in ("placeholder", "get_attr") or _is_dequantized(a):
                    continue  # a dequantized weight is an input, as the stored weight would be
                if a in routing:
                    continue
                if all(u in region for u in a.users) and (not _is_x_like(a, t) or _is_fill(a)):
                    region.add(a)  # (a fill is made from sizes alone: Llama 4's -inf scores before the scatter)
                    grew = True
    region = sorted(region, key=order.__getitem__)
    reason = escape_reason(region, [out])
    if reason:
        return reason
    boundary = []
    for n in region:
        for a in n.all_input_nodes:
            if a not in region and a not in boundary:
                boundary.append(a)
    return _classify(boundary, ids, weights, t, k, region, out)


def _router_hidden(topk: fx.Node) -> Optional[int]:
    """H, read off the router's [T, H] x [H, E] matmul (a hash router's: the one whose scores its ids gather)."""
    starts = [topk] if topk.target != aten.index.Tensor else [u for u in topk.users if u.target == aten.gather.default]
    for n in set().union(*(_router(start) for start in starts)):
        if n.target in (aten.mm.default, aten.addmm.default):
            a = value(n.args[-2])
            if a is not None and a.dim() == 2:
                return hint(a.shape[1])
    return None


def _graph_break_reason() -> str:
    """Why experts after a graph break are not fused, and what makes them trace."""
    from deepfuse.canonical import hf_experts_traced_whole

    broken = ("the router's top-k leaves this graph: the experts run after a Dynamo graph break (a per-expert "
              "Python loop?). ")
    if hf_experts_traced_whole():  # so this loop is the model's own, which no setting changes
        return broken + (
            "It is not a transformers experts module (those deepfuse traces whole, whatever their "
            "experts_implementation): write the experts over stacked weights, each token's k experts gathered "
            "(or tokens sorted by expert into torch._grouped_mm), and deepfuse fuses them")
    return broken + (
        "Hugging Face experts modules are traced whole by deepfuse's canonical form; for an older transformers "
        "set model.config._experts_implementation = 'grouped_mm' (or pass experts_implementation='grouped_mm' "
        "to from_pretrained)")


def _post_dominator(graph, topk, down, t, hidden) -> Optional[fx.Node]:
    """The first [t, hidden] float value every path from ``topk`` to the outputs passes through."""
    return next(_post_dominators(graph, topk, down, t, hidden=hidden), None)


def _post_dominators(graph, topk, down, t, hidden=None, exclude=None):
    """The [t, width] float values every path from ``topk`` to the outputs passes through, in graph order: of
    width ``hidden`` if given, else of any width but ``exclude``."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    for cand in sorted(down, key=order.__getitem__):
        val = value(cand)
        if val is None or val.dim() != 2 or not val.dtype.is_floating_point or cand is topk:
            continue
        width = hint(val.shape[1])
        if hint(val.shape[0]) != hint(t) or (width != hidden if hidden is not None else width == exclude):
            continue
        if post_dominates(cand, topk):  # every path from the router to the outputs passes through cand
            yield cand


def _is(node, shape, floating) -> bool:
    val = value(node)
    return (val is not None and val.dim() == len(shape) and val.dtype.is_floating_point == floating
            and all(hint(a) == hint(b) for a, b in zip(val.shape, shape)))


def _is_fill(node) -> bool:
    return node.op == "call_function" and node.target in (aten.full.default, aten.zeros.default, aten.ones.default)


def _is_x_like(node, t) -> bool:
    val = value(node)
    return val is not None and val.dim() == 2 and val.dtype.is_floating_point and hint(val.shape[0]) == hint(t)


def _classify(boundary, ids, weights, t, k, region, out):
    inputs: dict[str, Any] = {"ids": None, "weights": None}
    xs, mats, biases, others = [], [], [], []
    for b in boundary:
        val = value(b)
        if b is ids:
            inputs["ids"] = b
        elif b is weights:
            inputs["weights"] = b
        elif isinstance(b.meta.get("val"), (torch.SymInt, int)):
            continue
        elif val is not None and val.dim() == 3 and val.dtype.is_floating_point:
            mats.append(b)
        elif val is not None and val.dim() == 2 and hint(val.shape[0]) == hint(t) and val.dtype.is_floating_point:
            xs.append(b)
        elif val is not None and val.dim() == 2 and val.dtype.is_floating_point and b.op in ("placeholder", "get_attr"):
            biases.append(b)  # [experts, n] held by the model: per-expert biases (GPT-OSS), if the check agrees
        elif val is not None and val.numel() == 1:
            continue  # a scalar (eps, a constant tensor)
        else:
            others.append(b)
    if inputs["ids"] is None or inputs["weights"] is None:
        return "the experts region does not read the router's top-k ids and weights directly"
    if others:
        seen = ", ".join(f"{o.name} {list(value(o).shape) if value(o) is not None else '?'}" for o in others[:3])
        return ("the experts region reads tensors besides the tokens, the router's ids and weights and the [experts, "
                f"rows, cols] weights of a gated MLP (per-expert biases?): {seen}")
    if len(xs) > 1:  # as many tokens as experts: a bias held by the model is no input the router reads
        routing_side = ancestors([ids])
        held = [b for b in xs if b.op in ("placeholder", "get_attr") and b not in routing_side]
        if len(held) < len(xs):
            xs, biases = [b for b in xs if b not in held], biases + held
    if len(xs) != 1:
        return f"the experts region reads {len(xs)} [tokens, hidden] inputs, expected the hidden states alone"
    if len(mats) != 2:
        return f"the experts region reads {len(mats)} stacked weight tensors, expected gate+up and down"
    inputs["x"] = xs[0]
    if hint(value(mats[0]).shape[0]) != hint(value(mats[1]).shape[0]):
        return "expert weights disagree on the number of experts"
    inputs["mats"] = mats
    experts = hint(value(mats[0]).shape[0])
    if len(biases) > 2 or any(hint(value(b).shape[0]) != experts for b in biases):
        seen = ", ".join(f"{b.name} {list(value(b).shape)}" for b in biases[:3])
        return f"the experts region reads 2-D tensors that are not one bias per expert and projection: {seen}"
    inputs["biases"] = biases
    return region, inputs, out


# -- checking what the region computes -------------------------------------------------------------------------


def _layouts(mats, hidden):
    """Every (gate_up, down, gate_up transposed, down transposed, I, gated) the two weight shapes allow: gate+up
    [E, 2I, H] and down [E, H, I], or ungated experts' up [E, I, H] and down (each either way round)."""
    out = []
    for a, b in ((mats[0], mats[1]), (mats[1], mats[0])):
        sa = tuple(hint(d) for d in value(a).shape)
        sb = tuple(hint(d) for d in value(b).shape)
        for t1, t2, gated in itertools.product((False, True), (False, True), (True, False)):
            rows, h1 = (sa[2], sa[1]) if t1 else (sa[1], sa[2])
            h2, i2 = (sb[2], sb[1]) if t2 else (sb[1], sb[2])
            inter = rows // 2 if gated else rows
            if h1 == hidden and h2 == hidden and i2 == inter and (not gated or rows % 2 == 0):
                out.append((a, b, t1, t2, inter, gated))
    return out


def _verify(region, inputs, out, checked: dict) -> Union[dict[str, Any], str]:
    """Run the region on random inputs; accept it if it equals the canonical MoE for one weight layout and
    activation. Random weights of the real shapes: what is checked is the function, not these values. A region
    that computes what one in ``checked`` computed, over inputs of the same shapes (the next identical layer of a
    model compiled whole), takes that check's finding (about 10 s a layer on the CPU at V2-Lite's shapes)."""
    mats, biases = inputs["mats"], inputs.get("biases", [])
    placeholders = [inputs["x"], inputs["ids"], inputs["weights"], mats[0], mats[1], *biases]
    finding = checked_once(checked, region_key(region, placeholders, [out]),
                           lambda: _check(region, inputs, placeholders, out))
    if isinstance(finding, str):
        return finding
    (gate_up, down), t1, t2, inter, gated, act, bias, interleaved, form = finding
    e, k = hint(value(mats[0]).shape[0]), hint(value(inputs["ids"]).shape[-1])
    hidden, dtype = hint(value(inputs["x"]).shape[1]), value(inputs["x"]).dtype
    gate_up, down = mats[gate_up], mats[down]
    bias = bias and tuple(biases[i] for i in bias)
    inputs["w_gate_up"], inputs["w_down"] = gate_up, down
    inputs["b_gate_up"], inputs["b_down"] = bias or (None, None)
    return {"experts": e, "top_k": k, "hidden": hidden, "intermediate": inter, "activation": act,
            "gate_up_transposed": t1, "down_transposed": t2, "dtype": str(dtype).replace("torch.", ""),
            **({} if gated else {"ungated": f"down(act(up(x))), no gate: up {gate_up.name}"}),
            **({"gate_up_rows": "interleaved (gate 0::2, up 1::2)"} if interleaved else {}),
            **({"biases": f"gate/up {bias[0].name}, down {bias[1].name}"} if bias else {}), **form}


def _check(region, inputs, placeholders, out) -> Union[tuple, str]:
    """_verify's check by running: the form the region computes, its nodes written as their places among the
    inputs (so the finding holds for any region of the same key), or why none."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    mats, biases = inputs["mats"], inputs.get("biases", [])
    # Casts to FP8 inside the region: its activations are quantized (an FP8 W8A8 MoE). Then the region must be
    # the MoE with those casts made identities (what it computes apart from the rounding), and, casts and all,
    # the MoE with both projections' inputs quantized per row and 128-wide tile.
    quantized = any(n.op == "call_function" and _is_fp8(n) for n in region)  # (its casts and their views)
    if quantized and biases:
        return "FP8 experts with biases are not fused (the FP8 kernels take no expert biases)"
    modules = _checked_forms(region, placeholders, out, "the experts region", quantized)
    if isinstance(modules, str):
        return modules

    xv, idv, wv = value(inputs["x"]), value(inputs["ids"]), value(inputs["weights"])
    hidden, k = hint(xv.shape[1]), hint(idv.shape[-1])
    e = hint(value(mats[0]).shape[0])
    t = max(hint(xv.shape[0]), 1)
    ids_shape = (t, k) if idv.dim() == 2 else tuple(hint(d) for d in idv.shape)  # (a router's [B, S, k], read as is)
    layouts = _layouts(mats, hidden)
    if not layouts:
        shapes = [tuple(hint(d) for d in value(m).shape) for m in mats]
        return (f"expert weight shapes {shapes} are not gate+up [E, 2I, H] (or an ungated up [E, I, H]) and down "
                "[E, H, I], in either layout")
    device = xv.device
    activations = list(ACTIVATIONS) + _clamped_activations(region)
    with unset_fake_temporarily(), torch.no_grad():
        gen = torch.Generator(device="cpu").manual_seed(1234)
        x = torch.randn(t, hidden, generator=gen).to(device, xv.dtype)
        x = x * _check_scale(region)  # a clamping activation's check: values past its limits too
        ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)]).to(device, idv.dtype)
        weights = torch.rand(t, k, generator=gen).to(device, wv.dtype)
        # The weights are the big draw (about 1 GB at V2-Lite shape): drawn where they live, not copied there.
        weight_gen = gen if device.type == "cpu" else torch.Generator(device=device).manual_seed(1234)
        real = {}
        for m in mats:
            shape = tuple(hint(d) for d in value(m).shape)
            w = torch.randn(shape, generator=weight_gen, device=device, dtype=torch.float32)
            real[m] = (w / hidden ** 0.5).to(value(m).dtype)
        for b in biases:
            real[b] = torch.randn(tuple(hint(d) for d in value(b).shape), generator=gen).to(device, value(b).dtype)
        try:
            got = [m(x, ids.view(ids_shape), weights, *(real[w] for w in mats), *(real[b] for b in biases))[0].float()
                   for m in modules]
        except Exception as err:
            return f"the experts region could not be run for checking: {type(err).__name__}: {str(err)[:120]}"
        tol, quant_tol = _check_tolerances(xv.dtype)
        acc = torch.float64 if device.type == "cpu" else torch.float32

        def found(gate_up, down, t1, t2, inter, gated, act, bias=None, interleaved=False, **form):  # the checked form
            return ((mats.index(gate_up), mats.index(down)), t1, t2, inter, gated, act,
                    bias and tuple(biases.index(b) for b in bias), interleaved, form)

        for gate_up, down, t1, t2, inter, gated in layouts:
            if quantized and not gated:
                continue  # (the FP8 kernels are gated)
            a = real[gate_up].transpose(1, 2) if t1 else real[gate_up]
            b = real[down].transpose(1, 2) if t2 else real[down]
            # biases and interleaved gate/up rows (GPT-OSS) are float forms only, tried after the plain ones
            forms = [(None, False)] if quantized else [
                (bias, interleaved) for interleaved in ((False, True) if gated else (False,))
                for bias in _bias_orders(biases, inter, hidden, gated)]
            acts = [a_ for a_ in (activations if not quantized else ACTIVATIONS) if gated or a_ in ACTIVATIONS]
            for bias, interleaved in forms:
                # the activation nearest the region's, not the first within the tolerance: GELU's erf and tanh
                # forms differ by less than a bf16 check tells apart, and the kernel then computes the other one
                errors = {act: rel_err(got[-1], kernel.reference(
                    x.to(acc), ids, weights.to(acc), a, b, act, biases=bias and tuple(real[n].to(acc) for n in bias),
                    interleaved=interleaved, gated=gated).float()) for act in acts}
                act = min(errors, key=errors.__getitem__)
                if errors[act] >= tol:
                    continue
                if bias or interleaved or act not in ACTIVATIONS or not gated:
                    return found(gate_up, down, t1, t2, inter, gated, act, bias, interleaved, act_quant=False)
                quantized_want = kernel.reference_act_quant(x, ids, weights, a, b, act, acc) if quantized else None
                if quantized and rel_err(got[0], quantized_want.float()) >= quant_tol:
                    return ("the region quantizes activations to FP8, but not both projections' inputs per row "
                            "and 128-wide tile (checked on random inputs)")
                return found(gate_up, down, t1, t2, inter, gated, act, act_quant=quantized)
        if not quantized and not biases:  # the routing weights may scale the experts' input (Llama 4), after a sigmoid
            gated_layouts = [layout for layout in layouts if layout[-1]]
            for (gate_up, down, t1, t2, inter, _), scale in itertools.product(gated_layouts, INPUT_SCALES):
                a = real[gate_up].transpose(1, 2) if t1 else real[gate_up]
                b = real[down].transpose(1, 2) if t2 else real[down]
                errors = {act: rel_err(got[-1], input_weighted(kernel.reference, x.to(acc), ids, weights, scale, a, b,
                                                               act).float()) for act in ACTIVATIONS}
                act = min(errors, key=errors.__getitem__)  # (the nearest, as above)
                if errors[act] < tol:
                    return found(gate_up, down, t1, t2, inter, True, act, act_quant=False, input_weighted=scale)
    return "the region downstream of the router is not the routed-experts computation (checked on random inputs)"


def _gpt_oss_form(params: dict) -> bool:
    """Experts with biases or interleaved gate/up rows: the routed kernels alone run them (no shared MLP in their
    launches, not expert parallel)."""
    return "biases" in params or "gate_up_rows" in params


def _bias_orders(biases: list, inter: int, hidden: int, gated: bool = True) -> list:
    """The (gate/up bias, down bias) pairs the region's [E, n] tensors may be (the first [E, 2I], or [E, I] for
    ungated experts): [None] without any (a region with one bias is not a form the kernels know: no pair)."""
    if not biases:
        return [None]
    if len(biases) != 2:
        return []
    n = [hint(value(b).shape[1]) for b in biases]
    return [(g, d) for g, d, ng, nd in ((biases[0], biases[1], n[0], n[1]), (biases[1], biases[0], n[1], n[0]))
            if ng == (2 if gated else 1) * inter and nd == hidden]


def _clamps(nodes) -> dict[float, list[fx.Node]]:
    """The clamps among the nodes that take a positive, finite upper limit (a clamped gated unit's; a clamp at
    infinity, as a model with no limit set writes it, clamps nothing), by limit."""
    found: dict[float, list[fx.Node]] = {}
    for n in nodes:
        if n.op == "call_function" and n.target in (aten.clamp.default, aten.clamp_max.default):
            top = n.args[2] if n.target == aten.clamp.default and len(n.args) > 2 else (
                n.args[1] if n.target == aten.clamp_max.default else n.kwargs.get("max"))
            if isinstance(top, (int, float)) and 0 < top < math.inf:
                found.setdefault(float(top), []).append(n)
    return found


def _clamp_limits(nodes) -> list[float]:
    """The positive, finite upper limits the nodes' clamps take."""
    return sorted(_clamps(nodes))


def _is_silu(node) -> bool:
    """Is ``node`` SiLU's output: aten.silu, or as decompositions write it, v * sigmoid(v) or v / (1 + exp(-v))?"""
    if not isinstance(node, fx.Node) or node.op != "call_function" or len(node.args) < 1:
        return False
    if node.target in (aten.silu.default, aten.silu_.default):
        return True
    if node.target == aten.mul.Tensor and len(node.args) == 2:
        a, b = node.args
        return any(isinstance(s, fx.Node) and s.target == aten.sigmoid.default and s.args[0] is other
                   for s, other in ((a, b), (b, a)))
    if node.target == aten.div.Tensor and len(node.args) == 2 and isinstance(node.args[1], fx.Node):
        v, d = node.args
        if d.target not in (aten.add.Tensor, aten.add.Scalar):
            return False
        exps = [e for e in d.args if isinstance(e, fx.Node) and e.target == aten.exp.default]
        return any(isinstance(n := e.args[0], fx.Node) and n.target == aten.neg.default and n.args[0] is v
                   for e in exps) and any(isinstance(c, (int, float)) and c == 1 for c in d.args)
    return False


def _clamped_activations(region) -> list[str]:
    """The clamped gated units the region's constants allow: at each limit a clamp takes from above, DeepSeek-V4's
    clamped SiLU and GPT-OSS's clamped SwiGLU (each constant the region multiplies by as its alpha), which clamp
    the gate, or Step-3.7's, which clamps the SiLU's output. Which clamp the graph has decides between the SiLU
    forms: they differ by less than a check tells apart (at most limit - silu(limit)). None without a clamp."""
    alphas = {float(a) for n in region if n.op == "call_function" and n.target in (aten.mul.Tensor, aten.mul.Scalar)
              for a in n.args[1:] if isinstance(a, float)}
    names = []
    for lim, clamps in sorted(_clamps(region).items()):
        if any(_is_silu(c.args[0]) for c in clamps):  # silu(gate) clamped: Step-3.7's
            names.append(kernel.clamped_silu_output(lim))
        else:
            names += [kernel.clamped_silu(lim)] + [kernel.clamped_swiglu(a, lim) for a in sorted(alphas)]
    return names


def _check_scale(nodes, activation: str = "") -> float:
    """How much the checks scale their random hidden states: past the largest clamp limit among ``nodes``, and the
    ``activation``'s they are checked against, for a fair share of the values (a clamp that never bites would pass
    for no clamp, and an MLP that clamps nothing for one that does), else 1."""
    limit = kernel.clamp_limit(activation)
    limits = _clamp_limits(nodes) + ([limit] if limit is not None else [])
    return max(1.0, 0.75 * max(limits)) if limits else 1.0


# How routing weights that scale the experts' input reach it: as they are, or through a sigmoid (Llama 4 scatters
# its top-k logits into -inf scores, so every other expert's input is scaled by sigmoid(-inf) = 0: computing them
# all, densely, adds nothing to the sparse sum, since a gated MLP without biases maps 0 to 0).
INPUT_SCALES = {"as they are": lambda w: w, "sigmoid": lambda w: torch.sigmoid(w.float()).to(w.dtype)}


def input_weighted(experts, x, ids, weights, scale: str, *args, **kwargs) -> torch.Tensor:
    """sum_j expert_{ids[t, j]}(x[t] * s(weights[t, j])), with ``experts`` (the kernels' launcher or their
    reference, over [T, H], [T, k] ids and weights, then ``args``) run on the T * k scaled rows, each its own token
    routed to one expert with weight 1."""
    t, k = ids.shape
    scaled = INPUT_SCALES[scale](weights).to(x.dtype)
    rows = (x[:, None, :] * scaled[:, :, None]).reshape(t * k, x.shape[-1])
    ones = torch.ones((t * k, 1), dtype=weights.dtype, device=weights.device)
    out = experts(rows, ids.reshape(t * k, 1), ones, *args, **kwargs)
    return out.view(t, k, -1).sum(dim=1, dtype=torch.promote_types(out.dtype, torch.float32))


def _checked_forms(region, placeholders, out, what: str, quantized: bool):
    """The region as the modules its check runs: as it is, then, when it quantizes to FP8, with its casts to
    FP8 made identities (what it computes apart from the rounding); or why it cannot be built."""
    modules = []
    for keep_casts in (True, False) if quantized else (True,):
        module, _ = _region_module(region, placeholders, [out], what, keep_casts)
        if isinstance(module, str):
            return module
        modules.append(module)
    return modules


def _check_tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """(against the float form, against the FP8-quantized form) for a region in ``dtype``. Quantized, the
    graph's intermediate and the reference's differ by rounding, and now and then one crosses an e4m3 rounding
    boundary (an eighth of the value); unquantized inputs miss by several percent."""
    return (1e-3, 1e-3) if dtype == torch.float32 else (3e-2, 5e-2)


def _is_fp8(node: fx.Node) -> bool:
    v = node.meta.get("val")
    return isinstance(v, torch.Tensor) and v.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


def _routing_params(topk: fx.Node) -> dict[str, Any]:
    """What the router does, read off the nodes between the router logits and the top-k (for explain)."""
    upstream = _router(topk)
    targets = {getattr(n.target, "overloadpacket", n.target) for n in upstream}
    softmax = aten._softmax in targets or {aten.exp, aten.amax, aten.div} <= targets  # decomposed softmax
    scoring = ("softmax" if softmax else "sigmoid" if aten.sigmoid in targets
               else "sqrtsoftplus" if aten.sqrt in targets and (aten.softplus in targets or aten.log1p in targets)
               else "other")  # (softplus decomposed: where(x > 20, x, log1p(exp(x))))
    e = hint(value(topk.args[0]).shape[-1])
    bias = any(
        n.target == aten.add.Tensor and any(_is(a, (e,), floating=True) for a in n.all_input_nodes) for n in upstream
    )
    groups = any(n.target == aten.topk.default for n in upstream if n is not topk)
    return {"scoring": scoring, "group_limited": groups, "score_bias": bias}


# -- shared experts -------------------------------------------------------------------------------------------

_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
# What may stand between the routed output and the addition of the shared MLP: views, and a cast to the
# model's dtype (the fused launch sums both in fp32 and rounds once).
_VIEWS_AND_CASTS = _VIEWS + (torch.ops.prims.convert_element_type.default, aten._to_copy.default)


def _shared_experts(graph, out, inputs, params, fp8_acts: bool = False,
                    considered: Optional[set] = None) -> Union[dict[str, Any], str, None]:
    """A shared MLP added to the routed output: down(act(gate(x)) * up(x)) on the same hidden states, with the
    routed experts' activation and an intermediate size a multiple of theirs, so it runs as that many more
    experts every token is routed to. None if the routed output meets no such addition; a reason if it meets
    one it cannot take. Checked by running it on random inputs, like the experts. With ``fp8_acts`` (the routed
    experts are W8A8) its three matmuls must be W8A8 FP8 linears too (weights in 128 x 128 blocks, Linear's
    [out, in] storage, activations quantized per row and 128-wide tile); the result then holds their
    ``scales``. Stacked shared experts' batched matmuls, whether they join or not, are added to ``considered``."""
    node, views = out, []
    while len(node.users) == 1 and next(iter(node.users)).target in _VIEWS_AND_CASTS:
        node = next(iter(node.users))
        views.append(node)
    add = next(iter(node.users)) if len(node.users) == 1 else None
    # the routed sum scaled by a constant before the shared MLP joins it (Step-3.7's routed scaling factor): the
    # fused launch scales the routed slots' weights by it
    routed_scale = None
    if (add is not None and add.target == aten.mul.Tensor and len(add.args) == 2 and not add.kwargs
            and len(add.users) == 1 and node in add.args):
        constant = add.args[1] if add.args[0] is node else add.args[0]
        if isinstance(constant, (int, float)) and not isinstance(constant, bool):
            routed_scale, node = float(constant), add
            views.append(add)
            add = next(iter(add.users))
    if add is None or add.target != aten.add.Tensor or add.kwargs.get("alpha", 1) != 1 or len(add.args) != 2:
        return None
    other = add.args[1] if add.args[0] is node else add.args[0]
    if not isinstance(other, fx.Node) or other is node:
        return None
    x = inputs["x"]
    before_x = ancestors([x])
    # A gated shared MLP (Qwen-MoE: sigmoid(x . w_gate) * mlp(x)): the per-token factor stays in the graph and
    # the fused launch weighs the shared slots by it; the product is part of the region.
    def computed_after_x(v: fx.Node) -> set[fx.Node]:  # what computes v from x, graph inputs aside
        return {n for n in ancestors([v], blocked=before_x) - before_x if n.op not in ("placeholder", "get_attr")}

    stacked = _stacked_shared(other, x, before_x, params, fp8_acts, considered)
    if stacked is not None:  # Inkling's: three batched matmuls over [S, ..] weights, a factor per shared expert
        if isinstance(stacked, dict):
            stacked.update(region=views + stacked["region"] + [add], out=add, routed_scale=routed_scale)
        return stacked
    mlp_out, scale = _gated(other, value(node))
    shared = computed_after_x(mlp_out)
    if scale is not None and (scale in ancestors([mlp_out]) or ancestors([scale]) & (shared | {node})):
        mlp_out, scale = other, None  # not a factor of the input's: the product is the shared value itself
        shared = computed_after_x(other)
    if any("softmax" in str(n.target) or "scaled_dot_product" in str(n.target) for n in shared):
        return None  # an attention (Cohere's parallel block adds the MoE's output to it): no shared MLP here
    mms = [n for n in shared if n.target in (aten.mm.default, aten.addmm.default)]
    if any(n.target in (aten.bmm.default, aten.baddbmm.default) for n in shared):
        return ("the value added to the experts multiplies stacked weights (batched matmuls) but is no sum of "
                "stacked shared experts, each weighted per token (Inkling's form)")
    if len(mms) not in (2, 3):  # 2: gate and up as one matmul whose output is halved (Granite's input_linear)
        return None if not mms else (f"the value added to the experts holds {len(mms)} matmuls, not a gated MLP's "
                                     "3 (or 2, gate and up in one)")
    if len(mms) == 2 and fp8_acts:
        return "the shared MLP next to FP8 experts computes gate and up in one matmul: it joins only as three"
    order = {n: i for i, n in enumerate(graph.nodes)}
    shared = sorted(shared, key=order.__getitem__)
    reason = escape_reason(shared + ([other] if scale is not None else []), [other])
    if reason:
        return f"shared experts: {reason}"
    fp8_scales = None
    if fp8_acts:  # each matmul's weight dequantized from one FP8 tensor and its fp32 scales (the quant pass's view)
        sides = [weight_side(mm) for mm in mms]
        if not all(isinstance(side, dict) for side in sides):
            return "the shared MLP next to FP8 experts does not read FP8 weights"
        fp8_scales = {side["q"]: side["s"] for side in sides}
    acts, mats = [], []
    for n in shared:
        for a in n.all_input_nodes:
            if a in shared or a in acts or a in mats or (fp8_scales is not None and a in fp8_scales.values()):
                continue
            val = a.meta.get("val")
            if isinstance(val, (torch.SymInt, int)) or (isinstance(val, torch.Tensor) and val.numel() == 1):
                continue
            (acts if a in before_x or val is None or val.dim() != 2 else mats).append(a)
    hidden, inter = params["hidden"], params["intermediate"]
    xv = value(x)
    if len(acts) != 1 or len(mats) != len(mms):
        return (f"the shared MLP reads {len(acts)} activations and {len(mats)} weight matrices, expected 1 and "
                f"{len(mms)}")
    inp = acts[0]
    if inp not in _view_sources(x):  # the fused launch feeds the shared experts the routed experts' x
        return "the shared MLP reads other hidden states than the routed experts"
    iv, av = value(inp), value(add)
    shape = lambda v: tuple(hint(d) for d in v.shape)  # noqa: E731
    # the sum's shape, taken at run time from the input or what it is a view of (AFMoE adds [B, S, H] values
    # computed from the flattened [T, H] hidden states)
    like = next((n for n in [inp, *_view_sources(inp)] if value(n) is not None and av is not None
                 and shape(value(n)) == shape(av)), None)
    if (iv is None or av is None or iv.dtype != xv.dtype or av.dtype != xv.dtype or like is None
            or hint(iv.shape[-1]) != hidden or hint(iv.numel()) != hint(xv.numel())):
        return "the shared MLP's input is not the experts' hidden states in their dtype and shape"
    too_many = _too_many_tokens(xv)
    if too_many:
        return too_many
    if scale is not None:
        shared.append(other)
    if fp8_scales is not None and set(mats) != set(fp8_scales):
        return "the shared MLP next to FP8 experts reads weights other than its three FP8 ones"
    roles = _verify_shared(shared, other, inp, mats, hidden, inter, params["activation"], xv, scale, fp8_scales,
                           gated="ungated" not in params)
    if isinstance(roles, str):
        return roles
    roles.update(region=views + shared + [add], out=add, like=like, scale=scale, routed_scale=routed_scale)
    if fp8_scales is not None:
        roles["scales"] = {role: fp8_scales[roles[role]] for role in ("gate", "up", "down")}
    return roles


# What may stand between a stacked shared MLP's per-expert factor [T, S] and its product with the intermediate.
_LAYOUT = _VIEWS + (aten.permute.default, aten.transpose.int, aten.unsqueeze.default, aten.expand.default,
                    aten.clone.default)


def _stacked_shared(other, x, before_x, params, fp8_acts: bool,
                    considered: Optional[set] = None) -> Union[dict[str, Any], str, None]:
    """Stacked shared experts added to the routed output (Inkling's): S experts of the routed ones' intermediate
    size stored as gate/up [S, I, H] and down [S, H, I] (or either transposed), multiplied by batched matmuls over
    the hidden states expanded S times, each expert's intermediate times its own per-token factor g [T, S] (which
    the router computes), summed over the S experts:  sum_s g[:, s] * down_s(act(gate_s x) * up_s x).
    Checked by running it on random inputs. None if ``other`` does not end in a sum over the first dim of a batched
    matmul (not this form); a reason if it does but cannot join the launches."""
    end = other
    while end.op == "call_function" and end.target in _VIEWS_AND_CASTS:
        end = end.args[0]
    if end.target != aten.sum.dim_IntList or list(end.args[1]) != [0] or len(end.args) > 2:
        return None
    computed = ancestors([end], blocked=before_x) - before_x
    bmms = {n for n in computed if n.target == aten.bmm.default}
    if not bmms:
        return None
    if considered is not None:  # their weights are this top-k's shared experts, whatever comes of them
        considered.update(bmms)
    if fp8_acts:
        return "stacked shared experts (batched matmuls over [S, I, H] weights) join float experts' launches only"
    too_many = _too_many_tokens(value(x))
    if too_many:
        return too_many
    # the factor: a [T, S] value, computed apart from the batched matmuls, that multiplies what they compute
    # through layout ops only
    tokens, count = hint(value(x).shape[0]), hint(value(end.args[0]).shape[0])
    factors = set()
    for product in (n for n in computed if n.target == aten.mul.Tensor and not n.kwargs):
        for n in product.args:
            while isinstance(n, fx.Node) and value(n) is not None and value(n).dim() != 2 and n.target in _LAYOUT:
                n = n.args[0]
            v = value(n) if isinstance(n, fx.Node) else None
            if v is not None and v.dtype.is_floating_point and tuple(hint(d) for d in v.shape) == (tokens, count) \
                    and not ancestors([n], blocked=before_x) & bmms:
                factors.add(n)
    if len(factors) > 1:
        return f"stacked shared experts with {len(factors)} factors [tokens, S] on their intermediate, not one"
    factor = factors.pop() if factors else None  # (none: every shared expert weighs 1)
    inputs = {factor} if factor is not None else set()
    region = {n for n in ancestors([other], blocked=before_x | inputs) - before_x - inputs
              if n.op not in ("placeholder", "get_attr")}
    read = {a for n in region for a in n.all_input_nodes} - region  # the region's inputs
    mats = [m for m in read if m.op in ("placeholder", "get_attr") and value(m) is not None and value(m).dim() == 3]
    acts = [a for a in read - set(mats) - inputs if isinstance(value(a), torch.Tensor) and value(a).numel() > 1]
    bmms = [n for n in region if n.target == aten.bmm.default]
    if len(bmms) != 3 or len(mats) != 3 or len(acts) != 1 or acts[0] not in _view_sources(x):
        return (f"stacked shared experts: {len(bmms)} batched matmuls over {len(mats)} stacked weights of "
                f"{len(acts)} activations, not a gated MLP's 3 over 3 of the experts' hidden states")
    if any(n.target in (aten.mm.default, aten.addmm.default) or "softmax" in str(n.target) for n in region):
        return "stacked shared experts: the value added to the experts computes more than their MLP"
    order = {n: i for i, n in enumerate(other.graph.nodes)}
    region = sorted(region, key=order.__getitem__)
    reason = escape_reason(region, [other])
    if reason:
        return f"stacked shared experts: {reason}"
    inp = acts[0]
    like = next((n for n in [inp, *_view_sources(inp)] if tuple(value(n).shape) == tuple(value(other).shape)), None)
    if like is None or value(inp).dtype != value(x).dtype:
        return "the stacked shared experts' input is not the experts' hidden states in their dtype and shape"
    roles = _verify_stacked(region, other, inp, mats, factor, params, value(x))
    if isinstance(roles, str):
        return roles
    roles.update(region=region, like=like, scale=factor, stacked=True)
    return roles


def _verify_stacked(region, out, inp, mats, factor, params, xv) -> Union[dict[str, Any], str]:
    """Which of ``mats`` is gate, up and down of ``_stacked_shared``'s form (and which are stored transposed, as
    [S, H, I] gate/up or [S, I, H] down): the assignment under which the region equals it on random inputs (with
    no ``factor``, each expert's weighs 1)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    hidden, inter, activation = params["hidden"], params["intermediate"], params["activation"]
    shapes = {m: tuple(hint(d) for d in value(m).shape) for m in mats}
    count = shapes[mats[0]][0]
    if any(shape[0] != count or sorted(shape[1:]) != sorted((inter, hidden)) for shape in shapes.values()):
        return (f"stacked shared expert weights {list(shapes.values())} are not S experts of the routed experts' "
                f"intermediate size {inter}")
    device, dtype = xv.device, xv.dtype
    with unset_fake_temporarily(), torch.no_grad():
        drawn = _drawn_check(region, [inp] + mats + ([factor] if factor is not None else []), out,
                             "the stacked shared experts", False, xv, shapes, activation, 97)
        if isinstance(drawn, str):
            return drawn
        modules, x, real, gen, rows = drawn
        g = torch.ones(rows, count, device=device, dtype=dtype)
        extra = []
        if factor is not None:
            g = (torch.rand(rows, count, generator=gen) + 0.5).to(device, value(factor).dtype)  # away from 1
            extra = [g.view(tuple(hint(d) for d in value(factor).shape))]
        try:
            got = modules[0](x.view(tuple(hint(d) for d in value(inp).shape)), *(real[m] for m in mats),
                             *extra)[0].reshape(rows, hidden)
        except Exception as err:
            return f"the stacked shared experts could not be run for checking: {type(err).__name__}: {str(err)[:120]}"
        tol, _ = _check_tolerances(dtype)
        acc = torch.float64 if device.type == "cpu" else torch.float32
        for gate, up, down in itertools.permutations(mats):
            for flips in itertools.product((False, True), repeat=3):
                w = [real[m].transpose(1, 2) if f else real[m] for m, f in zip((gate, up, down), flips)]
                if w[0].shape[1:] != (inter, hidden) or w[1].shape[1:] != (inter, hidden) \
                        or w[2].shape[1:] != (hidden, inter):
                    continue
                want = sum(_gated_mlp(x.to(acc), *(t[s].to(acc) for t in w), activation, g[:, s:s + 1].to(acc))
                           for s in range(count))
                if rel_err(got, want) < tol:
                    return {"gate": gate, "up": up, "down": down, "count": count,
                            "transposed": dict(zip(("gate", "up", "down"), flips))}
    return ("the value added to the experts is not stacked gated MLPs with the experts' activation, each weighted "
            "per token (checked on random inputs)")


def _shared_form(shared: dict) -> str:
    """How fused shared experts are stored and weighted, for explain (after their count and size)."""
    scale = shared["scale"]
    if shared.get("stacked"):
        return ", stacked [S, I, H]" + (f", each weighted per token by its column of {scale.name} (the [T, S] weights "
                                        f"of {module_path(scale) or 'this graph'})" if scale is not None else "")
    return f", weighted per token by {scale.name} (a gated shared MLP)" if scale is not None else ""


def _too_many_tokens(xv) -> Optional[str]:
    """Why a shared MLP stays apart at this many tokens, if it does."""
    tokens = hint(xv.shape[0])
    if tokens > kernel.SHARED_FUSED_MAX_TOKENS:
        return (f"{tokens} tokens: past {kernel.SHARED_FUSED_MAX_TOKENS}, cuBLAS runs the shared MLP faster than the "
                "grouped launches")
    return None


def _routed_scaled(weights: torch.Tensor, shared: Optional[dict]) -> torch.Tensor:
    """The routing weights times the constant the graph scales the routed sum by before the shared MLP joins it
    (``shared["routed_scale"]``), in the fused launch's replacement: the shared slots keep theirs."""
    scale = shared.get("routed_scale") if shared else None
    return weights if scale is None else weights * scale


def _gated(other: fx.Node, routed) -> tuple[fx.Node, Optional[fx.Node]]:
    """(the shared MLP's output, its per-token factor) when ``other`` is their product, the factor shaped like
    the routed output but for a last dim of 1; else (``other``, None). Whether it is a shared MLP is for the
    caller to check."""
    if other.target != aten.mul.Tensor or len(other.args) != 2 or other.kwargs:
        return other, None
    for factor, rest in (other.args, other.args[::-1]):
        fv, rv = value(factor) if isinstance(factor, fx.Node) else None, value(rest) if isinstance(rest, fx.Node) else None
        if fv is None or rv is None or routed is None or fv.dim() != rv.dim() or fv.dim() < 2:
            continue
        shape, want = tuple(hint(d) for d in fv.shape), tuple(hint(d) for d in rv.shape)
        if shape[-1] == 1 and shape[:-1] == want[:-1] and want == tuple(hint(d) for d in routed.shape) \
                and fv.dtype.is_floating_point:
            return rest, factor
    return other, None


def _is_dequantized(node: fx.Node) -> bool:
    dequantize = getattr(torch.ops.deepfuse, "fp8_block_dequantize", None)
    return dequantize is not None and node.target is dequantize.default


def _fp8_experts(inputs) -> Optional[tuple[tuple[fx.Node, fx.Node], tuple[fx.Node, fx.Node]]]:
    """((gate_up weight, scale), (down weight, scale)) when both expert weights are FP8 read through
    ``deepfuse::fp8_block_dequantize`` (``options={"quantize": "fp8-block"}``) into the model's dtype; else None."""
    found = []
    for w in (inputs["w_gate_up"], inputs["w_down"]):
        if not _is_dequantized(w):
            return None
        q, s = w.args[0], w.args[1]
        if value(q) is None or value(q).dtype != torch.float8_e4m3fn or value(w).dtype != value(inputs["x"]).dtype:
            return None
        found.append((q, s))
    return tuple(found)


def _view_sources(node: fx.Node) -> set[fx.Node]:
    """``node`` and the nodes it is a view of (same values, other shape)."""
    seen = {node}
    while node.op == "call_function" and node.target in _VIEWS:
        node = node.args[0]
        seen.add(node)
    return seen


def _verify_shared(shared, out, inp, mats, hidden, inter, activation, xv, scale=None,
                   fp8_scales=None, gated: bool = True) -> Union[dict[str, Any], str]:
    """Which of ``mats`` is gate, up and down (and which are stored transposed): the assignment under which the
    region equals down(act(gate(x)) * up(x)) on random inputs, with the routed experts' activation; times the
    per-token factor ``scale`` (an input of the region) when given. With ``fp8_scales`` ({FP8 weight: its scale
    node}) the weights are drawn as FP8 blocks and stored as Linear stores them, and the region must also equal
    that MLP with every matmul's input quantized per row and 128-wide tile (casts kept), as it equals the plain
    one with its casts to FP8 made identities. Beside ``gated=False`` experts, down(act(up(x))) (two matrices)."""
    import itertools

    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from deepfuse.runtime.kernels import quant as quant_kernels

    shapes = {m: tuple(hint(d) for d in value(m).shape) for m in mats}
    if not gated:
        if len(mats) != 2:
            return "a gated shared MLP beside ungated experts does not join their launches"
        return _verify_ungated_shared(shared, out, inp, mats, shapes, hidden, inter, activation, xv, scale)
    if len(mats) == 2:
        return _verify_fused_shared(shared, out, inp, mats, shapes, hidden, inter, activation, xv, scale)
    sizes = {d for m in mats for d in shapes[m] if d != hidden} or {hidden}
    if len(sizes) != 1:
        return f"shared expert weight shapes {list(shapes.values())} do not share one intermediate size"
    si = sizes.pop()
    if si % inter:
        return f"the shared intermediate size {si} is not a multiple of the experts' {inter}"
    fp8 = fp8_scales is not None
    if fp8 and inter % kernel.FP8_BLOCK:
        return f"FP8 shared experts need an intermediate size that is whole 128-blocks, not {inter}"
    placeholders = [inp] + mats + ([fp8_scales[m] for m in mats] if fp8 else []) + ([scale] if scale is not None else [])
    device, dtype = xv.device, xv.dtype
    with unset_fake_temporarily(), torch.no_grad():
        drawn = _drawn_check(shared, placeholders, out, "the shared MLP", fp8, xv, shapes, activation, 99)
        if isinstance(drawn, str):
            return drawn
        modules, x, real, gen, rows = drawn
        stored, real_scales = dict(real), []  # what the region reads: the draws, or their FP8 blocks and scales
        if fp8:  # the check multiplies by what the FP8 blocks dequantize to
            for m in mats:
                stored[m], s_ = quant_kernels.quantize_weight(real[m].float(), "fp8-block")
                real[m] = quant_kernels.dequantize_weight(stored[m], s_, "fp8-block").to(dtype)
                real_scales.append(s_)
        factor = torch.rand(rows, 1, generator=gen) + 0.5  # away from 1, so an ignored factor shows
        extra = [] if scale is None else [factor.to(device, value(scale).dtype).view(tuple(hint(d) for d in value(scale).shape))]
        weights_in = [stored[m] for m in mats] + real_scales
        try:
            got = [module(x.view(tuple(hint(d) for d in value(inp).shape)), *weights_in, *extra)[0].reshape(rows, hidden)
                   for module in modules]
        except Exception as err:
            return f"the shared MLP could not be run for checking: {type(err).__name__}: {str(err)[:120]}"
        tol, quant_tol = _check_tolerances(dtype)
        acc = torch.float64 if device.type == "cpu" else torch.float32

        for gate, up, down in itertools.permutations(mats):
            for flips in itertools.product((False, True), repeat=3) if not fp8 else [(False,) * 3]:
                w = [real[m].t() if f else real[m] for m, f in zip((gate, up, down), flips)]
                if w[0].shape != (si, hidden) or w[1].shape != (si, hidden) or w[2].shape != (hidden, si):
                    continue
                g, u, d = (t.to(acc) for t in w)
                want = _gated_mlp(x.to(acc), g, u, d, activation, None if scale is None else extra[0].reshape(rows, 1))
                if rel_err(got[-1], want) >= tol:
                    continue
                if fp8:
                    quantized = kernel.reference_shared_act_quant(x, g, u, d, activation, acc,
                                                                  None if scale is None else extra[0])
                    if rel_err(got[0], quantized.float()) >= quant_tol:
                        return ("the shared MLP quantizes activations to FP8, but not every matmul's input per row "
                                "and 128-wide tile (checked on random inputs)")
                return {"gate": gate, "up": up, "down": down, "count": si // inter,
                        "transposed": dict(zip(("gate", "up", "down"), flips))}
    return "the value added to the experts is not a gated MLP with the experts' activation (checked on random inputs)"


def _drawn_check(region, placeholders, out, what: str, quantized: bool, xv, shapes: dict, activation: str, seed: int):
    """A shared MLP check's modules (``_checked_forms``) and random draws: (modules, x [rows, H] at the scale the
    activation is told apart at, a weight of each of ``shapes``, the generator, rows); or why the region cannot be
    built. Under ``unset_fake_temporarily``."""
    modules = _checked_forms(region, placeholders, out, what, quantized)
    if isinstance(modules, str):
        return modules
    hidden = xv.shape[-1]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rows = max(hint(xv.shape[0]), 1)
    x = (torch.randn(rows, hidden, generator=gen) * _check_scale(region, activation)).to(xv.device, xv.dtype)
    real = {m: (torch.randn(shape, generator=gen) / hidden ** 0.5).to(xv.device, xv.dtype)
            for m, shape in shapes.items()}
    return modules, x, real, gen, rows


def _gated_mlp(x, gate, up, down, activation, factor=None) -> torch.Tensor:
    """down(act(x . gate^T) * (x . up^T)) in x's dtype, times the per-token ``factor`` [T, 1] when given; fp32 out:
    what the shared-MLP checks compare a region with."""
    y = torch.nn.functional.linear(kernel.glu(activation, x @ gate.t(), x @ up.t()), down)
    return (y if factor is None else y * factor.to(x.dtype)).float()


def _verify_fused_shared(shared, out, inp, mats, shapes, hidden, inter, activation, xv,
                         scale=None) -> Union[dict[str, Any], str]:
    """``_verify_shared`` for a shared MLP whose gate and up are one matmul, its output halved: which of the two
    ``mats`` is that [2 * I, H] weight (or [H, 2 * I], stored transposed), which half is the gate, and how the down
    weight is stored. Roles as ``_verify_shared``'s, gate and up the same node, with ``fused``: "gate first" or
    "up first" (the gate's half of the fused weight)."""
    import itertools

    from torch._subclasses.fake_tensor import unset_fake_temporarily

    drawn = _two_matrix_check(shared, out, inp, mats, xv, scale, 98, activation)
    if isinstance(drawn, str):
        return drawn
    module, x, extra, gen, acc, tol = drawn
    device, dtype, rows = xv.device, xv.dtype, x.shape[0]
    with unset_fake_temporarily(), torch.no_grad():
        for (fused, down), t_in, t_down, order in itertools.product(
                itertools.permutations(mats), (False, True), (False, True), ("gate first", "up first")):
            si = shapes[fused][1 if t_in else 0] // 2
            if shapes[fused] != ((hidden, 2 * si) if t_in else (2 * si, hidden)) or si == 0 \
                    or shapes[down] != ((si, hidden) if t_down else (hidden, si)):
                continue
            if si % inter:
                return f"the shared intermediate size {si} is not a multiple of the experts' {inter}"
            g, u, d = (torch.randn(shape, generator=gen) / hidden ** 0.5
                       for shape in ((si, hidden), (si, hidden), (hidden, si)))
            halves = (g, u) if order == "gate first" else (u, g)
            w_in = torch.cat(halves).to(device, dtype)
            stored = {fused: w_in.t().contiguous() if t_in else w_in,
                      down: (d.t().contiguous() if t_down else d).to(device, dtype)}
            try:
                got = module(x.view(tuple(hint(n) for n in value(inp).shape)), *(stored[m] for m in mats),
                             *extra)[0].reshape(rows, hidden)
            except Exception as err:
                return f"the shared MLP could not be run for checking: {type(err).__name__}: {str(err)[:120]}"
            g, u, d = (t.to(dtype).to(device, acc) for t in (g, u, d))
            want = _gated_mlp(x.to(acc), g, u, d, activation, None if scale is None else extra[0].reshape(rows, 1))
            if rel_err(got, want) < tol:
                return {"gate": fused, "up": fused, "down": down, "count": si // inter, "fused": order,
                        "transposed": {"gate": t_in, "up": t_in, "down": t_down}}
    return "the value added to the experts is not a gated MLP with the experts' activation (checked on random inputs)"


def _two_matrix_check(shared, out, inp, mats, xv, scale, seed, activation):
    """What the checks of a two-matrix shared MLP run: (the region as a module, random hidden states [rows, hidden],
    the per-token factor as the region reads it, in a list, if ``scale``; the generator that drew them, for the
    weights; the reference's dtype and the tolerance), or why the region cannot be run."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily(), torch.no_grad():
        drawn = _drawn_check(shared, [inp] + list(mats) + ([scale] if scale is not None else []), out,
                             "the shared MLP", False, xv, {}, activation, seed)
        if isinstance(drawn, str):
            return drawn
        modules, x, _, gen, rows = drawn
        factor = torch.rand(rows, 1, generator=gen) + 0.5  # away from 1, so an ignored factor shows
        extra = [] if scale is None else [factor.to(xv.device, value(scale).dtype).view(
            tuple(hint(d) for d in value(scale).shape))]
    acc = torch.float64 if xv.device.type == "cpu" else torch.float32
    return modules[0], x, extra, gen, acc, _check_tolerances(xv.dtype)[0]


def _verify_ungated_shared(shared, out, inp, mats, shapes, hidden, inter, activation, xv,
                           scale=None) -> Union[dict[str, Any], str]:
    """``_verify_shared`` beside ungated experts: which of the two ``mats`` is up [S*I, H] and which down [H, S*I]
    (each either way round) under which the region equals down(act(up(x))), times ``scale`` when given. Roles as
    ``_verify_shared``'s, the gate None."""
    import itertools

    from torch._subclasses.fake_tensor import unset_fake_temporarily

    drawn = _two_matrix_check(shared, out, inp, mats, xv, scale, 97, activation)
    if isinstance(drawn, str):
        return drawn
    module, x, extra, gen, acc, tol = drawn
    device, dtype, rows = xv.device, xv.dtype, x.shape[0]
    with unset_fake_temporarily(), torch.no_grad():
        real = {m: (torch.randn(shapes[m], generator=gen) / hidden ** 0.5).to(device, dtype) for m in mats}
        try:
            got = module(x.view(tuple(hint(n) for n in value(inp).shape)), *(real[m] for m in mats),
                             *extra)[0].reshape(rows, hidden)
        except Exception as err:
            return f"the shared MLP could not be run for checking: {type(err).__name__}: {str(err)[:120]}"
        for (up, down), t_up, t_down in itertools.product(itertools.permutations(mats), (False, True), (False, True)):
            u, d = (real[up].t() if t_up else real[up]), (real[down].t() if t_down else real[down])
            si = u.shape[0]
            if u.shape != (si, hidden) or d.shape != (hidden, si) or si == 0:
                continue
            y = torch.nn.functional.linear(kernel.glu(activation, None, x.to(acc) @ u.to(acc).t()), d.to(acc))
            want = (y if scale is None else y * extra[0].reshape(rows, 1).to(acc)).float()
            if rel_err(got, want) < tol:
                if si % inter:
                    return f"the shared intermediate size {si} is not a multiple of the experts' {inter}"
                return {"gate": None, "up": up, "down": down, "count": si // inter,
                        "transposed": {"gate": False, "up": t_up, "down": t_down}}
    return ("the value added to the experts is not an ungated MLP with the experts' activation (checked on random "
            "inputs)")


def fused_halves(w: torch.Tensor, transposed: bool, order: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, up) as views of a shared MLP's fused gate-and-up weight, stored [2 * I, H] (or [H, 2 * I] with
    ``transposed``), its gate half first or second (``order``)."""
    half = w.shape[1 if transposed else 0] // 2
    first, second = (w[:, :half], w[:, half:]) if transposed else (w[:half], w[half:])
    return (first, second) if order == "gate first" else (second, first)


# -- the router ------------------------------------------------------------------------------------------------


def _routing_region(topk: fx.Node, weights: fx.Node, ids: fx.Node):
    """(region, logits, vectors): what computes the experts' weights and ids from the router's logits, and the
    [E] tensors it reads (up to two: a score-correction bias, a per-expert scale; which is which the check
    tells); or why it cannot be taken whole."""
    mms = [n for n in _router(topk) if n.target in (aten.mm.default, aten.addmm.default, aten.bmm.default)]
    if len(mms) != 1:
        return f"{len(mms)} router matmuls feed the top-k, expected one"
    logits = mms[0]
    lv = value(logits)
    if lv is None or lv.dim() != 2:
        return "the router logits are not a [tokens, experts] matrix"
    e = hint(lv.shape[1])
    sizes = lambda n: isinstance(n.meta.get("val"), (torch.SymInt, int))  # noqa: E731  (constants in the check)
    region = ancestors([weights, ids], blocked={logits}, stop=sizes)
    vectors = []
    for n in list(region):
        if n.op not in ("placeholder", "get_attr"):
            continue
        region.discard(n)
        val = value(n)
        if val is None or val.numel() == 1:
            continue  # a scalar constant; the check runs it as it is
        shape = tuple(hint(d) for d in val.shape)
        if len(vectors) < 2 and val.dtype.is_floating_point and shape[-1:] == (e,) and all(d == 1 for d in shape[:-1]):
            vectors.append(n)  # [E], or [1, E] as Ernie 4.5 holds its bias (read through a squeeze)
            continue
        return f"the router reads a tensor besides its logits and [experts] vectors (a bias, a scale) ({n.name})"
    if len(region) > 200:
        return f"the router region holds {len(region)} nodes: not a router"
    order = {n: i for i, n in enumerate(topk.graph.nodes)}
    return sorted(region, key=order.__getitem__), logits, sorted(vectors, key=order.__getitem__)


def _router_matmul(logits: fx.Node, region) -> Union[dict[str, Any], str]:
    """The router's logits matmul as the routing kernel can take it: (hidden states x as stored, before a cast
    only the matmul reads; the router weight w [E, H] as the model holds it; the cast and transpose nodes the
    region then absorbs), or why not."""
    if logits.target != aten.mm.default or logits.kwargs:
        return f"the logits come from {logits.target}, not a plain matmul"
    rows = value(logits).shape[0]
    if not isinstance(rows, int):
        return "a token count known only at run time"
    inside = set(region)
    if any(u not in inside for u in logits.users):
        return "the logits are read outside the router (returned for an auxiliary loss, say)"
    stored = stored_weight(logits.args[1])
    if stored is None:
        return "the router weight is not a tensor the model holds (seen through a transpose and a cast)"
    w, _, nodes = stored
    size = value(w).numel() * value(w).element_size()
    if size > routing.ROUTER_MATMUL_MAX_WEIGHT_BYTES and not routing.uses_tiled_matmul(rows):
        return (f"the router weight ({size >> 10} KiB) is past the {routing.ROUTER_MATMUL_MAX_WEIGHT_BYTES >> 10} "
                f"KiB up to which the fused router matmul is tried at up to {routing.ROUTER_MATMUL_MAX_TOKENS} "
                "tokens (every token reads all of it)")
    x = logits.args[0]
    if is_plain_cast(x) and len(x.users) == 1 and value(x.args[0]) is not None \
            and value(x.args[0]).dtype in TRITON_DTYPES:
        nodes, x = nodes + [x], x.args[0]  # the kernel casts in registers what the graph cast in memory
    if value(x) is None or value(x).dim() != 2 or value(x).dtype not in TRITON_DTYPES:
        return "the hidden states are not a [tokens, hidden] float matrix"
    return {"x": x, "w": w, "nodes": [logits] + nodes}


def _router_matmul_form(matmul: Union[dict[str, Any], str], logits) -> str:
    """explain's words for where the router matmul runs: deepfuse's split or tiled form, or Inductor and why."""
    if not isinstance(matmul, dict):
        return f"with Inductor ({matmul})"
    form = routing.describe_matmul(logits.shape[0], value(matmul["x"]).dtype, value(matmul["w"]).dtype, logits.dtype)
    return f"in deepfuse's router kernels ({form})"


def _fused_router_wins(matmul: dict[str, Any], logits: fx.Node, bias: Optional[fx.Node], spec, out_dtype,
                       origin: str, expert_scale: Optional[fx.Node] = None) -> bool:
    """Does deepfuse's router matmul (route_hidden) beat the graph's form (its casts, cuBLAS's matmul, then the
    routing kernel) on this GPU? Timed at compile time on random tensors of the real shapes and strides, each
    replayed as a CUDA graph over enough router-weight copies to pass twice the L2 (at most 256), cached per
    GPU and token bucket like any autotune result. A fused kernel that fails to build loses."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    xv, wv = value(matmul["x"]), value(matmul["w"])
    mm_dtype = value(logits).dtype
    with unset_fake_temporarily():
        device = torch.device(xv.device)

        @autotune.once
        def inputs():  # made only if the choice is timed
            vector = lambda v: (None if v is None else  # noqa: E731
                                torch.randn(wv.shape[0], dtype=value(v).dtype, device=device))
            return (torch.randn(tuple(xv.shape), dtype=xv.dtype, device=device),
                    autotune.cold_copies(wv, device, cap=256), vector(bias), vector(expert_scale))

        def run(cfg):
            x, ws, b, s = inputs()
            for w in ws:
                if cfg["fused"]:
                    routing.route_hidden(x, w, b, spec, out_dtype, mm_dtype, origin=origin, expert_scale=s)
                else:
                    routing.route(torch.mm(x.to(mm_dtype), w.to(mm_dtype).t()), b, spec, out_dtype, expert_scale=s)

        key = (f"moe_router|{wv.shape[0]}x{wv.shape[1]}|{wv.dtype}|{xv.dtype}->{mm_dtype}|"
               f"{routing.kernel_for(spec, origin, router_matmul=mm_dtype, operands=(xv.dtype, wv.dtype)).key}")
        # The unfused form first: with autotuning off, the form already run on GPUs.
        return autotune.choose(key, xv.shape[0], [{"fused": False}, {"fused": True}], run, device)["fused"]


def _verify_routing(region, logits, vectors, weights, ids):
    """(the ``RoutingSpec`` the region computes, its bias node, its per-expert scale node): candidates read off
    its nodes, each with each role for the [E] ``vectors`` it reads, run against the region on random logits (and
    vectors); the first to route every token alike is it. Else why none is."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    lv, idv = value(logits), value(ids)
    rows, e = hint(lv.shape[0]), hint(lv.shape[1])
    k = hint(idv.shape[1])
    if rows == 0:
        return "the traced router sees no tokens, so it cannot be checked"
    module, consts = _region_module(region, [logits] + list(vectors), [weights, ids], "the router")
    if isinstance(module, str):
        return module
    out_dtype = value(weights).dtype
    rtol = {torch.float32: 1e-4, torch.float64: 1e-6, torch.float16: 2e-3}.get(out_dtype, 1.6e-2)
    device = lv.device
    # A clamp in the router bites only past its limit: half the draws are scaled (by a power of two, so the grid
    # stays exact) past the largest one.
    limits = _clamp_limits(region)
    past = 2.0 ** math.ceil(math.log2(limits[-1] / 2)) if limits and limits[-1] > 2 else 1.0
    with unset_fake_temporarily(), torch.no_grad():
        gen = torch.Generator(device="cpu").manual_seed(4321)
        draws = []
        for i in range(max(4, -(-64 // rows))):
            x = (_distinct_logits(rows, e, lv.dtype, gen) * (past if i % 2 else 1.0)).to(lv.dtype)
            drawn = [(torch.randn(e, generator=gen, dtype=torch.float64) * 0.5).to(device, value(v).dtype).view(
                value(v).shape) for v in vectors]
            try:
                got = module(x.to(device), *drawn)
            except Exception as err:
                return f"the router could not be run for checking: {type(err).__name__}: {str(err)[:120]}"
            draws.append((x.double(), {v: d.double().cpu().reshape(e) for v, d in zip(vectors, drawn)},
                          (got[0].cpu(), got[1].cpu())))
        # which [E] vector is the bias (steering the choice) and which the per-expert scale (of the weights)
        roles = ([(None, None)] if not vectors else [(vectors[0], None), (None, vectors[0])] if len(vectors) == 1
                 else [(vectors[0], vectors[1]), (vectors[1], vectors[0])])
        for bias, scale_vector in roles:
            assigned = [(x, got_vectors.get(bias), got_vectors.get(scale_vector), got)
                        for x, got_vectors, got in draws]
            for spec in _routing_candidates(region, consts, e, k, bias is not None, scale_vector is not None):
                try:
                    spec.check(e)
                except ValueError:
                    continue
                if not all(routing.same_routing(got, routing.reference(x, b, spec, expert_scale=sv), 1e-12,
                                                ids_only=True) for x, b, sv, got in assigned):
                    continue
                scale = _fitted_scale(assigned, spec, consts + _int_constants(region))
                if scale is None:
                    continue
                spec = dataclasses.replace(spec, scale=scale)
                if all(routing.same_routing(got, routing.reference(x, b, spec, expert_scale=sv), rtol)
                       for x, b, sv, got in assigned):
                    return spec, bias, scale_vector
    return "the router is not one the routing kernel computes (checked on random logits)"


def _distinct_logits(rows: int, e: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Random logits with no two alike in a row, even in ``dtype``: each row E different points of a grid the
    dtype holds exactly (integers up to 256 in bf16, 2048 in fp16; fp32 is drawn from a normal), so the check
    meets no tie made by rounding. Rows differ, so a constant cannot pass for a per-token renormalization."""
    span = {torch.bfloat16: 256, torch.float16: 2048}.get(dtype)
    if span is None or e > span:
        return torch.randn(rows, e, generator=gen, dtype=torch.float64) * 2
    grid = torch.stack([torch.randperm(span, generator=gen)[:e] for _ in range(rows)]).double()
    return (grid - span / 2) * (8 / span)


def _region_module(region, placeholders, outputs, what: str, keep_fp8_casts: bool = True):
    """The region as a runnable module over ``placeholders``, sizes and scalar constants baked in; also the
    Python float constants its nodes use (candidate scales and fills). ``what`` names the region in the reason
    it cannot be run. Without ``keep_fp8_casts`` each cast to FP8 passes its input through instead."""
    sub = fx.Graph()
    env = {n: sub.placeholder(f"in{i}") for i, n in enumerate(placeholders)}
    consts: list[float] = []
    consts_t: list[torch.Tensor] = []
    for n in region:
        for a in n.all_input_nodes:
            if a in env or a in region:
                continue
            v = a.meta.get("val")
            if isinstance(v, (torch.SymInt, int)):
                env[a] = hint(v)
                continue
            real = _real_constant(a)
            if real is None:
                return f"{what} reads a value the check cannot make ({a.name})", consts
            env[a] = sub.get_attr(f"const{len(consts_t)}")
            consts_t.append(real)
            if real.is_floating_point():
                consts.append(float(real.item()))  # a scalar Inductor lifted into a tensor (the scale, say)
        consts.extend(float(c) for c in (*n.args, *n.kwargs.values()) if isinstance(c, float))
        if not keep_fp8_casts and _is_fp8(n) and n.args and isinstance(n.args[0], fx.Node) and not _is_fp8(n.args[0]):
            env[n] = env[n.args[0]]  # a cast to FP8 (views of its result stay: they work on floats alike)
            continue
        env[n] = sub.node_copy(n, lambda a: env[a])
    sub.output(tuple(env[o] for o in outputs))
    root = torch.nn.Module()
    for i, t in enumerate(consts_t):
        root.register_buffer(f"const{i}", t)
    return fx.GraphModule(root, sub), consts


def _real_constant(node: fx.Node) -> Optional[torch.Tensor]:
    """The value of a one-element constant tensor a region reads (a scalar Inductor lifted, an eps). Only the
    graph's own constants: a graph input (a buffer, say) can hold another value at the next call, and the fused
    kernel would keep the one it was checked with."""
    if node.op != "get_attr" or node.graph.owning_module is None:
        return None
    real = getattr(node.graph.owning_module, node.target, None)
    return real if isinstance(real, torch.Tensor) and real.numel() == 1 else None


def _routing_candidates(region, consts, e, k, has_bias, expert_scale=False):
    """The specs the region may compute (with a bias, a per-expert scale as given): the scoring, group sizes,
    kept groups and fill read off its nodes; the group score, renormalization and scale are told apart by the
    check."""
    groups = {(1, 1)}
    for n in region:
        if n.target == aten.topk.default:
            v = value(n.args[0])
            if v is not None and v.dim() == 2 and hint(v.shape[1]) not in (e, 1) and e % hint(v.shape[1]) == 0:
                groups.add((hint(v.shape[1]), n.args[1]))  # a top-k over [tokens, groups]: the kept groups
    fills = [c for c in consts if c in (0.0, float("-inf"))] or [float("-inf"), 0.0]
    for scoring in routing.SCORINGS:
        for g, tg in sorted(groups, reverse=True):
            for group_score in (routing.GROUP_SCORES if g > 1 else ("max",)):
                for fill in (dict.fromkeys(fills) if g > 1 else (float("-inf"),)):
                    for renormalize in (False, True):
                        yield routing.RoutingSpec(k, scoring, has_bias, g, tg, group_score, fill, renormalize,
                                                  expert_scale=expert_scale)


def _int_constants(region) -> list[float]:
    """The integers the region's nodes take (a division by top_k, say), as floats: more values a fitted scale may be
    the reciprocal of. (Sizes and dims come along; a fit lands within 1e-6 of one only where the scale is it.)"""
    return [float(c) for n in region for c in (*n.args, *n.kwargs.values())
            if isinstance(c, int) and not isinstance(c, bool)]


def _fitted_scale(draws, spec, consts) -> Optional[float]:
    """The constant the region's weights are the spec's unscaled weights times: a float the region multiplies
    (or divides) by, where one fits; else the least-squares value."""
    num = den = 0.0
    for x, b, expert_scale, (w, i) in draws:
        ref_w, ref_i = routing.reference(x, b, spec, expert_scale=expert_scale)
        ours = w.double().gather(1, i.sort(dim=-1).indices)
        theirs = ref_w.gather(1, ref_i.sort(dim=-1).indices)
        num += float((ours * theirs).sum())
        den += float((theirs * theirs).sum())
    if den == 0.0:
        return None
    fit = num / den
    finite = [c for c in consts if math.isfinite(c) and c]
    for c in [1.0] + finite + [1 / c for c in finite]:
        if abs(fit - c) <= 1e-6 * abs(c):
            return c
    return fit
