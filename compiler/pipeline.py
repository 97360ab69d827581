"""Dynamo FX graph -> canonical aten -> deepfuse pattern passes -> Inductor (or plain aten) -> a callable.

Normalization is AOTAutograd's: functional aten, decomposed by Inductor's own decomposition table, every
node carrying a fake tensor with its (possibly symbolic) shape. The passes run as Inductor's
``post_grad_custom_pre_pass``, so they see exactly the graph Inductor is about to lower and everything they
leave alone is still fused by Inductor as usual.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import os
import time
from typing import Callable, Iterator, Optional

import torch
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from .codegen import set_cache_dir, versions
from .errors import RewriteError
from .log import log
from .options import Options
from .report import Declined, Report

_collectors: list[Report] = []
_real_inputs: list[list] = []  # the Dynamo graph's real inputs while it compiles (parameters among them)
# What to run before each call of the graph being compiled, with the call's inputs (see bind_per_call).
_binders: list[list[Callable]] = []


def input_position(node: fx.Node):
    """The position among the compiled graph's inputs (its callers' arguments) of the real tensor behind a
    placeholder of the graph being compiled (a parameter, say), if it can be told for certain: same position
    among the inputs, same shape and dtype; else None."""
    from .shapes import hint, value

    if not _real_inputs or node.op != "placeholder":
        return None
    inputs = _real_inputs[-1]
    placeholders = [n for n in node.graph.nodes if n.op == "placeholder"]
    index = placeholders.index(node) - (len(placeholders) - len(inputs))  # (AOTAutograd's lifted ones first)
    if not 0 <= index < len(inputs):
        return None
    real, fake = inputs[index], value(node)
    if not isinstance(real, torch.Tensor) or fake is None or real.dtype != fake.dtype or \
            tuple(real.shape) != tuple(hint(d) for d in fake.shape):
        return None
    return index


def real_input(node: fx.Node):
    """The real tensor behind a placeholder of the graph being compiled, if it can be told (``input_position``)."""
    index = input_position(node)
    return None if index is None else _real_inputs[-1][index]


def bind_per_call(binder: Callable) -> None:
    """Run ``binder(inputs)`` before each call of the graph being compiled. Dynamo passes parameters as graph
    inputs, so one compiled graph serves every module of the same code (compiled block by block, the first
    decoder layer's graph runs all the others): whatever a pass made from one call's parameters (a layer's
    expert shard, quantized copies) must be found again from each call's."""
    if not _binders:
        raise RuntimeError("bind_per_call outside a deepfuse compile")
    _binders[-1].append(binder)


def _bound(compiled: Callable, binders: list) -> Callable:
    """``compiled``, running ``binders`` on each call's inputs first. Called as Dynamo calls it: the inputs as
    arguments, or (a boxed call) as one list."""
    if not binders:
        return compiled
    boxed = getattr(compiled, "_boxed_call", False)

    def run(*args, **kwargs):
        inputs = args[0] if boxed and len(args) == 1 and isinstance(args[0], list) else args
        for binder in binders:
            binder(inputs)
        return compiled(*args, **kwargs)
    if boxed:
        run._boxed_call = True
    return run


@contextlib.contextmanager
def _compiling(real_inputs: Optional[list], binders: list) -> Iterator[None]:
    """While a graph compiles: its real inputs (None: the passes may not use them, as under explain, which
    shards and frees nothing) and the binders its passes add."""
    if real_inputs is not None:
        _real_inputs.append(real_inputs)
    _binders.append(binders)
    try:
        yield
    finally:
        _binders.pop()
        if real_inputs is not None:
            _real_inputs.pop()


@contextlib.contextmanager
def collect(report: Report) -> Iterator[Report]:
    """Every graph deepfuse compiles inside this block adds its matches and declines to ``report``."""
    _collectors.append(report)
    try:
        yield report
    finally:
        _collectors.remove(report)


def _report() -> Report:
    return _collectors[-1] if _collectors else Report()


def run_passes(graph: fx.Graph, options: Options, report: Report) -> None:
    from deepfuse.passes import PASSES

    report.graphs += 1
    if any(n.op == "placeholder" and str(n.target).startswith("tangents") for n in graph.nodes):
        log.info("backward graph: deepfuse passes are inference/forward-only and leave it to Inductor")
        return
    log.debug("graph before deepfuse passes:\n%s", graph)
    for name, cls in PASSES.items():
        if options.enabled(name):
            start = time.perf_counter()
            try:
                changed = cls().run(graph, options, report)
            except RewriteError as err:  # the region it was rewriting is as it was; what the pass did before stays
                log.warning("deepfuse %s pass stopped: %s", name, err)
                report.declined.append(Declined(name, f"internal: {err}", "", ""))
                changed = True
            finally:
                report.pass_seconds[name] = report.pass_seconds.get(name, 0.0) + time.perf_counter() - start
            if changed:
                log.debug("graph after %s:\n%s", name, graph)
    graph.lint()


# Environment switches that change what the passes trace into a graph, so a graph cached under the other setting is
# not taken for this one.
GRAPH_SWITCHES = ("DEEPFUSE_FP8_RESCALE", "DEEPFUSE_FP8_TMA", "DEEPFUSE_LINEAR_GROUP_NORM")


class DeepfuseGraphPass(CustomGraphPass):
    """The passes, packaged as an Inductor custom pass; ``uuid`` keys Inductor's FX-graph cache."""

    def __init__(self, options: Options, report: Report):
        self.options = options
        self.report = report

    def __call__(self, graph: fx.Graph) -> None:
        run_passes(graph, self.options, self.report)

    def uuid(self) -> bytes:
        """Covers what decides the rewritten graph: the passes, the kernel units whose launches and templates
        are traced into it, the options and the versions."""
        import pkgutil

        from deepfuse import passes
        from deepfuse.passes import PASSES
        from deepfuse.runtime import kernels

        modules = [passes] + [inspect.getmodule(c) for c in PASSES.values()]
        modules += [importlib.import_module(f"deepfuse.runtime.kernels.{m.name}") for m in pkgutil.iter_modules(kernels.__path__)]
        switches = "".join(f"{k}={os.environ.get(k)};" for k in GRAPH_SWITCHES)
        blob = versions() + self.options.fingerprint() + switches + "".join(inspect.getsource(m) for m in modules)
        return hashlib.sha256(blob.encode()).digest()


def compile_graph(gm: fx.GraphModule, example_inputs: list, options: Options) -> Callable:
    from deepfuse.runtime import autotune

    set_cache_dir(options.cache_dir)
    autotune.set_enabled(options.autotune)
    report = _report()
    binders = _quantize(gm, example_inputs, options, options.release_float_weights)
    if options.inductor:
        from torch._inductor.compile_fx import compile_fx

        patches = {
            "post_grad_custom_pre_pass": DeepfuseGraphPass(options, report),
            # Inductor's pad_mm (GPU only, before our pass) pads an odd-sized matmul into constant_pad_nd -> mm ->
            # slice when its benchmark of that one product says so. A padded attention or router no longer reads
            # as itself, so what matched would depend on a timing: seen on H100, a batch-3 MLA decode step
            # matched nothing in one run and everything in another.
            "shape_padding": False,
            # With it on, Inductor's decomposition table turns every matrix-vector product (one token) into a
            # multiply and a sum before the passes run, so no MoE or MLA matches at decode (seen on H100).
            "coordinate_descent_tuning": False,
        }
        import torch._inductor.config as inductor_config

        if inductor_config.coordinate_descent_tuning:
            log.info("Inductor's coordinate_descent_tuning is off while deepfuse compiles: it decomposes one-token "
                     "matmuls before deepfuse's passes can match them")
        if options.quantize:
            # Frozen, the quantized copies would be folded into the compiled code, and the graph of one decoder
            # layer could no longer read the next layer's (QuantizedWeights points them at each call's).
            patches["freezing"] = False
        if _collectors or options.expert_parallel:
            # A cache hit would skip the passes, and with them the report being collected (or the sharding).
            patches["fx_graph_cache"] = False
        if options.mode == "reduce-overhead":
            log.info("mode='reduce-overhead': decode steps are captured by Inductor's CUDA graphs")
            patches["triton.cudagraphs"] = True
        elif options.mode in ("max-autotune", "max-autotune-no-cudagraphs"):
            patches["max_autotune"] = True
            patches["triton.cudagraphs"] = options.mode == "max-autotune"
        with _compiling(example_inputs, binders), _whole_loops_only():
            return _bound(compile_fx(gm, example_inputs, config_patches=patches), binders)
    with _compiling(example_inputs, binders):
        return _bound(_aot(gm, example_inputs, lambda g: run_passes(g, options, report) or g), binders)


def _quantize(gm: fx.GraphModule, example_inputs: list, options: Options, release: bool) -> list:
    """``options.quantize``'s conversion of ``gm``; the binders that make each call read the quantized copies of
    the weights it passes (one graph may serve many layers)."""
    if not options.quantize:
        return []
    from .quantize import quantize_linears

    weights = quantize_linears(gm, example_inputs, options.quantize, release, options.quantize_skip)
    return [weights.bind] if weights.sources else []


@contextlib.contextmanager
def _whole_loops_only() -> Iterator[None]:
    """Inductor's CPU loop split (``CppScheduling.try_loop_split``, torch 2.13 at least) rewrites a loop of n
    iterations whose index reads ``i // d`` as n // d times d, without checking that d divides n: the last n mod d
    iterations never run and their outputs stay uninitialized. A quantization scale expanded to a K that is no
    whole number of 128s is that loop: ``(lambda s: s.repeat_interleave(128, -1)[..., :200] + 0)`` compiles to
    one that writes 128 of every 200 values. While deepfuse compiles, the split is tried only where every such
    division divides its loop's length."""
    try:
        from torch._inductor.codegen.cpp import CppScheduling
        from torch.utils._sympy.functions import FloorDiv
    except ImportError:
        yield
        return
    original = getattr(CppScheduling, "try_loop_split", None)
    if original is None:
        yield
        return

    def try_loop_split(self, nodes):
        for node in nodes:
            if not hasattr(node.node, "get_default_sizes_body"):
                break  # (the split declines it itself)
            (sizes, _), body, (index_vars, _) = node.node.get_default_sizes_body()
            for expr in body.indexing_exprs.values():
                for div in getattr(expr, "find", lambda _: ())(FloorDiv):
                    var, divisor = div.args
                    if var in index_vars and (sizes[index_vars.index(var)] % divisor) != 0:
                        return nodes
        return original(self, nodes)

    CppScheduling.try_loop_split = try_loop_split
    try:
        yield
    finally:
        CppScheduling.try_loop_split = original


def _aot(gm: fx.GraphModule, example_inputs: list, transform: Callable[[fx.Graph], object], run_original=False):
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.decomposition import select_decomp_table

    def fw(aten_gm: fx.GraphModule, inputs):
        if run_original:  # rewrite a copy of the graph (for the report), run the original
            scratch = fx.Graph()
            scratch.output(scratch.graph_copy(aten_gm.graph, {}))
            transform(scratch)
            _report().rewritten.append((fx.GraphModule(aten_gm, scratch), list(inputs)))
            return make_boxed_func(aten_gm.forward)
        transform(aten_gm.graph)
        aten_gm.recompile()
        return make_boxed_func(aten_gm.forward)

    def bw(aten_gm: fx.GraphModule, inputs):
        return make_boxed_func(aten_gm.forward)

    return aot_autograd(
        fw_compiler=fw, bw_compiler=bw, decompositions=select_decomp_table(), keep_inference_input_mutations=True
    )(gm, example_inputs)


def explain_graph(gm: fx.GraphModule, example_inputs: list, options: Options) -> Callable:
    """Normalize and run the passes on a copy (generating kernel files); execute the original graph.
    No autotuning: explain runs no generated kernel (the MoE pass's semantic check runs the user's own ops)."""
    from deepfuse.runtime import autotune

    set_cache_dir(options.cache_dir)
    autotune.set_enabled(False)
    report = _report()
    binders = _quantize(gm, example_inputs, options, release=False)
    with _compiling(None, binders):
        return _bound(_aot(gm, example_inputs, lambda g: run_passes(g, options, report), run_original=True), binders)
