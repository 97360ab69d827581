"""A whole decode step as one CUDA graph, whatever compiled it.

``torch.compile(mode="reduce-overhead")`` captures each compiled graph through Inductor's CUDA-graph trees. That
suits a model compiled whole. A model compiled block by block (``layer.compile(...)`` for each decoder layer:
one graph per kind of block, compiled in seconds) calls one compiled graph 27 times per step, and the trees
take each new call of it for a new step: the previous block's output, still needed, has been overwritten
("accessing tensor output of CUDAGraphs that has been overwritten by a subsequent run"). It also leaves the
Python between the blocks (embedding, rope, mask, head) uncaptured.

``CapturedStep(step)`` captures the whole step instead, every block and the glue between them, once per
distinct call signature, and replays it:

    for layer in model.model.layers:
        layer.compile(backend="deepfuse")            # default mode: no per-block CUDA graphs
    step = CapturedStep(model)
    logits = step(token, position, cache)            # first call per signature: warm up, capture, replay

Requirements, as for any CUDA graph: the step does no host synchronization (deepfuse's static-cache decode
does none) and its buffers keep their addresses (the latent cache is preallocated). Tensor arguments are
copied into the captured inputs on every call; any other argument (the cache object, an int) is part of the
signature, so a new cache or another int captures again. The returned tensors are the graph's own
outputs: valid until the next call of this ``CapturedStep``, which overwrites them. Nothing Python runs on a
replay, so no guard is rechecked: a step whose behavior depends on state other than its arguments (a changed
module attribute) needs a new ``CapturedStep``.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

_VALUE_KEYED = (int, float, bool, str, type(None))


class _Captured:
    """One signature's graph, its static inputs (holding the non-tensor arguments too, so their ids stay
    theirs) and its outputs."""

    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: list, output: Any):
        self.graph, self.inputs, self.output = graph, inputs, output


class CapturedStep:
    """Calls ``step(*args)`` as a CUDA graph captured on the first call of each signature (see the module
    docstring). ``warmup`` eager calls on a side stream come first: compilation, autotuning and lazy
    initialization must not happen during capture."""

    def __init__(self, step: Callable, warmup: int = 2):
        if warmup < 1:
            raise ValueError(f"CapturedStep needs at least one warm-up call before capture, got warmup={warmup}")
        self.step = step
        self.warmup = warmup
        self.graphs: dict[tuple, _Captured] = {}
        self._pool = None

    def __call__(self, *args):
        key = self._signature(args)
        captured = self.graphs.get(key)
        if captured is None:
            captured = self.graphs[key] = self._capture(args)
        else:
            for static, arg in zip(captured.inputs, args):
                if isinstance(arg, torch.Tensor):
                    static.copy_(arg)
        captured.graph.replay()
        return captured.output

    @staticmethod
    def _signature(args) -> tuple:
        key = []
        for a in args:
            if isinstance(a, torch.Tensor):
                if a.device.type != "cuda":
                    raise ValueError(f"CapturedStep captures CUDA work: got a tensor argument on {a.device}")
                key.append(("tensor", tuple(a.shape), a.dtype, a.device))
            elif isinstance(a, _VALUE_KEYED):
                key.append(("value", type(a), a))
            else:  # a cache, a module: the captured graph holds its buffers' addresses
                key.append(("object", id(a)))
        return tuple(key)

    def _capture(self, args) -> _Captured:
        # Static inputs: the captured kernels read these addresses; later calls copy into them.
        inputs = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.step(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()  # one memory pool for every signature's graph
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            output = self.step(*inputs)
        return _Captured(graph, inputs, output)
