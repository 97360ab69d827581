"""The frame every pattern pass runs in: find bindings, decline or accept, rewrite into one deepfuse op.

A pass (``deepfuse.passes.<family>``) declares its patterns and implements two things:
``analyze(binding) -> dict | str`` reads the parameters off the graph (a str is the reason to decline),
``rewrite(graph, binding, params, impl) -> (fx.Node, op name, kernel file)`` builds the replacement.
Everything else (escape checks, logging, report rows, graph surgery) is shared here.
"""
from __future__ import annotations

import hashlib
import operator
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.fx as fx

from .errors import RewriteError
from .log import log
from .options import Options
from .pattern import Binding, HostGraph, Pattern
from .report import Declined, Match, Report, module_path, source_line
from .shapes import hint, value


class FusionPass:
    family: str = ""
    patterns: Sequence[Pattern] = ()

    def analyze(self, binding: Binding) -> Union[dict[str, Any], str]:
        raise NotImplementedError

    def rewrite(self, graph: fx.Graph, binding: Binding, params: dict[str, Any], impl: str) -> tuple[str, Optional[str]]:
        raise NotImplementedError

    def run(self, graph: fx.Graph, options: Options, report: Report, host: Optional[HostGraph] = None) -> int:
        self.options = options
        host = host or HostGraph(graph)
        claimed: set[fx.Node] = set()
        changed = 0
        for pattern in self.patterns:
            for binding in pattern.match(host, claimed):
                origin = binding.outputs[0]
                where = (source_line(origin), module_path(origin))
                reason = escape_reason(binding.interior, binding.outputs)
                params = reason if reason else self.analyze(binding)
                if isinstance(params, str):
                    report.declined.append(Declined(self.family, params, *where))
                    log.info("declined %s at %s (%s): %s", self.family, where[1] or "?", where[0], params)
                    continue
                claimed.update(binding.interior)
                device = value(origin).device.type if value(origin) is not None else "cpu"
                impl = options.kernel_impl(device)
                op_name, kernel_file = self.rewrite(graph, binding, params, impl)
                report.matches.append(Match(self.family, op_name, params, *where, impl=impl, kernel_file=kernel_file))
                log.info("matched %s -> %s [%s] at %s (%s) %s", self.family, op_name, impl, where[1] or "?", where[0], params)
                changed += 1
        return changed


class RegionBinding:
    """A region found by analysis rather than a declared pattern, in the shape the replace functions take:
    its interior nodes and the value it produces (or the values, in the replacement's output order)."""

    def __init__(self, interior: Sequence[fx.Node], out: Union[fx.Node, Sequence[fx.Node]]):
        self.interior = list(interior)
        self.outputs = [out] if isinstance(out, fx.Node) else list(out)


def ancestors(nodes: Sequence[fx.Node], blocked=frozenset(),
              stop: Optional[Callable[[fx.Node], bool]] = None) -> set[fx.Node]:
    """``nodes`` and everything they are computed from, not walking through ``blocked`` nor nodes ``stop``
    is true of."""
    seen, stack = set(nodes), list(nodes)
    while stack:
        for a in stack.pop().all_input_nodes:
            if a not in seen and a not in blocked and not (stop is not None and stop(a)):
                seen.add(a)
                stack.append(a)
    return seen


def descendants(nodes: Sequence[fx.Node]) -> set[fx.Node]:
    """``nodes`` and everything computed from them."""
    seen, stack = set(nodes), list(nodes)
    while stack:
        for u in stack.pop().users:
            if u not in seen:
                seen.add(u)
                stack.append(u)
    return seen


def post_dominates(cand: fx.Node, start: fx.Node) -> bool:
    """Does every path from ``start`` to the graph's output pass through ``cand``?"""
    seen, stack = {start}, [start]
    while stack:
        for u in stack.pop().users:
            if u is cand or u in seen:
                continue
            if u.op == "output":
                return False
            seen.add(u)
            stack.append(u)
    return True


def escape_reason(interior: Sequence[fx.Node], outputs: Sequence[fx.Node]) -> Optional[str]:
    """Why a region cannot be replaced: an interior value (not one of its outputs) is used outside it."""
    inside, outs = set(interior), set(outputs)
    escaping = [n for n in interior if n not in outs and any(u not in inside for u in n.users)]
    if not escaping:
        return None
    users = sorted({u.name for n in escaping for u in n.users if u.op == "output"})
    why = " (an output of the graph: saved for backward in a training graph?)" if users else ""
    return f"intermediate value {escaping[0].name} is used outside the region{why}"


