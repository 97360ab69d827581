"""RMSNorm, optionally with the residual add in front of it: the worked example of a pattern family.

Matches the aten form every RMSNorm in the wild lowers to (HF/DeepSeek ``RMSNorm`` modules, ``F.rms_norm``,
``nn.RMSNorm``):  [h = a + b] -> [to fp32] -> pow 2 -> mean(-1, keepdim) -> + eps -> rsqrt -> mul
-> [to input dtype] -> mul weight -> [to out dtype], and rewrites it into ``deepfuse::rms_norm`` or
``deepfuse::add_rms_norm`` (one kernel that also writes h, the next residual).
"""
from __future__ import annotations

from typing import Any, Union

import torch
import torch.fx as fx

from deepfuse.fusion import FusionPass, replace_region, replace_region_inline_or_op
from deepfuse.pattern import Binding, Input, Op, Pattern
from deepfuse.report import module_path, source_line
from deepfuse.shapes import hint, is_static, same_shape, value
from deepfuse.runtime import ops  # noqa: F401  (registers torch.ops.deepfuse.*)
from deepfuse.runtime.kernels import rms_norm as kernel

aten, prims = torch.ops.aten, torch.ops.prims
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
MAX_HIDDEN = 65536  # the single-pass kernel keeps a whole row in registers
# Writes into another tensor, by where the written values are among the arguments: a norm whose every result
# ends up only there (a latent cache's write; a key norm's, through the rope, into HF's StaticCache) is left to
# Inductor, which computes it inside that write's kernel.
_WRITES = {
    aten.index_put.default: 2, aten.index_put_.default: 2, aten.index_copy.default: 3, aten.index_copy_.default: 3,
    aten.slice_scatter.default: 1, aten.select_scatter.default: 1, aten.copy_.default: 1, aten.copy.default: 1,
}
# What Inductor fuses on the way to such a write: the per-row amax of an FP8 cache's scale, besides pointwise ops.
_ROW_REDUCTIONS = {aten.amax.default, aten.max.dim}


def cast_dtype(n: fx.Node):
    """The dtype a pure dtype cast converts to (prims.convert_element_type, or a dtype-only _to_copy)."""
    if n.target == prims.convert_element_type.default:
        return n.args[1]
    if set(n.kwargs) <= {"dtype", "memory_format"} and len(n.args) == 1:
        return n.kwargs.get("dtype")
    return None


def _to(dtype=None):
    def check(n: fx.Node) -> bool:
        to = cast_dtype(n)
        return to is not None and (dtype is None or to == dtype)

    return check


def _is_square(n: fx.Node) -> bool:
    if n.target == aten.pow.Tensor_Scalar:
        return n.args[1] == 2
    return n.target == aten.mul.Tensor and n.args[0] is n.args[1]


def _last_dim_mean(n: fx.Node) -> bool:
    val = value(n.args[0])
    dims = n.args[1] if len(n.args) > 1 else None
    keepdim = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
    return val is not None and keepdim and list(dims or []) in ([-1], [val.dim() - 1]) and "dtype" not in n.kwargs


def _plus_scalar(n: fx.Node) -> bool:
    eps = n.args[1] if len(n.args) == 2 else None
    if isinstance(eps, fx.Node):  # a float Dynamo made a graph input; analyze() declines it with the fix
        val = value(eps)
        return val is not None and val.dim() == 0 and not n.kwargs
    return isinstance(eps, (int, float)) and not n.kwargs


def _plain_add(n: fx.Node) -> bool:
    return len(n.args) == 2 and all(isinstance(a, fx.Node) for a in n.args) and not n.kwargs


def rms_pattern(residual: bool) -> Pattern:
    convert = (prims.convert_element_type.default, aten._to_copy.default)
    nodes = {
        "w": Input(),
        "to_fp32": Op(convert, ("h",), where=_to(torch.float32), optional=True),
        "square": Op((aten.pow.Tensor_Scalar, aten.mul.Tensor), ("to_fp32",), where=_is_square),
        "mean": Op((aten.mean.dim,), ("square",), where=_last_dim_mean),
        "plus_eps": Op((aten.add.Tensor, aten.add.Scalar), ("mean",), where=_plus_scalar, open_inputs=True),
        "rsqrt": Op((aten.rsqrt.default,), ("plus_eps",)),
        "normed": Op((aten.mul.Tensor,), ("to_fp32", "rsqrt")),
        "to_input_dtype": Op(convert, ("normed",), where=_to(), optional=True),
        "scaled": Op((aten.mul.Tensor,), ("to_input_dtype", "w")),
        "to_out_dtype": Op(convert, ("scaled",), where=_to(), optional=True),
    }
    if residual:
        nodes.update(a=Input(), b=Input(), h=Op((aten.add.Tensor,), ("a", "b"), where=_plain_add))
        return Pattern("add_rms_norm", nodes, outputs=("to_out_dtype", "h"))
    nodes.update(h=Input())
    return Pattern("rms_norm", nodes, outputs=("to_out_dtype",))


