"""``deepfuse.explain``: what deepfuse would do to a model, without running any generated kernel."""
from __future__ import annotations

from typing import Any

import torch

from .options import Options
from .pipeline import collect, explain_graph
from .report import Report


def explain(model: torch.nn.Module, *example_inputs: Any, **options: Any) -> Report:
    """Trace ``model`` on ``example_inputs`` with Dynamo, run the deepfuse passes on every graph and return
    the report: matches (family, parameters, source line), declined candidates with the reason, and the
    generated kernel files. The model itself runs once in plain aten (no generated kernel, no Inductor, no
    autotuning); the MoE pass's semantic check runs the candidate region's own ops once on random inputs.
    Pass ``dynamic=True`` to trace with symbolic shapes."""
    import deepfuse.runtime.ops  # noqa: F401

    from .canonical import install

    install()
    dynamic = options.pop("dynamic", None)
    opts = Options.from_user(options)
    report = Report()

    def backend(gm, inputs):
        return explain_graph(gm, inputs, opts)

    backend.deepfuse_backend = True  # traced like a deepfuse compile (deepfuse.canonical)

    compiled = torch.compile(model, backend=backend, dynamic=dynamic)
    with collect(report), torch.no_grad():
        compiled(*example_inputs)
    return report
