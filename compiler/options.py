"""The options a user passes as ``torch.compile(m, backend="deepfuse", options={...})``.

Every key is documented here and in the README; an unknown key is an error that lists the valid ones,
so a typo never silently turns a feature off.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from .errors import DeepfuseError

KERNEL_CHOICES = ("auto", "triton", "reference")


@dataclass(frozen=True)
class Options:
    #: Run the generated Triton kernels through Triton's CPU interpreter (small shapes only). This is how
    #: CI checks every kernel without a GPU.
    interpret: bool = False
    #: Which implementation a deepfuse op runs: "triton" (generated kernels), "reference" (the op's plain
    #: torch reference), or "auto": Triton on CUDA tensors (or with ``interpret``), reference otherwise.
    kernels: str = "auto"
    #: Pattern families to run, by name (see ``deepfuse.passes.PASSES``); ``None`` runs all of them but the
    #: opt-in ones (``deepfuse.passes.OPT_IN``).
    passes: Optional[tuple[str, ...]] = None
    #: Hand the rewritten graph to Inductor (True) or run it as plain aten ops (False, for debugging).
    inductor: bool = True
    #: Time the candidate kernel configurations on the GPU and cache the winner per GPU and shape bucket.
    autotune: bool = True
    #: Where generated kernels and autotuning results are written (default: ``$DEEPFUSE_CACHE_DIR``, else
    #: the user cache directory).
    cache_dir: Optional[str] = None
    #: Trace each kernel launch (GPU) or reference (CPU) into the graph, so Inductor schedules and launches
    #: it (True); or keep one ``deepfuse::`` op call per match (False: what ``deepfuse inspect`` shows).
    inline: bool = True
    #: Reductions in a fixed order (True), or by atomic adds where a kernel offers them (False: faster,
    #: results may differ in the last bits from run to run). Today: the MoE combine of a token's k experts.
    deterministic: bool = True
    #: Quantize linear weights while compiling: "fp8-block" (FP8 e4m3 weights in 128x128 blocks, activations
    #: quantized per token and 128-wide tile: DeepSeek-V3's recipe) or "int8-weight" (int8 weights, one scale
    #: per output channel, activations untouched). None keeps the weights as they are. See deepfuse.quantize.
    quantize: Optional[str] = None
    #: With ``quantize``: module-path patterns (regular expressions, ``re.search``) of the weights to leave as they
    #: are, matched against the path ``explain`` shows ("layers.0.self_attn.q_proj"; a stacked expert weight by
    #: the module that multiplies with it, "layers.1.mlp.experts"). Like Hugging Face's
    #: ``modules_to_not_convert``: ``("self_attn", "lm_head")`` quantizes the MLPs and experts alone.
    quantize_skip: tuple[str, ...] = ()
    #: With ``quantize``: free the float weights that were quantized (their storage is resized to 0 bytes), so
    #: the process holds only the quantized copies. The model then runs only through the compiled module.
    release_float_weights: bool = False
    #: With torch.distributed initialized over more than one rank: each rank keeps only its share of every MoE
    #: layer's routed experts (the full expert weights are freed) and tokens travel to their experts' ranks
    #: with all_to_all. Off by default: it changes what the model object holds. See deepfuse.runtime.expert_parallel.
    expert_parallel: bool = False
    #: With ``expert_parallel``: split each MoE layer's tokens into this many chunks whose all_to_all exchanges
    #: are asynchronous, so one chunk's experts run while the next chunk's tokens travel. 1: one exchange.
    micro_batches: int = 1
    #: With ``expert_parallel``: how tokens travel. "splits": exactly the rows each rank needs, whose counts reach
    #: the host once per layer. "padded": a fixed block of T*k rows between every pair of ranks, no host
    #: synchronization (a decode step can be captured in a CUDA graph); every rank must run the same T.
    expert_parallel_exchange: str = "splits"

    # Set from torch.compile's ``mode=`` argument, not from ``options``.
    mode: str = field(default="default", repr=False)

    @classmethod
    def from_user(cls, options: Optional[dict[str, Any]] = None, mode: Optional[str] = None) -> "Options":
        options = dict(options or {})
        valid = {f.name for f in dataclasses.fields(cls) if f.name != "mode"}
        unknown = sorted(set(options) - valid)
        if unknown:
            raise DeepfuseError(
                f"unknown deepfuse option(s) {unknown}; valid options are: {', '.join(sorted(valid))}"
            )
        if "passes" in options and options["passes"] is not None:
            from deepfuse.passes import PASSES

            names = tuple(options["passes"])
            bad = [n for n in names if n not in PASSES]
            if bad:
                raise DeepfuseError(f"unknown pass(es) {bad}; available passes: {', '.join(PASSES)}")
            options["passes"] = names
        if options.get("kernels", "auto") not in KERNEL_CHOICES:
            raise DeepfuseError(f"options['kernels'] must be one of {KERNEL_CHOICES}, got {options['kernels']!r}")
        if options.get("quantize") not in (None, "fp8-block", "int8-weight"):
            raise DeepfuseError(
                f"options['quantize'] must be None, 'fp8-block' or 'int8-weight', got {options['quantize']!r}"
            )
        if options.get("release_float_weights") and not options.get("quantize"):
            raise DeepfuseError("options['release_float_weights'] needs options['quantize']")
        if "quantize_skip" in options:
            options["quantize_skip"] = _patterns(options["quantize_skip"], "quantize_skip")
            if options["quantize_skip"] and not options.get("quantize"):
                raise DeepfuseError("options['quantize_skip'] needs options['quantize']")
        for key in ("interpret", "inductor", "autotune", "inline", "deterministic", "release_float_weights",
                    "expert_parallel"):
            if key in options and not isinstance(options[key], bool):
                raise DeepfuseError(f"options[{key!r}] must be a bool, got {options[key]!r}")
        micro = options.get("micro_batches", 1)
        if not isinstance(micro, int) or isinstance(micro, bool) or micro < 1:
            raise DeepfuseError(f"options['micro_batches'] must be an int >= 1, got {micro!r}")
        if micro > 1 and not options.get("expert_parallel"):
            raise DeepfuseError("options['micro_batches'] splits expert-parallel exchanges: it needs "
                                "options['expert_parallel']")
        exchange = options.get("expert_parallel_exchange", "splits")
        if exchange not in ("splits", "padded"):
            raise DeepfuseError(f"options['expert_parallel_exchange'] must be 'splits' or 'padded', got {exchange!r}")
        if exchange == "padded" and micro > 1:
            raise DeepfuseError("options['micro_batches'] > 1 needs expert_parallel_exchange='splits'")
        mode = mode or "default"
        if mode not in ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
            raise DeepfuseError(f"unsupported torch.compile mode {mode!r} for deepfuse")
        return cls(**options, mode=mode)

    def kernel_impl(self, device_type: str) -> str:
        """Which implementation a deepfuse op placed on ``device_type`` tensors runs."""
        if self.kernels == "reference":
            return "reference"
        if self.interpret:
            return "interpret"
        if device_type == "cuda":
            return "triton"
        if self.kernels == "triton":
            raise DeepfuseError(
                "options['kernels']='triton' needs CUDA tensors; on CPU pass interpret=True to run the "
                "generated kernels through Triton's interpreter"
            )
        return "reference"

    def enabled(self, family: str) -> bool:
        if self.passes is None:
            from deepfuse.passes import OPT_IN

            return family not in OPT_IN
        return family in self.passes

    def fingerprint(self) -> str:
        """What changes the rewritten graph; part of Inductor's FX-graph cache key."""
        return repr((self.interpret, self.kernels, self.passes, self.inline, self.deterministic, self.quantize,
                     self.quantize_skip, self.expert_parallel, self.micro_batches, self.expert_parallel_exchange))


def _patterns(value: Any, key: str) -> tuple[str, ...]:
    """A str or a sequence of str, each a valid regular expression, as a tuple."""
    patterns = (value,) if isinstance(value, str) else value
    if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) for p in patterns):
        raise DeepfuseError(f"options[{key!r}] must be a str or a list of str (module-path patterns), got {value!r}")
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as e:
            raise DeepfuseError(f"options[{key!r}]: {pattern!r} is not a regular expression ({e})") from None
    return tuple(patterns)