def region_module(nodes: Sequence[fx.Node], inputs: Sequence[fx.Node], out: fx.Node) -> fx.GraphModule:
    """``nodes`` of one graph as a runnable module of ``inputs`` (its placeholders, in order) returning ``out``,
    for a pass to check what a region computes by running it. The nodes are copied in graph order; a size
    symbol the region reads or holds becomes its traced example value. Raises ValueError naming the first
    other value it reads, which the check cannot make."""
    order = {n: i for i, n in enumerate(out.graph.nodes)}
    sub = fx.Graph()
    env = {n: sub.placeholder(f"in{i}") for i, n in enumerate(inputs)}
    for n in sorted(nodes, key=order.__getitem__):
        if n in env:
            continue
        if n.op in ("placeholder", "get_attr") and isinstance(n.meta.get("val"), (torch.SymInt, int)):
            env[n] = hint(n.meta["val"])  # a size symbol: its traced example value
            continue
        for a in n.all_input_nodes:
            if a not in env and a not in nodes:
                v = a.meta.get("val")
                if not isinstance(v, (torch.SymInt, int)):
                    raise ValueError(f"reads {a.name}, which the check cannot make")
                env[a] = hint(v)
        env[n] = sub.node_copy(n, lambda a: env[a])
    sub.output(env[out])
    return fx.GraphModule(torch.nn.Module(), sub)


