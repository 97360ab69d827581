"""``options={"quantize": "fp8-block" | "int8-weight"}``: quantize a model's linear weights while compiling it.

Runs on the Dynamo graph, where the parameters are graph inputs whose real tensors the backend holds. Each
``linear(x, W, b)`` whose weight is a 2-D float parameter becomes the plain-torch form of the quantized layer,
reading a quantized copy of W made once (per parameter, per process). The copies are constants of the compiled
graph, pointed before each call at the copies of the parameters that call passes (``QuantizedWeights``): Dynamo
passes parameters as inputs, so a graph compiled for one decoder layer runs every layer of its kind.

* ``fp8-block``: W as float8_e4m3fn in 128 x 128 blocks with fp32 scales; activations quantized per token and
  128-wide K tile; the product in fp32 (DeepSeek-V3's W8A8 recipe);
* ``int8-weight``: W as int8 with one fp32 scale per output channel; activations untouched.

The quant pass then finds these layers like any dequantize-then-matmul in a user's graph and runs them as the
generated kernels; should it decline one, the plain form still computes the right values.

Memory: the float weights stay where the model keeps them (the compiled graph still takes them as inputs) until
the user passes ``release_float_weights=True``; then the storage of every weight that was quantized, and that
the graph reads nowhere else, is freed (resized to 0 bytes), so the process holds only the quantized copies.
After that the model runs only through the compiled module: its eager forward would read freed weights.

With ``fp8-block``, stacked expert weights are converted too: a 3-D float parameter [E, N, K] that the graph
only multiplies with (through indexing, transposes and views, into bmm, matmul, einsum or a grouped matmul)
is stored as FP8 in 128 x 128 blocks and read through ``deepfuse::fp8_block_dequantize``, and the other
operand of each of those matmuls is quantized per token and 128-wide K tile (``fp8_fake_quantize``): the
graph computes the linears' W8A8 recipe, and the moe pass runs those experts as its FP8 kernels (the same
math: activations quantized in registers, FP8 dots), reading the FP8 bytes, half of bf16's at decode. A
stacked weight in a matmul whose K axis is unclear (an einsum contracting two indices, say) stays float.

Not converted: weights used other than as a linear's weight or a stacked matrix (tied embeddings, say),
non-float weights, and those whose module path matches one of ``options["quantize_skip"]``'s patterns (a linear
by its own module, "layers.0.self_attn.q_proj"; a stacked weight by the modules of the matmuls it enters).
"""
from __future__ import annotations

import operator
import re
import weakref
from typing import Callable, Union

import torch
import torch.fx as fx
import torch.nn.functional as F

from .log import log
from .report import module_path

FORMATS = {"fp8-block": "fp8-block", "int8-weight": "int8-channel"}
_LINEARS = (torch._C._nn.linear, F.linear)
# One quantized copy per parameter and format for the life of the parameter: recompiles reuse it, and it never
# reads a weight released after the first compile.
# Keyed by id (tensors compare elementwise, so no WeakKeyDictionary); the entry goes when the parameter does.
_copies: dict[int, tuple[weakref.ref, dict]] = {}


def fp8_block_linear(x, w, scale, bias, block=(128, 128)):
    """The FP8 layer, written out: activations quantized per token and block[1]-wide tile, both operands
    dequantized, the product in fp32, cast back to the activations' dtype."""
    from deepfuse.runtime.kernels import quant

    return quant.reference(x, w, scale, bias, "fp8-block", True, block, out_dtype=x.dtype)


def int8_weight_linear(x, w, scale, bias):
    """The int8 weight-only layer, written out: the weight dequantized to the activations' dtype, then linear."""
    from deepfuse.runtime.kernels import quant

    return F.linear(x, quant.dequantize_weight(w, scale, "int8-channel", dtype=x.dtype), bias)


_FORMS: dict[str, Callable] = {"fp8-block": fp8_block_linear, "int8-channel": int8_weight_linear}


