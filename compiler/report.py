"""What deepfuse found in a graph: matches, declined candidates, generated kernels.

One ``Report`` is filled per ``torch.compile`` call (across all of Dynamo's graphs) and is what
``deepfuse.explain`` returns; ``str(report)`` is a table, ``report.to_json()`` the same as data.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch.fx as fx


def source_line(node: fx.Node) -> str:
    """The user's source line that produced ``node``: 'file.py:123 code', from the node's stack trace."""
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip()]
    frames = [i for i, ln in enumerate(lines) if ln.startswith("File ")]
    # The innermost frame outside torch itself: the user's (or their library's) line, not F.rms_norm's.
    user = [i for i in frames if "/torch/" not in lines[i]]
    if frames:
        i = (user or frames)[-1]
        try:
            path = lines[i].split('"')[1]
            lineno = lines[i].split("line ")[1].split(",")[0]
        except IndexError:
            return lines[i]
        code = lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith("File ") else ""
        return f"{path.rsplit('/', 1)[-1]}:{lineno} {code}".strip()
    return f"<{node.name}>"


def module_path(node: fx.Node) -> str:
    """The module path of the user's nn.Module that produced ``node`` (e.g. 'layers.0.input_layernorm')."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    path = re.sub(r"^L\['[^']*'\]\.?", "", path)
    path = re.sub(r"_modules\['([^']*)'\]", r"\1", path)
    return re.sub(r"\[(\d+)\]", r".\1", path).strip(".")


@dataclass
class Match:
    family: str
    op: str  # the deepfuse op that replaced the region
    params: dict[str, Any]
    source: str
    module: str
    impl: str  # "triton", "interpret" or "reference"
    kernel_file: Optional[str] = None


@dataclass
class Declined:
    family: str
    reason: str
    source: str
    module: str


@dataclass
class Report:
    matches: list[Match] = field(default_factory=list)
    declined: list[Declined] = field(default_factory=list)
    graphs: int = 0
    notes: list[str] = field(default_factory=list)
    #: Wall seconds in each pass, summed over graphs: matching, kernel generation and compile-time timing.
    pass_seconds: dict[str, float] = field(default_factory=dict)
    #: The rewritten aten graphs with example inputs (filled by explain; not serialized).
    rewritten: list = field(default_factory=list, repr=False)

    @property
    def kernel_files(self) -> list[str]:
        return sorted({m.kernel_file for m in self.matches if m.kernel_file})

    def to_dict(self) -> dict:
        return {
            "graphs": self.graphs,
            "matches": [asdict(m) for m in self.matches],
            "declined": [asdict(d) for d in self.declined],
            "kernel_files": self.kernel_files,
            "notes": self.notes,
            "pass_seconds": self.pass_seconds,
        }

    def to_json(self, path: Optional[str] = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, default=str)
        if path is not None:
            with open(path, "w") as f:
                f.write(text + "\n")
        return text

    def to_markdown(self) -> str:
        lines = [
            "# deepfuse report", "",
            f"{len(self.matches)} match(es), {len(self.declined)} declined, {len(self.kernel_files)} generated "
            f"kernel file(s), {self.graphs} graph(s).", "",
            "| family | op | impl | parameters | module | source |", "|---|---|---|---|---|---|",
        ]
        cell = lambda v: str(v).replace("|", "\\|")  # noqa: E731
        for m in self.matches:
            params = ", ".join(f"{k}={v}" for k, v in m.params.items())
            lines.append(f"| {m.family} | `{m.op}` | {m.impl} | {cell(params)} | `{m.module}` | `{cell(m.source)}` |")
        if self.declined:
            lines += ["", "## Declined", "", "| family | reason | module | source |", "|---|---|---|---|"]
            lines += [f"| {d.family} | {cell(d.reason)} | `{d.module}` | `{cell(d.source)}` |" for d in self.declined]
        if self.pass_seconds:
            lines += ["", "Time in the passes: " + ", ".join(f"{k} {v:.2f} s" for k, v in self.pass_seconds.items())]
        if self.kernel_files:
            lines += ["", "## Generated kernels", ""] + [f"- `{f}`" for f in self.kernel_files]
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        rows = [("family", "op / reason", "impl", "parameters", "source")]
        for m in self.matches:
            params = ", ".join(f"{k}={v}" for k, v in m.params.items())
            rows.append((m.family, m.op, m.impl, params, f"{m.module}  {m.source}".strip()))
        for d in self.declined:
            rows.append((d.family, f"DECLINED: {d.reason}", "-", "", f"{d.module}  {d.source}".strip()))
        widths = [min(max(len(r[i]) for r in rows), 96) for i in range(len(rows[0]) - 1)]

        def fmt(r):
            cells = [c[:w].ljust(w) for c, w in zip(r, widths)]
            return "  ".join(cells + [r[-1]])

        out = [
            f"deepfuse: {len(self.matches)} match(es), {len(self.declined)} declined, "
            f"{len(self.kernel_files)} generated kernel file(s), {self.graphs} graph(s)",
            fmt(rows[0]),
            "  ".join("-" * w for w in widths) + "  " + "-" * 6,
        ]
        out += [fmt(r) for r in rows[1:]]
        if self.kernel_files:
            out.append("kernels:")
            out += [f"  {f}" for f in self.kernel_files]
        out += [f"note: {n}" for n in self.notes]
        return "\n".join(out)
