"""Kernel generator: Triton source rendered per specialization, cached on disk, imported from there.

A generated file is keyed by a hash of (template source, specialization, deepfuse/torch/triton versions), so a
new template or a new Triton never reuses a stale file. Its first line records the sha256 of the rest of
the file; a file whose body no longer matches (truncated, edited, corrupted) or that fails to import is
regenerated. Writes are atomic (a temp file, then ``os.replace``), so concurrent compilers never see a
half-written kernel. A module is executed from the text this process wrote or verified, and that text is what
``inspect`` reads for it (Triton's ``@jit`` and Inductor take the kernels' source from there): another process
replacing the file meanwhile (the same kernel, another "First generated for" header) cannot hand it lines of the
other file.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import linecache
import os
import string
import sys
import tempfile
import textwrap
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping, Optional

from .log import log

_DIGEST_PREFIX = "# deepfuse-kernel sha256="
_lock = threading.Lock()
_loaded: dict[str, ModuleType] = {}
_cache_dir_override: Optional[str] = None


def versions() -> str:
    import torch
    import triton

    from . import __version__

    return f"deepfuse={__version__} torch={torch.__version__} triton={triton.__version__}"


def cache_dir() -> Path:
    root = _cache_dir_override or os.environ.get("DEEPFUSE_CACHE_DIR")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "deepfuse")
    return Path(root)


def set_cache_dir(path: Optional[str]) -> None:
    global _cache_dir_override
    _cache_dir_override = path


@dataclass(frozen=True)
class KernelTemplate:
    """Triton source with ``${slot}`` placeholders: constexpr values and prologue/epilogue pieces."""

    name: str
    source: str

    def render(self, slots: Mapping[str, Any]) -> str:
        def fill(value):
            if isinstance(value, str) and "\n" in value:
                return value.strip("\n")
            return str(value)

        text = textwrap.dedent(self.source).strip("\n")
        out = []
        # A multi-line piece takes the indentation of the line its slot stands on.
        for line in text.splitlines():
            stripped = line.lstrip()
            if stripped.startswith("${") and stripped.endswith("}") and stripped[2:-1] in slots:
                piece = fill(slots[stripped[2:-1]])
                indent = line[: len(line) - len(stripped)]
                out.extend(indent + p if p.strip() else "" for p in piece.splitlines())
            else:
                out.append(string.Template(line).substitute({k: fill(v) for k, v in slots.items()}))
        return "\n".join(out) + "\n"


@dataclass(frozen=True)
class GeneratedKernel:
    path: Path
    module: ModuleType
    key: str

    def function(self, name: str, interpret: bool = False):
        fn = getattr(self.module, name)
        if interpret:
            from triton.runtime.interpreter import InterpretedFunction

            if not _interpreter_on():
                from .errors import DeepfuseError

                raise DeepfuseError(
                    "the Triton interpreter (options={'interpret': True}) needs TRITON_INTERPRET=1 in the "
                    "environment before triton is imported; deepfuse sets it by itself only where CUDA is absent"
                )
            return fn if isinstance(fn, InterpretedFunction) else InterpretedFunction(fn.fn)
        return fn


def _interpreter_on() -> bool:
    from triton import knobs

    return bool(knobs.runtime.interpret)


def kernel_key(template: KernelTemplate, spec: Mapping[str, Any], slots: Optional[Mapping[str, Any]] = None) -> str:
    """The file's key: the template, the specialization, the pieces filled into its slots (their code can change
    while the template does not), and the versions."""
    blob = json.dumps(
        {"template": template.source, "name": template.name, "spec": dict(spec), "slots": dict(slots or {}),
         "versions": versions()},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def generate(
    template: KernelTemplate, spec: Mapping[str, Any], slots: Mapping[str, Any], header: str
) -> GeneratedKernel:
    """Render ``template`` for ``spec`` (or reuse the cached file) and import it."""
    key = kernel_key(template, spec, slots)
    path = cache_dir() / "kernels" / f"{template.name}_{key}.py"
    with _lock:
        cached = _loaded.get(str(path))
        if cached is not None:
            return GeneratedKernel(path, cached, key)
        text = None
        if path.exists():
            text = _verified_text(path)
            if text is None:
                log.warning("regenerating corrupted or stale kernel file %s", path)
        if text is None:
            from .progress import progress

            progress(f"generating kernel {path.name}")
            text = _file_text(_header(header, template.name, spec) + template.render(slots))
            _atomic_write(path, text)
            progress("")
        try:
            module = _import(path, template.name, key, text)
        except Exception as first:  # a file that hashes right but does not import: rebuild it once
            log.warning("kernel file %s failed to import (%s); regenerating", path, first)
            text = _file_text(_header(header, template.name, spec) + template.render(slots))
            _atomic_write(path, text)
            module = _import(path, template.name, key, text)
        _loaded[str(path)] = module
        return GeneratedKernel(path, module, key)


def _header(header: str, name: str, spec: Mapping[str, Any]) -> str:
    spec_lines = "\n".join(f"    {k} = {v!r}" for k, v in spec.items())
    return (
        f'"""Generated by deepfuse: {name}\n\n{header.strip()}\n\nSpecialization:\n{spec_lines}\n\n'
        f"Versions: {versions()}\n"
        f'Edits are detected and the file regenerated; change the template in deepfuse.runtime.kernels instead.\n"""\n'
    )


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _verified_text(path: Path) -> Optional[str]:
    """The file's text if its digest line matches the rest, else None."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return None
    first, _, body = text.partition("\n")
    if not first.startswith(_DIGEST_PREFIX) or first[len(_DIGEST_PREFIX):] != _sha(body):
        return None
    return text


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _file_text(body: str) -> str:
    """A kernel file's whole text: its digest line, then ``body``."""
    return _DIGEST_PREFIX + _sha(body) + "\n" + body


def _import(path: Path, name: str, key: str, text: str) -> ModuleType:
    """The module of ``text`` (``path``'s contents as this process wrote or verified them), executed from that text
    and not from a second read of the file, with ``linecache`` holding it for ``inspect``."""
    modname = f"deepfuse_generated.{name}_{key}"
    spec = importlib.util.spec_from_file_location(modname, path)
    module = importlib.util.module_from_spec(spec)
    code = compile(text, str(path), "exec")
    # no modification time: linecache.checkcache keeps the entry whatever happens to the file
    linecache.cache[str(path)] = (len(text), None, text.splitlines(True), str(path))
    sys.modules[modname] = module
    try:
        exec(code, module.__dict__)
    except BaseException:
        sys.modules.pop(modname, None)
        raise
    return module


_memos: list[dict] = []


def memo() -> dict:
    """A dict for a kernel unit's per-specialization memo; ``forget_loaded`` empties it with the rest."""
    d: dict = {}
    _memos.append(d)
    return d


def forget_loaded() -> None:
    """Drop the in-process memos (tests use it to exercise the on-disk cache)."""
    with _lock:
        _loaded.clear()
        for d in _memos:
            d.clear()
