"""``deepfuse inspect``: what deepfuse matched, declined and generated for a model, written to a folder.

The folder (written whole or not at all) holds report.md and report.json, kernels/ (every generated kernel
source), graphs/graph_N.py (each rewritten FX graph as code) and graphs/graph_N.onnx (the same graph in ONNX,
one ``deepfuse`` domain node per fused op).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

from typing import TYPE_CHECKING

from .errors import DeepfuseError

if TYPE_CHECKING:
    from .report import Report


def load_target(target: str, tokens: int = 8):
    """A bundled config name, or ``path/to/file.py:factory`` returning (model, example_inputs)."""
    import torch

    if ":" in target and target.split(":")[0].endswith(".py"):
        path, _, name = target.rpartition(":")
        if not os.path.isfile(path):
            raise DeepfuseError(f"factory file {path} does not exist")
        spec = importlib.util.spec_from_file_location(f"deepfuse_user_factory_{abs(hash(path))}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
            factory = getattr(module, name)
        except AttributeError:
            raise DeepfuseError(f"{path} has no function {name!r}") from None
        except Exception as e:
            raise DeepfuseError(f"importing {path} failed: {type(e).__name__}: {e}") from e
        try:
            made = factory()
        except Exception as e:
            raise DeepfuseError(f"{target}() failed: {type(e).__name__}: {e}") from e
        if not (isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module)):
            raise DeepfuseError(f"{target}() must return (model, example_inputs)")
        model, inputs = made
        return model, tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    from deepfuse.models import DeepSeekForCausalLM, get_config

    config = get_config(target)
    model = DeepSeekForCausalLM.from_config(config, seed=0)
    return model, (torch.randint(0, config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0)),)


def inspect_model(model, inputs, out: str, options: dict) -> "Report":
    """Explain ``model`` with one deepfuse op per match, and write the folder ``out`` atomically."""
    import deepfuse

    out_path = Path(out).resolve()
    parent = out_path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", dir=parent))
    except OSError as e:
        raise DeepfuseError(f"cannot write to {parent}: {e.strerror or e}") from None
    try:
        report = deepfuse.explain(model, *inputs, **dict(options, inline=False))
        if not report.matches:
            raise DeepfuseError(
                f"no pattern matched in the model ({len(report.declined)} declined"
                + (": " + "; ".join(d.reason for d in report.declined[:3]) if report.declined else "")
                + "); nothing to inspect"
            )
        (staging / "report.md").write_text(report.to_markdown())
        report.to_json(str(staging / "report.json"))
        (staging / "kernels").mkdir()
        for f in report.kernel_files:
            shutil.copy(f, staging / "kernels" / Path(f).name)
        (staging / "graphs").mkdir()
        _write_graphs(report, staging / "graphs")
        if out_path.exists():
            shutil.rmtree(out_path)
        os.replace(staging, out_path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report


def _write_graphs(report, folder: Path) -> None:
    import torch
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from .onnx_export import export
    from .progress import progress

    for i, (gm, inputs) in enumerate(report.rewritten):
        progress(f"writing graph {i + 1}/{len(report.rewritten)}")
        gm.recompile()
        (folder / f"graph_{i}.py").write_text(f"# rewritten by deepfuse: graph {i}\n" + gm.code)
        with unset_fake_temporarily():
            real = [torch.zeros(t.shape, dtype=t.dtype) if isinstance(t, torch.Tensor) else t for t in inputs]
            if any(n.op == "call_function" and getattr(n.target, "namespace", "") == "deepfuse" for n in gm.graph.nodes):
                export(gm, real, str(folder / f"graph_{i}.onnx"))
    progress("")


def summary(report) -> str:
    families: dict[str, int] = {}
    for m in report.matches:
        families[m.family] = families.get(m.family, 0) + 1
    rows = [f"{'family':<10}{'matched':>8}{'declined':>9}"]
    for fam in sorted(set(families) | {d.family for d in report.declined}):
        rows.append(f"{fam:<10}{families.get(fam, 0):>8}{sum(d.family == fam for d in report.declined):>9}")
    return "\n".join(rows)


def main(args) -> int:
    model, inputs = load_target(args.target)
    options = {"interpret": True} if args.interpret else {}
    report = inspect_model(model, inputs, args.out, options)
    print(summary(report))
    print(f"wrote {args.out}: report.md, report.json, {len(report.kernel_files)} kernel file(s), "
          f"{len(report.rewritten)} graph(s) as code and ONNX", file=sys.stdout)
    return 0
