"""The ``deepfuse`` torch.compile backend (registered through the ``torch_dynamo_backends`` entry point)."""
from __future__ import annotations

from typing import Any, Optional

import torch.fx as fx

from .canonical import install as _install_canonical_forms
from .options import Options
from .pipeline import compile_graph

# torch.compile(backend="deepfuse") imports this module before Dynamo traces anything: the layers whose
# canonical forms deepfuse provides are patched now (see deepfuse.canonical).
_install_canonical_forms()


def deepfuse_backend(
    gm: fx.GraphModule, example_inputs: list, *, options: Optional[dict[str, Any]] = None, mode: Optional[str] = None
):
    """``torch.compile(model, backend="deepfuse", options={...}, mode=...)`` lands here once per Dynamo graph."""
    import deepfuse.runtime.ops  # noqa: F401  (registers the deepfuse:: ops before any graph uses them)

    return compile_graph(gm, example_inputs, Options.from_user(options, mode))
