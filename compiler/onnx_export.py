"""The rewritten graph as ONNX: each ``deepfuse::`` op one node of the ``deepfuse`` domain, its non-tensor
parameters as attributes; everything else exported by torch.onnx as usual (opens in Netron).

Each op's ONNX schema is derived from its torch schema: tensor arguments are inputs, the rest attributes.
"""
from __future__ import annotations

from typing import Any

import torch

DOMAIN = "deepfuse"
_TENSORS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)", "tensor(int64)", "tensor(int32)"]


def _translation(overload: torch._ops.OpOverload):
    from onnx.defs import OpSchema
    from onnxscript.values import Op, Opset

    schema = overload._schema
    name = schema.name.split("::")[1]
    def is_tensor(a):  # Tensor, or Optional[Tensor]: an input (an optional one may be left empty)
        t = a.type.getElementType() if a.type.kind() == "OptionalType" else a.type
        return t.kind() == "TensorType"

    tensor_args = [a for a in schema.arguments if is_tensor(a)]
    attr_args = [a for a in schema.arguments if not is_tensor(a)]
    kinds = {"FloatType": OpSchema.AttrType.FLOAT, "BoolType": OpSchema.AttrType.INT,
             "IntType": OpSchema.AttrType.INT}
    param = OpSchema.FormalParameter
    onnx_schema = OpSchema(
        name, DOMAIN, 1,
        inputs=[param(a.name, f"T{i}", param_option=OpSchema.FormalParameterOption.Optional
                      if a.type.kind() == "OptionalType" else OpSchema.FormalParameterOption.Single)
                for i, a in enumerate(tensor_args)],
        outputs=[param(f"out{i}", f"O{i}") for i in range(len(schema.returns))],
        type_constraints=[(f"T{i}", _TENSORS, "") for i in range(len(tensor_args))]
        + [(f"O{i}", _TENSORS, "") for i in range(len(schema.returns))],
        attributes=[OpSchema.Attribute(a.name, kinds.get(a.type.kind(), OpSchema.AttrType.STRING), "")
                    for a in attr_args],
    )
    op = Op(Opset(DOMAIN, 1), name, op_schema=onnx_schema)

    def translate(*args, **kwargs):
        # torch.export drops arguments left at their default: take those from the schema.
        bound = {a.name: a.default_value for a in schema.arguments if a.has_default_value()}
        bound.update(zip([a.name for a in schema.arguments], args), **kwargs)
        attrs: dict[str, Any] = {}
        for a in attr_args:
            v = bound[a.name]
            attrs[a.name] = int(v) if isinstance(v, bool) else v if isinstance(v, (int, float)) else str(v)
        return op(*[bound[a.name] for a in tensor_args], **attrs)

    return translate


def _onnx_dtype(dtype) -> int:
    """torch dtype -> ONNX element type (the exporter may hand over its own dtype enum already)."""
    from onnx import TensorProto

    if not isinstance(dtype, torch.dtype):
        return int(dtype)
    return {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16, torch.bfloat16: TensorProto.BFLOAT16,
            torch.float64: TensorProto.DOUBLE, torch.int64: TensorProto.INT64, torch.int32: TensorProto.INT32,
            torch.bool: TensorProto.BOOL}[dtype]


def _prims_translations() -> dict:
    """The two prims Inductor's decompositions leave in these graphs, which torch.onnx does not translate."""
    from onnxscript import opset18 as op

    def convert_element_type(x, dtype):
        return op.Cast(x, to=_onnx_dtype(dtype))

    def iota(length, *, start, step, dtype, device=None, requires_grad=False):
        return op.Cast(op.Range(start, start + length * step, step), to=_onnx_dtype(dtype))

    return {torch.ops.prims.convert_element_type.default: convert_element_type, torch.ops.prims.iota.default: iota}


def export(gm: torch.fx.GraphModule, example_inputs: list, path: str) -> None:
    """Write ``gm`` (a rewritten aten graph) to ``path`` as ONNX."""
    ops = {n.target for n in gm.graph.nodes
           if isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "deepfuse"}
    table = {op: _translation(op) for op in ops}
    table.update(_prims_translations())
    program = torch.onnx.export(gm, tuple(example_inputs), dynamo=True, custom_translation_table=table,
                                verbose=False, optimize=False)
    program.save(path)