def _only_stored(node: fx.Node) -> bool:
    """Whether every use of ``node`` ends, through pointwise ops, views, casts, concatenations and per-row maxima,
    as the values of a write into another tensor (``_WRITES``): nothing downstream reads it in a matmul or a
    deepfuse op."""
    todo, seen, stored = [node], {node}, False
    while todo:
        n = todo.pop()
        for user in n.users:
            if user.op != "call_function":
                return False
            at = _WRITES.get(user.target)
            if at is not None:
                if any(n in (a if isinstance(a, (list, tuple)) else [a]) for i, a in enumerate(user.args) if i != at):
                    return False  # written into, or an index
                stored = True
                continue
            fusable = isinstance(user.target, torch._ops.OpOverload) and (
                torch.Tag.pointwise in user.target.tags or user.target in _ROW_REDUCTIONS
                or torch.Tag.view_copy in user.target.tags or cast_dtype(user) is not None
                or user.target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default,
                                   aten.unsqueeze.default, aten.squeeze.dim, aten.expand.default, aten.permute.default,
                                   aten.transpose.int, aten.slice.Tensor, aten.select.int, aten.clone.default,
                                   aten.cat.default))  # (a rope's rotate_half: Inductor computes a cat pointwise)
            if not fusable:
                return False
            if user not in seen:
                seen.add(user)
                todo.append(user)
    return stored


class RMSNormPass(FusionPass):
    family = "rms_norm"
    # The residual form first, so it claims the add before the plain form claims the norm alone.
    patterns = (rms_pattern(residual=True), rms_pattern(residual=False))

    def analyze(self, b: Binding) -> Union[dict[str, Any], str]:
        x, w, y = value(b["h"]), value(b["w"]), value(b.outputs[0])
        if x is None or w is None or y is None:
            return "no shape information on the graph"
        n = x.shape[-1]
        if not is_static(n):
            return f"hidden size {n} is symbolic; the kernel specializes on it"
        if w.dim() != 1 or not same_shape(w.shape, (n,)):
            return f"weight shape {tuple(w.shape)} is not ({n},)"
        if n > MAX_HIDDEN:
            return f"hidden size {n} exceeds {MAX_HIDDEN} (single-pass kernel)"
        if x.dtype not in _FLOATS or w.dtype not in _FLOATS or y.dtype not in _FLOATS:
            return f"unsupported dtypes (input {x.dtype}, weight {w.dtype}, output {y.dtype})"
        if not b.has("to_fp32") and x.dtype != torch.float32:
            return f"the mean of squares is computed in {x.dtype}, not fp32; the kernel would not match it"
        if isinstance(b["plus_eps"].args[1], fx.Node):
            return (
                "eps is a runtime graph input (Dynamo does not specialize float attributes under dynamic=True); "
                "set torch._dynamo.config.specialize_float = True to make it a constant"
            )
        cast_first = b.has("to_input_dtype")
        if cast_first and cast_dtype(b["to_input_dtype"]) != x.dtype:
            return "the normalized row is cast to a dtype other than the input's"
        if b.pattern.family == "rms_norm" and self.options.inductor and _only_stored(b.outputs[0]):
            return ("its result is only stored (a cache write, through pointwise ops): Inductor computes the norm "
                    "inside the store's kernel, where a deepfuse kernel would be one more launch")
        if b.pattern.family == "add_rms_norm":
            a, c = value(b["a"]), value(b["b"])
            if a is None or c is None or not (same_shape(a.shape, x.shape) and same_shape(c.shape, x.shape)):
                return "the residual add broadcasts"
            if not (a.dtype == c.dtype == x.dtype):
                return "the residual add mixes dtypes"
        return {
            "hidden": int(n),
            "eps": float(b["plus_eps"].args[1]),
            "residual_add": b.pattern.family == "add_rms_norm",
            "cast_before_weight": cast_first,
            "dtype": str(x.dtype).replace("torch.", ""),
            "out_dtype": str(y.dtype).replace("torch.", ""),
        }

    def rewrite(self, graph: fx.Graph, b: Binding, params: dict[str, Any], impl: str):
        """GPU ("triton"): the launcher is traced into the graph, so Inductor launches the generated kernel.
        CPU ("reference"): the op's plain-torch reference is traced in, and Inductor compiles it.
        Interpreter: a call to the deepfuse op, which runs the kernel through Triton's interpreter."""
        x, w, y = value(b["h"]), value(b["w"]), value(b.outputs[0])
        residual, cast_first, eps = params["residual_add"], params["cast_before_weight"], params["eps"]
        name = "add_rms_norm" if residual else "rms_norm"
        inputs = (b["a"], b["b"], b["w"]) if residual else (b["h"], b["w"])
        spec = (x.dtype, w.dtype, y.dtype, residual, cast_first)
        origin = f"{module_path(b.outputs[0]) or '?'} ({source_line(b.outputs[0])})"
        kernel_file = None
        if impl != "reference":
            gen, _ = kernel.kernel_for(params["hidden"], *spec, origin)
            kernel_file = str(gen.path)
        if impl == "interpret" or not self.options.inline:
            op = getattr(torch.ops.deepfuse, name).default
            replace_region(graph, b, op, inputs + (eps, cast_first, y.dtype, impl), 2 if residual else 1)
            return f"deepfuse::{name}", kernel_file

        if impl == "triton":
            from torch._subclasses.fake_tensor import unset_fake_temporarily

            with unset_fake_temporarily():
                config = kernel.tune(tuple(hint(d) for d in x.shape), *spec, x.device, origin)

            def run(h, weight, r):
                return kernel.launch(h, weight, r, eps, cast_first, y.dtype, config=config)
        else:
            def run(h, weight, r):
                return kernel.reference(h, weight, r, eps, cast_first, y.dtype)

        launcher = (lambda a, c, weight: run(a, weight, c)) if residual else (lambda h, weight: run(h, weight, None))
        op = getattr(torch.ops.deepfuse, name).default
        replace_region_inline_or_op(graph, b, launcher, inputs, op, lambda: inputs + (eps, cast_first, y.dtype, impl),
                                    2 if residual else 1)
        return f"deepfuse::{name}", kernel_file