def region_key(nodes: Sequence[fx.Node], inputs: Sequence[fx.Node], outs: Sequence[fx.Node]) -> Optional[str]:
    """A key two regions share when ``region_module`` would build the same module from them over inputs of the
    same shapes and dtypes, so one check by running stands for both (a model's identical layers, in one graph):
    each node's op, target and arguments, with nodes written as their place in the region and size symbols as
    their traced example values. None where the region reads another value (its check says why)."""
    order = {n: i for i, n in enumerate(outs[0].graph.nodes)}
    body = sorted(set(nodes) - set(inputs), key=order.__getitem__)
    place = {**{n: ("in", i) for i, n in enumerate(inputs)}, **{n: ("node", i) for i, n in enumerate(body)}}
    rows = []

    def arg(a):
        if isinstance(a, fx.Node):
            if a in place:
                return place[a]
            v = a.meta.get("val")
            if isinstance(v, (torch.SymInt, int)):
                return ("size", hint(v))
            raise LookupError(a.name)
        if isinstance(a, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return ("symbol", repr(a.node.hint))
        if isinstance(a, torch.Tensor):  # (a constant tensor's repr is abbreviated: no key)
            raise LookupError("a tensor constant")
        return repr(a)

    try:
        for n in body:
            if n.op in ("placeholder", "get_attr"):
                v = n.meta.get("val")
                if not isinstance(v, (torch.SymInt, int)):
                    return None
                rows.append(("size", hint(v)))
                continue
            rows.append((n.op, str(n.target), fx.node.map_aggregate(n.args, arg), fx.node.map_aggregate(n.kwargs, arg)))
        rows.append(tuple(place.get(o) for o in outs))
    except LookupError:
        return None
    for n in inputs:
        v = n.meta.get("val")
        rows.append((tuple(hint(d) for d in v.shape), str(v.dtype), v.device.type) if isinstance(v, torch.Tensor)
                    else repr(v))
    return hashlib.sha256(repr(rows).encode()).hexdigest()


def checked_once(checked: dict, key: Optional[str], check: Callable[[], Any]) -> Any:
    """``check()``, or what it gave for an earlier region of the same ``region_key`` (kept in ``checked``)."""
    if key is None:
        return check()
    if key not in checked:
        checked[key] = check()
    return checked[key]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64: how the passes compare a region's result with a kernel's reference."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def replace_region(graph: fx.Graph, binding: Binding, target: Callable, args: tuple, n_outputs: int) -> list[fx.Node]:
    """Replace ``binding`` by one call of ``target``; its outputs take the place of the pattern's outputs.

    The pattern's ``outputs`` order is the op's output order. Shapes/dtypes of the new nodes come from
    running the op's fake implementation in the graph's fake mode.
    """
    order = {n: i for i, n in enumerate(graph.nodes)}
    last = max(binding.interior, key=order.__getitem__)
    with graph.inserting_before(last):
        call = graph.call_function(target, args)
        outs = [call] if n_outputs == 1 else [graph.call_function(operator.getitem, (call, i)) for i in range(n_outputs)]
    _propagate_fake(call, outs, args)
    origin = binding.outputs[0]
    for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
        if key in origin.meta:
            call.meta[key] = origin.meta[key]
    _take_over(graph, binding, outs, order)
    return outs


def _take_over(graph: fx.Graph, binding, outs: list[fx.Node], order: dict) -> None:
    """The new outputs take the region's uses; the region is erased; the graph is put back in order. A new
    output of another dtype or rank than the value it replaces is a bug in the rewrite: the nodes it added (those
    not in ``order``) are erased, the region stays, and RewriteError says why: never a graph that computes
    something else."""
    for old, new in zip(binding.outputs, outs):
        was, now = old.meta.get("val"), new.meta.get("val")
        if isinstance(was, torch.Tensor) and isinstance(now, torch.Tensor) and (
                was.dtype != now.dtype or was.dim() != now.dim()):
            for node in reversed([n for n in graph.nodes if n not in order]):
                if not node.users:
                    graph.erase_node(node)
            raise RewriteError(f"the rewrite of {old.name} returns {now.dtype} {list(now.shape)} where the graph "
                               f"had {was.dtype} {list(was.shape)} (a deepfuse bug; the region stays unfused)")
    for old, new in zip(binding.outputs, outs):
        old.replace_all_uses_with(new)
    for node in sorted(binding.interior, key=order.__getitem__, reverse=True):
        if not node.users:
            graph.erase_node(node)
    _stable_toposort(graph)


def replace_region_inline_or_op(graph: fx.Graph, binding, launcher: Callable, args: tuple, op,
                                op_args: Callable[[], tuple], n_outputs: int) -> str:
    """Trace ``launcher`` into the graph; if tracing fails (an unforeseen symbolic shape, say), call the
    deepfuse op instead, which runs the same kernel from Python: slower, never wrong. ``op_args()`` builds
    the op's arguments (only then). Returns "inlined" or "op"."""
    try:
        replace_region_traced(graph, binding, launcher, args)
        return "inlined"
    except Exception as err:  # tracing happens before the graph is touched
        log.warning("could not trace the kernel launch into the graph (%s: %s); calling %s instead",
                    type(err).__name__, str(err)[:200], op)
        replace_region(graph, binding, op, op_args(), n_outputs)
        return "op"


def replace_region_first_traced(graph: fx.Graph, binding, launchers: Sequence[Callable], args: tuple,
                                what: str) -> bool:
    """Replace ``binding`` by the trace of the first of ``launchers`` that traces (the kernel launch, then the
    deepfuse op call as the fallback); False, the graph untouched, if none does."""
    for launcher in launchers:
        try:
            replace_region_traced(graph, binding, launcher, args)
            return True
        except Exception as err:  # tracing happens before the graph is touched
            log.warning("could not trace the %s %s into the graph (%s: %s)", what, launcher.__name__,
                        type(err).__name__, str(err)[:200])
    return False


def replace_region_traced(graph: fx.Graph, binding: Binding, launcher: Callable, args: tuple) -> list[fx.Node]:
    """Replace ``binding`` by the trace of ``launcher(*args)``: the aten ops it runs and its Triton launches,
    which ``torch.library.wrap_triton`` records as Inductor's user-defined-kernel nodes. Inductor then
    launches the generated kernel itself (no Python per call, CUDA-graph capturable), in graph order.

    The launcher returns a tuple of tensors in the pattern's ``outputs`` order (None for absent ones).
    """
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.traceback import preserve_node_meta

    positions = [i for i, a in enumerate(args) if isinstance(a, fx.Node)]
    vals = [args[i].meta["val"] for i in positions]
    fake_mode = torch._guards.detect_fake_mode(vals)

    def traced(*tensors):
        full = list(args)
        for i, t in zip(positions, tensors):
            full[i] = t
        return tuple(o for o in launcher(*full) if o is not None)

    with fake_mode, torch._dispatch.python.enable_python_dispatcher(), preserve_node_meta():
        # Views stay views: as view_copy ops Inductor would materialize them (an MLA decode step copied the
        # W_UK and W_UV slices of kv_b_proj, 2 MB each, per layer and step).
        gm = make_fx(torch.func.functionalize(traced, remove="mutations"), select_decomp_table(),
                     tracing_mode="real")(*vals)
    order = {n: i for i, n in enumerate(graph.nodes)}
    last = max(binding.interior, key=order.__getitem__)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    val_map = {p: args[i] for p, i in zip(placeholders, positions)}
    with graph.inserting_before(last):
        result = graph.graph_copy(gm.graph, val_map)
    outs = list(result) if isinstance(result, (tuple, list)) else [result]
    origin = binding.outputs[0]
    for new in graph.nodes:
        if new not in order and "stack_trace" in origin.meta:
            new.meta.setdefault("stack_trace", origin.meta["stack_trace"])
    _take_over(graph, binding, outs, order)
    return outs


def _propagate_fake(call: fx.Node, outs: list[fx.Node], args: tuple) -> None:
    vals = [a.meta.get("val") for a in args if isinstance(a, fx.Node)]
    fake_mode = torch._guards.detect_fake_mode(vals)
    fake_args = tuple(a.meta.get("val") if isinstance(a, fx.Node) else a for a in args)
    if fake_mode is None:
        return
    with fake_mode:
        result = call.target(*fake_args)
    call.meta["val"] = result
    if len(outs) > 1 or outs[0] is not call:
        for i, o in enumerate(outs):
            o.meta["val"] = result[i]


def _stable_toposort(graph: fx.Graph) -> None:
    from torch._inductor.pattern_matcher import stable_topological_sort

    stable_topological_sort(graph)
