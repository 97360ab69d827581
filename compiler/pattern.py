"""Declarative graph patterns, matched by subgraph monomorphism over a networkx view of an FX graph.

A pattern names its nodes: ``Op`` nodes (a call to one of a set of aten ops, with the pattern nodes that feed
it) and ``Input`` nodes (any value flowing in from outside). An ``Op`` marked ``optional`` is a pass-through
(a dtype cast, say) that a model may or may not have; the engine expands a pattern into its variants, all
optional nodes present first. Matching is anchored: every host node that could play the pattern's rarest op
seeds a match over its neighbourhood only, so the cost grows with the number of candidates, not with the
square of the graph.

A match is accepted only if:
- every ``Op`` node's graph inputs are exactly the pattern inputs declared for it (no hidden extra operand),
- every ``where`` predicate holds,
- no interior value escapes: only the pattern's ``outputs`` may have users outside the match (in a training
  graph, for instance, a value saved for backward escapes, and the region is declined).
What a pass does with a match (read parameters, check shapes, decline, rewrite) is the pass's business.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Optional, Sequence, Union

import networkx as nx
from networkx.algorithms.isomorphism import DiGraphMatcher
import torch.fx as fx

Predicate = Callable[[fx.Node], bool]


@dataclass(frozen=True)
class Op:
    targets: tuple
    inputs: tuple[str, ...] = ()
    where: Optional[Predicate] = None
    optional: bool = False
    #: The host node may read graph values beyond ``inputs`` (its ``where`` and the pass vet them).
    open_inputs: bool = False

    def accepts(self, node: fx.Node) -> bool:
        if node.op != "call_function":
            return False
        target = node.target
        packet = getattr(target, "overloadpacket", None)
        if target not in self.targets and (packet is None or packet not in self.targets):
            return False
        return self.where is None or bool(self.where(node))


@dataclass(frozen=True)
class Input:
    where: Optional[Predicate] = None

    def accepts(self, node: fx.Node) -> bool:
        return self.where is None or bool(self.where(node))


PatternNode = Union[Op, Input]


@dataclass
class Binding:
    """A raw match: pattern node name -> host node, for the variant that matched (absent optionals omitted)."""

    pattern: "Pattern"
    nodes: dict[str, fx.Node]

    def __getitem__(self, name: str) -> fx.Node:
        return self.nodes[name]

    def get(self, name: str) -> Optional[fx.Node]:
        return self.nodes.get(name)

    def has(self, name: str) -> bool:
        return name in self.nodes

    @property
    def interior(self) -> list[fx.Node]:
        return [n for name, n in self.nodes.items() if isinstance(self.pattern.nodes[name], Op)]

    @property
    def outputs(self) -> list[fx.Node]:
        """The region's results, in the pattern's ``outputs`` order; an absent optional output stands for
        the node it would have passed through."""
        out = []
        for name in self.pattern.outputs:
            while name not in self.nodes:
                name = self.pattern.nodes[name].inputs[0]
            out.append(self.nodes[name])
        return out



@dataclass
class Pattern:
    family: str
    nodes: Mapping[str, PatternNode]
    #: Pattern nodes whose values are used after the region (the last one first: the region's main result).
    outputs: tuple[str, ...]
    _variants: list = field(default_factory=list, init=False, repr=False)

    def __post_init__(self):
        for name, p in self.nodes.items():
            if isinstance(p, Op):
                for i in p.inputs:
                    if i not in self.nodes:
                        raise ValueError(f"pattern {self.family}: {name} reads unknown node {i}")
                if p.optional and len(p.inputs) != 1:
                    raise ValueError(f"pattern {self.family}: optional node {name} must have one input")
        self._variants = self._expand()

    def _expand(self) -> list[tuple[nx.DiGraph, dict[str, PatternNode]]]:
        optional = [n for n, p in self.nodes.items() if isinstance(p, Op) and p.optional]
        variants = []
        # Fewest removals first: the most specific variant wins when several match.
        for r in range(len(optional) + 1):
            for removed in itertools.combinations(optional, r):
                variants.append(self._variant(set(removed)))
        return variants

    def _variant(self, removed: set[str]):
        def resolve(name: str) -> str:
            while name in removed:
                name = self.nodes[name].inputs[0]
            return name

        nodes = {n: p for n, p in self.nodes.items() if n not in removed}
        # The structure searched is the Op nodes alone: their predicates are selective, while an Input matches
        # anything and would make the search wander. Inputs are bound afterwards from the ops' operands.
        g = nx.DiGraph()
        for n, p in nodes.items():
            if isinstance(p, Op):
                g.add_node(n, name=n)
                for i in p.inputs:
                    if isinstance(nodes[resolve(i)], Op):
                        g.add_edge(resolve(i), n)
        resolved_inputs = {
            n: tuple(dict.fromkeys(resolve(i) for i in p.inputs)) for n, p in nodes.items() if isinstance(p, Op)
        }
        return g, nodes, resolved_inputs

    # -- matching -------------------------------------------------------------------------------------------

    def match(self, host: "HostGraph", claimed: set[fx.Node]) -> Iterator[Binding]:
        """Yield bindings in graph order, skipping nodes in ``claimed``. The caller claims what it accepts;
        at each anchor the most specific variant (all optional nodes present) that matches wins."""
        anchors = [(_anchor(nodes, host), variant) for variant in self._variants for nodes in [variant[1]]]
        seeds = []
        for anchor, (_, nodes, _) in anchors:
            seeds.extend(host.candidates(nodes[anchor]))
        for cand in sorted(set(seeds), key=host.position):
            if cand in claimed:
                continue
            for anchor, (g, nodes, inputs) in anchors:
                if not nodes[anchor].accepts(cand):
                    continue
                binding = self._match_at(host, g, nodes, inputs, anchor, cand, claimed)
                if binding is not None:
                    yield binding
                    break

    def _match_at(self, host, g, nodes, inputs, anchor, cand, claimed) -> Optional[Binding]:
        ops = [p for p in nodes.values() if isinstance(p, Op)]
        region = host.neighbourhood(cand, _radius(g, anchor)) & host.accepted_by_any(ops)
        sub = host.graph.subgraph(region)
        cand_index = host.position(cand)

        def node_match(host_attrs, pat_attrs):
            name = pat_attrs["name"]
            if (name == anchor) != (host_attrs["index"] == cand_index):  # seed the search at the candidate
                return False
            return nodes[name].accepts(host_attrs["node"])

        matcher = DiGraphMatcher(sub, g, node_match=node_match)
        for mapping in matcher.subgraph_monomorphisms_iter():
            bound = {pat: host.node(h) for h, pat in mapping.items()}
            if any(n in claimed for n in bound.values()):
                continue
            if not _bind_inputs(bound, nodes, inputs) or not _exact_operands(bound, nodes, inputs):
                continue
            return Binding(self, bound)
        return None


def _radius(g: nx.DiGraph, anchor: str) -> int:
    return max(nx.single_source_shortest_path_length(g.to_undirected(as_view=True), anchor).values())


def _bind_inputs(bound: dict[str, fx.Node], nodes, inputs) -> bool:
    """Bind each Input to the operand of its reader that no Op of the match accounts for (in argument
    order); an Input read by several ops must be the same node for all of them."""
    for name, p in nodes.items():
        if not isinstance(p, Op):
            continue
        host = bound[name]
        taken = {bound[i] for i in inputs[name] if isinstance(nodes[i], Op)}
        free = [a for a in host.all_input_nodes if a not in taken]
        for i in inputs[name]:
            if isinstance(nodes[i], Op):
                continue
            if i in bound:
                if bound[i] not in free:
                    return False
                free.remove(bound[i])
            elif free:
                node = free.pop(0)
                if not nodes[i].accepts(node):
                    return False
                bound[i] = node
            else:
                return False
    return True


def _exact_operands(bound: dict[str, fx.Node], nodes, inputs) -> bool:
    for name, p in nodes.items():
        if isinstance(p, Op):
            want = {bound[i] for i in inputs[name]}
            have = set(bound[name].all_input_nodes)
            if not (want <= have if p.open_inputs else have == want):
                return False
    return True


def _anchor(nodes: Mapping[str, PatternNode], host: "HostGraph") -> str:
    ops = [(n, p) for n, p in nodes.items() if isinstance(p, Op)]
    return min(ops, key=lambda np_: host.count(np_[1]))[0]


class HostGraph:
    """The networkx view of one FX graph: one vertex per node, an edge from each argument to its user."""

    def __init__(self, graph: fx.Graph):
        self.fx_graph = graph
        self.graph = nx.DiGraph()
        self._nodes: list[fx.Node] = list(graph.nodes)
        self._index = {n: i for i, n in enumerate(self._nodes)}
        for i, n in enumerate(self._nodes):
            self.graph.add_node(i, node=n, index=i)
        for i, n in enumerate(self._nodes):
            for a in n.all_input_nodes:
                self.graph.add_edge(self._index[a], i)
        self._undirected = self.graph.to_undirected(as_view=True)

        self._counts: dict[int, int] = {}
        self._accepted: dict[tuple, set[int]] = {}

    def node(self, i: int) -> fx.Node:
        return self._nodes[i]

    def position(self, node: fx.Node) -> int:
        return self._index[node]

    def accepted_by_any(self, ops: Sequence[Op]) -> set[int]:
        key = tuple(sorted(id(p) for p in ops))
        if key not in self._accepted:
            self._accepted[key] = {i for i, n in enumerate(self._nodes) if any(p.accepts(n) for p in ops)}
        return self._accepted[key]

    def count(self, p: Op) -> int:
        if id(p) not in self._counts:
            self._counts[id(p)] = sum(1 for n in self._nodes if p.accepts(n))
        return self._counts[id(p)]

    def candidates(self, p: Op) -> Iterator[fx.Node]:
        return (n for n in self._nodes if p.accepts(n))

    def neighbourhood(self, node: fx.Node, radius: int) -> set[int]:
        return set(nx.single_source_shortest_path_length(self._undirected, self._index[node], cutoff=radius))


def find(patterns: Sequence[Pattern], graph: fx.Graph) -> list[Binding]:
    """All non-overlapping matches of ``patterns`` (in the order given) in ``graph``."""
    host = HostGraph(graph)
    claimed: set[fx.Node] = set()
    out = []
    for pattern in patterns:
        for binding in pattern.match(host, claimed):
            claimed.update(binding.interior)
            out.append(binding)
    return out
