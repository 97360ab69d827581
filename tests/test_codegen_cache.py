"""The kernel generator's on-disk cache: keyed files, readable headers, corrupted/stale entries regenerated."""
import os

import pytest
import torch

from deepfuse import codegen
from deepfuse.codegen import KernelTemplate, generate
from deepfuse.runtime.kernels import rms_norm as kernel


def _gen(residual=False, n=64):
    gen, name = kernel.kernel_for(n, torch.float16, torch.float16, torch.float16, residual, True, "layers.0.norm (m.py:3)")
    return gen, name


def test_file_lands_in_DEEPFUSE_CACHE_DIR_with_a_readable_header(tmp_path):
    gen, name = _gen()
    assert str(gen.path).startswith(os.environ["DEEPFUSE_CACHE_DIR"])
    text = gen.path.read_text()
    assert text.startswith("# deepfuse-kernel sha256=")
    for expected in ("Pattern family: rms_norm", "First generated for: layers.0.norm (m.py:3)",
                     "hidden = 64", "def rms_norm_kernel(", "BLOCK_N: tl.constexpr", "triton="):
        assert expected in text
    assert "${" not in text  # every slot was filled
    compile(text, str(gen.path), "exec")


def test_specializations_get_distinct_files_and_reuse_identical_ones():
    a, _ = _gen(residual=False)
    b, _ = _gen(residual=True)
    c, _ = _gen(residual=False)
    assert a.path != b.path and a.path == c.path
    assert "tl.store(H + row" in b.path.read_text() and "tl.store(H + row" not in a.path.read_text()


@pytest.mark.parametrize("damage", ["truncate", "edit", "garbage"])
def test_corrupted_entry_is_regenerated_and_still_correct(damage):
    gen, name = _gen()
    good = gen.path.read_text()
    if damage == "truncate":
        gen.path.write_text(good[: len(good) // 2])
    elif damage == "edit":
        gen.path.write_text(good.replace("tl.rsqrt(variance + eps)", "tl.rsqrt(variance + eps) * 2"))
    else:
        gen.path.write_bytes(b"\xff\xfe not python")
    codegen.forget_loaded()
    regen, _ = _gen()
    assert regen.path == gen.path and regen.path.read_text() == good
    x, w = torch.randn(3, 64).half(), torch.rand(64).half()
    y, _ = kernel.launch(x, w, None, 1e-6, True, torch.float16, interpret=True)
    torch.testing.assert_close(y, kernel.reference(x, w, None, 1e-6, True, torch.float16)[0], rtol=2e-3, atol=2e-3)


def test_new_template_or_versions_change_the_key(monkeypatch):
    t1 = KernelTemplate("k", "x = ${v}\n")
    t2 = KernelTemplate("k", "x = ${v} + 0\n")
    assert codegen.kernel_key(t1, {"v": 1}) != codegen.kernel_key(t2, {"v": 1})
    before = codegen.kernel_key(t1, {"v": 1})
    monkeypatch.setattr(codegen, "versions", lambda: "deepfuse=0 torch=0 triton=0")
    assert codegen.kernel_key(t1, {"v": 1}) != before


def test_template_pieces_keep_indentation():
    t = KernelTemplate("k", "def f(a):\n    ${body}\n    return b\n")
    src = t.render({"body": "b = a\nb = b + 1"})
    assert src == "def f(a):\n    b = a\n    b = b + 1\n    return b\n"


def test_writes_are_atomic_no_temp_files_left():
    _gen()
    _gen(residual=True)
    leftovers = [p for p in (codegen.cache_dir() / "kernels").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_generate_roundtrip_for_a_custom_template():
    t = KernelTemplate("scale_kernel", '''
import triton
import triton.language as tl


@triton.jit
def scale(X, Y, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < N) * ${factor}, mask=offs < N)
''')
    gen = generate(t, {"factor": 3.0}, {"factor": 3.0}, "test kernel")
    x = torch.randn(100)
    y = torch.full_like(x, float("nan"))
    gen.function("scale", interpret=True)[(2,)](x, y, 100, BLOCK=64)
    torch.testing.assert_close(y, x * 3.0)


def test_a_kernel_file_replaced_meanwhile_does_not_change_the_source_imported():
    """Two compilers generating one kernel at once write the same body under different "First generated for"
    headers; one's file may replace the other's between its write and its import. The module runs the text this
    process wrote, and that text is the source ``inspect`` (so Triton's ``@jit`` and Inductor) reads for it: read
    from the replaced file, a kernel's lines were taken at the other header's offsets (an unterminated string
    where a docstring was cut, seen in the parallel suite)."""
    import inspect

    t = KernelTemplate("replaced_kernel", '''
import triton
import triton.language as tl


@triton.jit
def copy_kernel(X, Y, BLOCK: tl.constexpr):
    """Y = X, ${what}."""
    offs = tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs))
''')
    mine = codegen._header("mine", t.name, {}) + t.render({"what": "a block"})
    theirs = codegen._header("theirs\nover\nfour\nlines", t.name, {}) + t.render({"what": "a block"})
    path = codegen.cache_dir() / "kernels" / "replaced_kernel_test.py"
    codegen._atomic_write(path, codegen._file_text(theirs))  # the other compiler's file is on disk
    module = codegen._import(path, t.name, "test", codegen._file_text(mine))
    src = inspect.getsource(module.copy_kernel.fn)
    assert src.startswith("@triton.jit\ndef copy_kernel(") and '"""Y = X, a block."""' in src
    compile(src, "src", "exec")