def _quantized(weight: torch.Tensor, fmt: str):
    from deepfuse.runtime.kernels import moe, quant

    entry = _copies.get(id(weight))
    if entry is None or entry[0]() is not weight:
        entry = (weakref.ref(weight, lambda _, key=id(weight): _copies.pop(key, None)), {})
        _copies[id(weight)] = entry
    per_param = entry[1]
    if fmt not in per_param:
        if weight.untyped_storage().nbytes() == 0:
            from .errors import DeepfuseError

            raise DeepfuseError(f"a {tuple(weight.shape)} weight's float storage was released before it was quantized "
                                "(release_float_weights frees each weight once its quantized copy exists)")
        per_param[fmt] = (moe.quantize_experts(weight.detach()) if weight.dim() == 3
                          else quant.quantize_weight(weight.detach(), fmt))
    return per_param[fmt]


# What a stacked weight may pass through on its way into a matmul, and the matmuls (Dynamo-graph targets).
_VIEW_METHODS = {"transpose", "permute", "view", "reshape", "contiguous", "t", "unsqueeze", "squeeze", "expand",
                 "__getitem__", "to"}
_VIEW_FUNCS = {operator.getitem, torch.transpose, torch.permute, torch.reshape, torch.squeeze, torch.unsqueeze}
_MATMUL_FUNCS = {torch.bmm, torch.matmul, operator.matmul, torch.einsum, F.linear, torch._C._nn.linear,
                 getattr(torch, "_grouped_mm", None)} - {None}


def _matmul_uses(node: fx.Node) -> Union[list[tuple[fx.Node, int]], str]:
    """The matmuls (bmm, matmul, einsum, linear, a grouped matmul) every use of ``node`` reaches through
    view-like steps only, each with the position of the operand that carries it; or why not."""
    stack, seen, found = [(use, node) for use in node.users], set(), []
    while stack:
        use, via = stack.pop()
        if use in seen:
            continue
        seen.add(use)
        target = use.target
        if ((use.op == "call_function" and (target in _MATMUL_FUNCS or "grouped_mm" in str(target)))
                or (use.op == "call_method" and target in ("bmm", "matmul"))):
            operands = use.args[1:] if target is torch.einsum else use.args
            if isinstance(operands[0], (list, tuple)):  # einsum(eq, [a, b])
                operands = operands[0]
            found.append((use, [i for i, a in enumerate(operands) if a is via]))
            continue
        if (use.op == "call_function" and target in _VIEW_FUNCS) or (use.op == "call_method" and target in _VIEW_METHODS):
            if not use.users:
                return f"{use.name} is unused"
            stack.extend((u, use) for u in use.users)
            continue
        return f"it is used by {use.name} ({target if isinstance(target, str) else getattr(target, '__name__', target)})"
    if not found:
        return "it is not used"
    if any(len(positions) != 1 for _, positions in found):
        return "a matmul takes it as both operands"
    return [(use, positions[0]) for use, positions in found]


def _activation_operand(matmul: fx.Node, weight_at: int) -> Union[tuple[int, int], str]:
    """(position of the activation operand, its K axis) in a matmul whose operand ``weight_at`` is an expert
    weight (or a view of one): for x @ W the activations' last axis, for W @ x their next-to-last; for einsum
    the one index the two operands contract."""
    if matmul.target is torch.einsum:
        operands = matmul.args[1:]
        if isinstance(operands[0], (list, tuple)) or len(operands) != 2:
            return "an einsum not of two operands"
        equation = matmul.args[0].replace(" ", "")
        if "..." in equation or "->" not in equation:
            return f"einsum {equation!r} (an ellipsis or an implicit output)"
        ins, out = equation.split("->")
        subs = ins.split(",")
        act = 1 - weight_at
        contracted = [c for c in subs[act] if c in subs[weight_at] and c not in out]
        if len(contracted) != 1:
            return f"einsum {equation!r} contracts {len(contracted)} indices"
        return act + 1, subs[act].index(contracted[0])  # args[0] is the equation
    if matmul.target in (F.linear, torch._C._nn.linear):
        return (0, -1) if weight_at == 1 else "a linear taking it as its input"
    return (0, -1) if weight_at == 1 else (1, -2)


def fp8_fake_quantize(v: torch.Tensor, axis: int) -> torch.Tensor:
    """``v`` quantized to e4m3 per 128-wide tile along ``axis`` (one fp32 scale per tile and every other index:
    per token), then dequantized to its dtype: the activations of an FP8 W8A8 matmul, written out."""
    from deepfuse.runtime.kernels import quant

    return quant.fake_quantize_activation(v, quant.DEFAULT_BLOCK[1], axis)


