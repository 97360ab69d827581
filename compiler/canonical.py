"""Canonical forms for library layers whose own forward Dynamo cannot trace, installed by the backend.

- Hugging Face's ``FP8Linear`` (transformers' fine-grained FP8 integration) calls a kernel downloaded from the
  hub (or DeepGEMM): an opaque call, or no call at all offline. While deepfuse compiles, its forward is instead
  the plain W8A8 math the layer computes (activations quantized per token and ``block_size[1]``-wide tile, FP8
  weights with block scales, the product in fp32), which the ``quant`` pass finds and runs as its kernel.
- Hugging Face's experts modules (``use_experts_implementation``: DeepSeek-V2/V3, Mixtral, Qwen-MoE, ...) with
  the default ``eager`` implementation loop over the experts in Python with data-dependent shapes: Dynamo
  breaks the graph inside the loop, and the MoE is lost. While deepfuse compiles, the same module runs
  transformers' own traceable implementation of the same function (``grouped_mm`` for bf16, ``batched_mm``
  otherwise), which the ``moe`` pass finds and checks like any other.
- Experts modules of that shape that transformers left without the interface (``HF_EXPERTS_WITHOUT_INTERFACE``,
  each read: the loop computes what the interface's forms compute, through the module's own ``_apply_gate``)
  run the same traceable forms while deepfuse compiles.
The original forwards run whenever deepfuse is not the compiler: in eager mode and under other backends.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

import torch

from .log import log

_installed: set = set()


@torch._dynamo.assume_constant_result
def compiling_with_deepfuse() -> bool:
    """Is Dynamo tracing for the deepfuse backend? Evaluated once at trace time (a constant in the graph)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        fn = InstructionTranslator.current_tx().output.compiler_fn
        for _ in range(8):
            if getattr(fn, "compiler_name", None) == "deepfuse" or getattr(fn, "deepfuse_backend", False):
                return True
            nxt = getattr(fn, "_torchdynamo_orig_backend", None) or getattr(fn, "compiler_fn", None)
            if nxt is None or nxt is fn:
                return False
            fn = nxt
    except Exception:  # not tracing, or a Dynamo without these attributes: the original forward runs
        return False
    return False


def _hf_fp8_linear_forward(original):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if (torch.compiler.is_compiling() and compiling_with_deepfuse()
                and self.weight.dtype == torch.float8_e4m3fn and self.block_size is not None
                and self.activation_scheme == "dynamic" and self.weight_scale_inv.dtype == torch.float32):
            from deepfuse.quantize import fp8_block_linear

            return fp8_block_linear(input, self.weight, self.weight_scale_inv, self.bias, tuple(self.block_size))
        return original(self, input)

    forward.__wrapped__ = original
    forward.__doc__ = original.__doc__
    return forward


def _traceable_experts(self, hidden_states, top_k_index, top_k_weights):
    """transformers' traceable form of an experts module's forward: ``grouped_mm`` for bf16, ``batched_mm``
    otherwise."""
    from transformers.integrations import moe

    same = moe.grouped_mm_experts_forward if hidden_states.dtype == torch.bfloat16 else moe.batched_mm_experts_forward
    return same(self, hidden_states, top_k_index, top_k_weights)


def _hf_experts_get_interface(original):
    def get_interface(self, experts_implementation, default):
        if (experts_implementation in (None, "eager") and torch.compiler.is_compiling()
                and compiling_with_deepfuse()):
            return _traceable_experts
        return original(self, experts_implementation, default)

    get_interface.__wrapped__ = original
    get_interface.__doc__ = original.__doc__
    get_interface.deepfuse_canonical = True
    return get_interface


# transformers experts modules with the interface's weights ([E, 2I, H] gate and up, [E, H, I] down, ``num_experts``)
# and loop, whose class does not take ``use_experts_implementation``: module -> class names. Step-3.7-Flash's loop
# gates through its own ``_apply_gate`` (a SiLU clamped at its layer's limit, when one is set). Not here:
# LongCat-Flash's, whose zero-computation experts return their input (no traceable form of transformers' computes
# that), and DBRX's (per-expert w1/v1/w2 weights).
HF_EXPERTS_WITHOUT_INTERFACE = {
    "transformers.models.step3p7.modeling_step3p7": ("Step3p7Experts",),
}


def _hf_experts_shaped_forward(original):
    def forward(self, hidden_states, top_k_index, top_k_weights):
        if torch.compiler.is_compiling() and compiling_with_deepfuse():
            return _traceable_experts(self, hidden_states, top_k_index, top_k_weights)
        return original(self, hidden_states, top_k_index, top_k_weights)

    forward.__wrapped__ = original
    forward.__doc__ = original.__doc__
    return forward


def _patch_experts_classes(module, names) -> None:
    """Give each class transformers' traceable forms under deepfuse (the interface's layout flags as class
    defaults: concatenated gate and up rows, not transposed, no bias, gated)."""
    for name in names:
        cls = getattr(module, name, None)
        if cls is None:  # another transformers: nothing to patch
            continue
        for flag, default in (("has_gate", True), ("has_bias", False), ("is_transposed", False),
                              ("is_concatenated", True)):
            if not hasattr(cls, flag):
                setattr(cls, flag, default)
        cls.forward = _hf_experts_shaped_forward(cls.forward)


def hf_experts_traced_whole() -> bool:
    """Does transformers' experts interface run its traceable form under deepfuse now? (Then an experts loop
    that still breaks Dynamo's graph is a model's own, not one of transformers' experts modules.)"""
    hf_moe = sys.modules.get("transformers.integrations.moe")
    interface = getattr(hf_moe, "ExpertsInterface", None)
    return getattr(getattr(interface, "get_interface", None), "deepfuse_canonical", False)


_PATCHES = {
    "transformers.integrations.finegrained_fp8": lambda m: setattr(
        m.FP8Linear, "forward", _hf_fp8_linear_forward(m.FP8Linear.forward)),
    "transformers.integrations.moe": lambda m: setattr(
        m.ExpertsInterface, "get_interface", _hf_experts_get_interface(m.ExpertsInterface.get_interface)),
    **{name: (lambda m, classes=classes: _patch_experts_classes(m, classes))
       for name, classes in HF_EXPERTS_WITHOUT_INTERFACE.items()},
}


def _patch(name: str, module) -> None:
    if name not in _installed:
        _PATCHES[name](module)
        _installed.add(name)
        log.debug("installed deepfuse's canonical form for %s", name)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches a library module the moment it is imported (a model may import it after deepfuse's backend was
    loaded)."""

    def find_spec(self, name, path, target=None):
        if name not in _PATCHES or name in _installed:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _patch(name, module)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Patch the library modules already imported, and the others when they are."""
    for name in _PATCHES:
        if name in sys.modules:
            _patch(name, sys.modules[name])
    if not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())
