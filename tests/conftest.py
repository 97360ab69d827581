import pytest
import torch

import deepfuse  # noqa: F401  (turns the Triton interpreter on where CUDA is absent, before triton loads)


def _patch_language_once_per_launch() -> None:
    """Triton's interpreter (3.6) patches triton.language for the interpreter again at every call of a
    ``@triton.jit`` helper inside a kernel (``_patch_lang`` walks every member of the language modules: ~1.5 ms a
    call, a quarter of the 64-token greedy decode test's time), though the launch around the call has patched the
    same modules (the helper's patching is never restored: its scope is dropped). Here a helper's call inside a
    launch skips the walk when the launch, or an earlier helper in it, already patched every language module the
    helper sees (tl.sum and the other library helpers also see triton.language.core); a launch still patches.
    Tests only: what runs is the same interpreted code."""
    import inspect
    import threading

    try:
        from triton.runtime import interpreter
        import triton.language as tl
    except ImportError:
        return
    patch, launch = getattr(interpreter, "_patch_lang", None), getattr(interpreter.GridExecutor, "__call__", None)
    if patch is None or launch is None or getattr(patch, "once_per_launch", False):
        return
    state = threading.local()

    def languages(fn) -> set:
        return {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)}

    def patch_lang(fn):
        patched = getattr(state, "patched", None)
        if patched is not None and languages(fn) <= patched:
            return interpreter._LangPatchScope()  # nothing to restore
        scope = patch(fn)
        if getattr(state, "launching", False):  # patched until the launch ends (a helper's scope is dropped)
            state.patched = (patched or set()) | languages(fn)
        return scope

    def grid_call(self, *args, **kwargs):
        outer = getattr(state, "launching", False), getattr(state, "patched", None)
        state.launching, state.patched = True, None
        try:
            return launch(self, *args, **kwargs)
        finally:
            state.launching, state.patched = outer

    patch_lang.once_per_launch = True
    interpreter._patch_lang = patch_lang
    interpreter.GridExecutor.__call__ = grid_call


_patch_language_once_per_launch()


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Each test gets its own kernel cache and a fresh Dynamo, so no test sees another's compiled state."""
    from deepfuse.codegen import forget_loaded, set_cache_dir

    monkeypatch.setenv("DEEPFUSE_CACHE_DIR", str(tmp_path / "cache"))
    set_cache_dir(None)
    forget_loaded()
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def gathered_experts(x, ids, weights, w1, w2, act):
    """Routed experts as a model nobody rewrote may write them: each (token, slot)'s expert weights gathered,
    two bmm, the k slots weighted and summed. w1 [E, 2I, H] (gate rows, then up), w2 [E, H, I]."""
    k = ids.shape[1]
    gate, up = torch.bmm(w1[ids.flatten()], x.repeat_interleave(k, 0).unsqueeze(-1)).squeeze(-1).chunk(2, -1)
    out = torch.bmm(w2[ids.flatten()], (act(gate) * up).unsqueeze(-1)).squeeze(-1)
    return (out * weights.flatten()[:, None]).view(x.shape[0], k, -1).sum(1)


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty's float tensors start as NaN, so an element a kernel leaves unwritten shows in the result."""
    real = torch.empty

    def empty(*args, **kwargs):
        out = real(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out
    monkeypatch.setattr(torch, "empty", empty)


def compile_and_compare(model, inputs, tol, **options):
    """Compile ``model`` with deepfuse (``options``), check it against eager within ``tol``; the report."""
    with torch.no_grad():
        ref = model(*inputs)
        report = deepfuse.Report()
        with deepfuse.collect(report):
            out = torch.compile(model, backend="deepfuse", options=options)(*inputs)
    ref, out = (v.logits if hasattr(v, "logits") else getattr(v, "last_hidden_state", v)
                for v in (ref, out))  # a causal LM's logits, a bare model's hidden states
    for o, r in zip(out, ref) if isinstance(out, tuple) else [(out, ref)]:
        assert rel_err(o, r) < tol
    return report


def fused_and_unfused_fp8(model, run, report):
    """``run(compiled)`` for ``model`` compiled with ``quantize="fp8-block"`` twice: through the generated kernels
    (interpreter) and with no pattern pass (Inductor's dequantize-then-matmul forms), in that order; ``report``
    collects both compiles."""
    outs = []
    with torch.no_grad():
        for options in ({"interpret": True}, {"passes": ()}):
            torch._dynamo.reset()
            with deepfuse.collect(report):
                outs.append(run(torch.compile(model, backend="deepfuse",
                                              options={"quantize": "fp8-block", **options})))
    return outs


def _fp64_logits(model, ids):
    """(eager logits, the same bundled model's in float64), on the GPU."""
    from deepfuse.models import DeepSeekForCausalLM

    with torch.no_grad():
        eager = model(ids)
        ref = DeepSeekForCausalLM.from_config(model.config, device="cuda", dtype=torch.float64)
        ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
        return eager, ref(ids)


def fp64_errors(model, ids, out):
    """(deepfuse's, eager's) relative error against the same bundled model in float64 (on the GPU)."""
    eager, exact = _fp64_logits(model, ids)
    return rel_err(out, exact), rel_err(eager, exact)


def fp64_tokens_outside(model, ids, out, floor: float = 2e-2) -> list:
    """The (sequence, token, error, bound) whose logits miss float64 by more than twice eager's error or ``floor``.
    A bf16 router near a tie may send one token to another expert than float64 does, which moves that token's
    logits far; a wrong kernel moves every token's."""
    eager, exact = _fp64_logits(model, ids)
    errors = [(b, s, rel_err(out[b, s], exact[b, s]), max(2 * rel_err(eager[b, s], exact[b, s]), floor))
              for b in range(out.shape[0]) for s in range(out.shape[1])]
    return [(b, s, round(err, 4), round(bound, 4)) for b, s, err, bound in errors if err >= bound]