def _register(gm: fx.GraphModule, name: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` kept on the graph under ``name`` (lifted by AOTAutograd as a constant input), as a tensor of its own
    that shares t's storage: ``QuantizedWeights.bind`` points it at another layer's copy before a call."""
    proxy = torch.empty(0, dtype=t.dtype, device=t.device).set_(t)
    gm.register_buffer(name, proxy)
    if hasattr(gm, "_param_name_to_source"):  # AOTAutograd matches Dynamo's lifted params to sources
        from torch._dynamo.source import ConstantSource

        gm._param_name_to_source[name] = ConstantSource(name)
    return proxy


class QuantizedWeights:
    """Which float parameter each quantized copy on a converted graph was made from, so that every call reads the
    copies of the weights it is given. Dynamo passes parameters as graph inputs, so one compiled graph serves
    every module of the same code: compiled block by block, the first decoder layer's graph runs all the others,
    each with its own weights. ``bind`` points the graph's constants at the copies of the parameters a call passes
    (quantizing a weight the first time it is seen, and releasing its float storage when asked)."""

    def __init__(self, release: bool):
        self.release = release
        # (position of the float parameter among the graph's inputs, format, the graph's constants for it,
        # whether its float storage may go once quantized)
        self.sources: list[tuple[int, str, tuple[torch.Tensor, torch.Tensor], bool]] = []
        self._bound: list = []  # per source: the weight its constants point at now (a weak reference)
        # per source: id(weight) -> (a weak reference to it, its copies), checked once; gone with the weight
        self._seen: list[dict] = []

    def add(self, position: int, fmt: str, proxies: tuple[torch.Tensor, torch.Tensor], releasable: bool) -> None:
        self.sources.append((position, fmt, proxies, releasable))
        self._bound.append(None)
        self._seen.append({})

    def bind(self, args) -> None:
        for i, (position, fmt, proxies, releasable) in enumerate(self.sources):
            weight = args[position]
            bound = self._bound[i]
            if bound is not None and bound() is weight:
                continue  # (the same module as the last call: a model compiled whole, every call)
            seen = self._seen[i].get(id(weight))
            if seen is None or seen[0]() is not weight:
                forget = lambda _, entries=self._seen[i], key=id(weight): entries.pop(key, None)  # noqa: E731
                seen = (weakref.ref(weight, forget), self._copies(weight, fmt, proxies, releasable))
                self._seen[i][id(weight)] = seen
            for proxy, copy in zip(proxies, seen[1]):
                proxy.set_(copy)
            self._bound[i] = seen[0]

    def _copies(self, weight: torch.Tensor, fmt: str, proxies, releasable: bool) -> tuple:
        """The quantized copies of ``weight`` (made if new), checked against the graph's constants; its float
        storage released when asked."""
        copies = _quantized(weight, fmt)
        for proxy, copy in zip(proxies, copies):
            if proxy.shape != copy.shape or proxy.dtype != copy.dtype:
                from .errors import DeepfuseError

                raise DeepfuseError(f"a graph quantized for a {tuple(proxy.shape)} {proxy.dtype} weight copy was "
                                    f"called with one of {tuple(copy.shape)} {copy.dtype}")
        if self.release and releasable and weight.untyped_storage().nbytes():
            weight.data.untyped_storage().resize_(0)
        return copies


def _skipped(paths: list[str], skip: tuple[str, ...]) -> str:
    """The first of ``paths`` (module paths) that a ``skip`` pattern matches, or ''."""
    return next((path for path in paths for pattern in skip if re.search(pattern, path)), "")


def quantize_experts(gm: fx.GraphModule, real: dict, weights: QuantizedWeights, skip: tuple[str, ...] = ()) -> int:
    """Stacked expert weights to FP8 blocks read through ``deepfuse::fp8_block_dequantize``, the activations of
    every matmul they enter quantized per token and 128-wide K tile (W8A8, as the linears), each noted in
    ``weights``; returns how many were converted. A weight entering a matmul of a module that a ``skip`` pattern
    matches stays float."""
    import deepfuse.runtime.ops  # noqa: F401  (registers deepfuse::fp8_block_dequantize)

    converted = 0
    first = next((n for n in gm.graph.nodes if n.op != "placeholder"), None)
    for position, node in enumerate([n for n in gm.graph.nodes if n.op == "placeholder"]):
        weight = real.get(node)
        if (not isinstance(weight, torch.nn.Parameter) or weight.dim() != 3 or weight.shape[0] < 2
                or weight.dtype not in (torch.float16, torch.bfloat16, torch.float32)):
            continue
        uses = _matmul_uses(node)
        acts = [_activation_operand(*use) for use in uses] if not isinstance(uses, str) else [uses]
        why = next((a for a in acts if isinstance(a, str)), None)
        if why is not None:
            if isinstance(uses, list):  # a stacked weight that is multiplied, in a form whose K axis is unclear
                log.info("quantize='fp8-block': stacked weight %s stays %s: %s", node.name, weight.dtype, why)
            continue
        skipped = _skipped([module_path(matmul) for matmul, _ in uses], skip)
        if skipped:
            log.info("quantize='fp8-block': stacked weight %s of %s stays %s (quantize_skip)", node.name, skipped,
                     weight.dtype)
            continue
        q, s = _quantized(weight, "fp8-block")
        names = [f"_deepfuse_fp8_block_experts_{part}_{converted}" for part in ("weight", "scale")]
        weights.add(position, "fp8-block", tuple(_register(gm, name, t) for name, t in zip(names, (q, s))), True)
        with gm.graph.inserting_before(first):
            q_node, s_node = gm.graph.get_attr(names[0]), gm.graph.get_attr(names[1])
            deq = gm.graph.call_function(torch.ops.deepfuse.fp8_block_dequantize.default, (q_node, s_node, weight.dtype))
        node.replace_all_uses_with(deq)
        for (matmul, _), (position, axis) in zip(uses, acts):
            operand = matmul.args[position]
            with gm.graph.inserting_before(matmul):
                fq = gm.graph.call_function(fp8_fake_quantize, (operand, axis))
            matmul.update_arg(position, fq)
        converted += 1
    return converted


def quantize_linears(gm: fx.GraphModule, example_inputs: list, fmt: str, release: bool,
                     skip: tuple[str, ...] = ()) -> QuantizedWeights:
    """Rewrite ``gm``'s linear layers in place, but those of modules a ``skip`` pattern matches (and with
    ``fp8-block`` its stacked expert weights alike); returns the converted weights: their ``bind``, run before
    each call, makes the compiled graph read the copies of the weights that call passes."""
    kernel_fmt = FORMATS[fmt]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    real = dict(zip(placeholders, example_inputs))
    position = {n: i for i, n in enumerate(placeholders)}
    weights = QuantizedWeights(release)
    converted, kept = 0, 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _LINEARS:
            continue
        args = list(node.args) + [None] * (3 - len(node.args))
        x, w, bias = args[0], args[1], node.kwargs.get("bias", args[2])
        weight = real.get(w)
        if not isinstance(weight, torch.nn.Parameter) or weight.dim() != 2:
            continue
        if weight.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            continue
        if _skipped([module_path(node)], skip):
            kept += 1
            continue
        names = [f"_deepfuse_{fmt.replace('-', '_')}_{part}_{converted}" for part in ("weight", "scale")]
        proxies = tuple(_register(gm, name, t) for name, t in zip(names, _quantized(weight, kernel_fmt)))
        with gm.graph.inserting_before(node):
            q_node, s_node = gm.graph.get_attr(names[0]), gm.graph.get_attr(names[1])
            new = gm.graph.call_function(_FORMS[kernel_fmt], (x, q_node, s_node, bias))
        new.meta.update({k: v for k, v in node.meta.items() if k in ("stack_trace", "nn_module_stack",
                                                                         "source_fn_stack")})
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        converted += 1
        weights.add(position[w], kernel_fmt, proxies, releasable=not w.users)  # (the graph reads it nowhere else)
    experts = quantize_experts(gm, real, weights, skip) if fmt == "fp8-block" else 0
    gm.graph.lint()
    gm.recompile()
    weights.bind(example_inputs)  # (releases the example's float copies, when asked)
    if converted or experts or kept:
        log.info("quantize=%r: %d linear weights%s converted%s%s", fmt, converted,
                 f" and {experts} stacked expert weights" if experts else "",
                 f", {kept} linear weights kept (quantize_skip)" if kept else "",
                 ", the float copies released" if release else "")
    return weights
