"""Symbolic shape facts, checked with sympy.

Under ``dynamic=True`` a dimension in an FX graph is a SymInt whose ``node.expr`` is a sympy expression over
the graph's size symbols. A pattern constraint ("the weight has as many elements as the normalized dim")
is proven by simplifying the difference, never by guessing from one example: a constraint that cannot be
proven for every value of the symbols does not hold.
"""
from __future__ import annotations

from typing import Optional, Sequence

import sympy
import torch
import torch.fx as fx


def expr(dim) -> sympy.Expr:
    if isinstance(dim, torch.SymInt):
        return sympy.sympify(dim.node.expr)
    return sympy.Integer(int(dim))


def known_equal(a, b) -> bool:
    return sympy.simplify(expr(a) - expr(b)) == 0


def known_multiple(a, m: int) -> bool:
    q = sympy.simplify(expr(a) / m)
    return q.is_integer is True


def value(node) -> Optional[torch.Tensor]:
    """The fake tensor an FX node produces (shape/dtype/device), if the graph carries one."""
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val", node.meta.get("example_value"))
    return val if isinstance(val, torch.Tensor) else None


def shape(node) -> Optional[tuple]:
    val = value(node)
    return None if val is None else tuple(val.shape)


def same_shape(a: Sequence, b: Sequence) -> bool:
    return len(a) == len(b) and all(known_equal(x, y) for x, y in zip(a, b))


def hint(dim) -> int:
    """A concrete value for a dimension: the example size Dynamo traced with, for a symbolic one."""
    if isinstance(dim, torch.SymInt):
        return int(dim.node.hint) if dim.node.hint is not None else 1
    return int(dim)


def is_static(dim) -> bool:
    return expr(dim).is_number
