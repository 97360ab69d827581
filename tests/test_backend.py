"""The backend end to end: entry point, options, the RMSNorm pass in real graphs, declines, training graphs."""
import importlib.metadata

import pytest
import torch
import torch.nn.functional as F

import deepfuse
from deepfuse import DeepfuseError
from deepfuse.models import DeepSeekForCausalLM, get_config
from conftest import compile_and_compare as _compile_and_compare, rel_err


class HFStyleRMSNorm(torch.nn.Module):
    def __init__(self, n, eps=1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(n) + 0.5)
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Block(torch.nn.Module):
    def __init__(self, n=64):
        super().__init__()
        self.norm = HFStyleRMSNorm(n)
        self.proj = torch.nn.Linear(n, n)
        self.w2 = torch.nn.Parameter(torch.rand(n))

    def forward(self, x, residual):
        h = residual + self.proj(x)
        return self.norm(h), h, F.rms_norm(self.proj(h), (h.shape[-1],), self.w2, 1e-5)


def test_entry_point_is_registered():
    eps = importlib.metadata.entry_points(group="torch_dynamo_backends")
    assert any(e.name == "deepfuse" and e.value == "deepfuse.backend:deepfuse_backend" for e in eps)
    assert "deepfuse" in torch._dynamo.list_backends()


@pytest.mark.parametrize("options", [{}, {"interpret": True}, {"inductor": False, "interpret": True}], ids=str)
def test_rms_norm_pass_matches_and_is_correct(options):
    model = Block().half()
    x, r = torch.randn(5, 64).half(), torch.randn(5, 64).half()
    report = _compile_and_compare(model, (x, r), 2e-3, **options)
    ops = sorted(m.op for m in report.matches)
    assert ops == ["deepfuse::add_rms_norm", "deepfuse::rms_norm"], str(report)
    fused = next(m for m in report.matches if m.op == "deepfuse::add_rms_norm")
    assert fused.params["eps"] == 1e-6 and fused.params["cast_before_weight"] is True
    assert fused.module == "norm" and "test_backend.py" in fused.source
    impl = "interpret" if options.get("interpret") else "reference"
    assert {m.impl for m in report.matches} == {impl}


class CacheWrite(torch.nn.Module):
    """Normalizes rows into a preallocated cache at the given positions, as a latent cache's update does; with
    ``read``, the normalized rows also go through a projection."""

    def __init__(self, n=32, read=False):
        super().__init__()
        self.norm, self.proj, self.read = HFStyleRMSNorm(n), torch.nn.Linear(n, n), read

    def forward(self, x, cache, pos):
        h = self.norm(x)
        cache[pos] = h
        return self.proj(h) if self.read else cache[pos].sum(0)


@pytest.mark.parametrize("read", [False, True])
def test_a_norm_only_stored_is_left_to_inductor(read):
    """A norm whose result is only written into a cache is declined saying Inductor computes it inside the write
    (one launch instead of two); one whose result is also read by a matmul is fused. Either way the cache holds
    eager's rows; without Inductor every norm is fused."""
    x, pos = torch.randn(3, 32), torch.tensor([4, 0, 2])
    for options, fused in (({"interpret": True}, read), ({"interpret": True, "inductor": False}, True)):
        model, caches = CacheWrite(read=read), [torch.full((6, 32), float("nan")) for _ in range(2)]
        report = deepfuse.Report()
        torch._dynamo.reset()
        with torch.no_grad(), deepfuse.collect(report):
            out = torch.compile(model, backend="deepfuse", options=options)(x, caches[0], pos)
            ref = model(x, caches[1], pos)
        assert rel_err(out, ref) < 1e-5 and rel_err(caches[0][pos], caches[1][pos]) < 1e-5
        assert caches[0][[1, 3, 5]].isnan().all()  # rows not written keep their poison
        assert [m.op for m in report.matches] == (["deepfuse::rms_norm"] if fused else []), str(report)
        assert fused or "only stored" in report.declined[0].reason, str(report)


def test_a_key_norm_before_a_static_cache_is_left_to_inductor():
    """HF Qwen3 over transformers' StaticCache: k_norm's result goes through the rope (a cat among its ops) into the
    cache's index_copy_ and nowhere else, so it is left to Inductor's write kernel; q_norm's reaches the attention
    and is fused. Logits equal eager's."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=64)
    model, ids = transformers.Qwen3ForCausalLM(cfg).eval(), torch.randint(0, 128, (1, 5))

    def run(m):
        return m(ids, past_key_values=transformers.StaticCache(config=cfg, max_cache_len=16), use_cache=True).logits

    torch._dynamo.reset()
    report = deepfuse.Report()
    with torch.no_grad(), deepfuse.collect(report):
        assert rel_err(run(torch.compile(model, backend="deepfuse", options={"interpret": True})), run(model)) < 1e-5
    norms = {m.module.split(".")[-1] for m in report.matches if m.family == "rms_norm"}
    assert "q_norm" in norms and "k_norm" not in norms, str(report)
    declined = [(d.module.split(".")[-1], d.reason[:25]) for d in report.declined]
    assert declined == [("k_norm", "its result is only stored")], str(report)


@pytest.fixture
def specialized_floats():
    with torch._dynamo.config.patch(specialize_float=True):
        yield


def test_dynamic_shapes_still_match(specialized_floats):
    model = Block().float()
    with torch.no_grad():
        report = deepfuse.Report()
        compiled = torch.compile(model, backend="deepfuse", dynamic=True, options={"interpret": True})
        with deepfuse.collect(report):
            for t in (3, 7):
                x, r = torch.randn(t, 64), torch.randn(t, 64)
                for o, ref in zip(compiled(x, r), model(x, r)):
                    assert rel_err(o, ref) < 1e-5
    assert len(report.matches) >= 2


def test_unspecialized_eps_is_declined_with_the_fix():
    report = deepfuse.explain(HFStyleRMSNorm(32), torch.randn(3, 32), dynamic=True)
    assert not report.matches
    assert any("specialize_float" in d.reason for d in report.declined), str(report)


def test_symbolic_hidden_size_is_declined_with_reason(specialized_floats):
    model = HFStyleRMSNorm(48)
    report = deepfuse.explain(model, torch.randn(3, 48), dynamic=True)
    # the weight pins the hidden size, so it stays static and the norm matches
    assert len(report.matches) == 1

    def no_weight(x):
        x32 = x.float()
        return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6) * x32.new_ones(())

    torch._dynamo.mark_dynamic(x := torch.randn(4, 40), 1)
    report = deepfuse.explain(no_weight, x)
    assert not report.matches
    assert any("weight" in d.reason or "symbolic" in d.reason for d in report.declined), str(report)


def test_norm_in_half_precision_is_declined_not_mismatched():
    def half_norm(x, w):  # the mean of squares in fp16: the fp32 kernel would compute something else
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))

    report = deepfuse.explain(half_norm, torch.randn(4, 32).half(), torch.rand(32).half())
    assert not report.matches
    assert any("not fp32" in d.reason for d in report.declined)


def test_training_graph_still_works_and_declines_with_reason():
    model = Block().float()
    x, r = torch.randn(4, 64, requires_grad=True), torch.randn(4, 64)
    report = deepfuse.Report()
    with deepfuse.collect(report):
        out = torch.compile(model, backend="deepfuse")(x, r)
    sum(o.sum() for o in out).backward()
    ref_x = x.detach().clone().requires_grad_()
    sum(o.sum() for o in model(ref_x, r)).backward()
    assert rel_err(x.grad, ref_x.grad) < 1e-5
    assert report.declined and all("outside the region" in d.reason for d in report.declined), str(report)


def test_bundled_tiny_model_compiles_and_matches_eager():
    model = DeepSeekForCausalLM.from_config(get_config("tiny"), seed=int(torch.randint(0, 100, ())))
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    report = _compile_and_compare(model, (ids,), 1e-5, interpret=True)
    # Every RMSNorm of the model is fused: the post-attention one with its residual add in front. (The MoE's
    # per-expert loop breaks Dynamo's graph, so layers share compiled graphs and the count varies.)
    fused = {(m.module.split(".")[-1] or m.source, m.op) for m in report.matches}
    assert ("post_attention_layernorm", "deepfuse::add_rms_norm") in fused, str(report)
    for norm in ("input_layernorm", "q_a_layernorm", "kv_a_layernorm"):
        assert (norm, "deepfuse::rms_norm") in fused, str(report)
    assert not report.declined, str(report)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"interpet": True}, "unknown deepfuse option"),
        ({"passes": ["nope"]}, "unknown pass"),
        ({"kernels": "cuda"}, "must be one of"),
        ({"interpret": "yes"}, "must be a bool"),
        ({"micro_batches": 0, "expert_parallel": True}, "must be an int >= 1"),
        ({"micro_batches": 2}, "needs options\\['expert_parallel'\\]"),
        ({"expert_parallel_exchange": "fast"}, "must be 'splits' or 'padded'"),
        ({"expert_parallel": True, "expert_parallel_exchange": "padded", "micro_batches": 2}, "needs expert_parallel_exchange"),
    ],
)
def test_bad_options_are_clear_errors(options, message):
    with pytest.raises(Exception, match=message):
        torch.compile(torch.nn.Linear(2, 2), backend="deepfuse", options=options)(torch.randn(1, 2))


def test_unknown_option_lists_valid_ones():
    with pytest.raises(DeepfuseError, match="valid options are: autotune, cache_dir, deterministic, expert_parallel, expert_parallel_exchange, inductor, inline, interpret, kernels, micro_batches, passes"):
        deepfuse.Options.from_user({"bogus": 1})


def test_reduce_overhead_mode_is_accepted():
    model = Block().float()
    x, r = torch.randn(2, 64), torch.randn(2, 64)
    with torch.no_grad():
        out = torch.compile(model, backend="deepfuse", mode="reduce-overhead")(x, r)
        assert rel_err(out[0], model(x, r)[0]) < 1e-5


def test_passes_option_disables_a_family():
    report = deepfuse.explain(Block().float(), torch.randn(2, 64), torch.randn(2, 64), passes=[])
    assert not report.matches


def test_failed_inline_trace_falls_back_to_the_op(monkeypatch, caplog):
    """If a launcher cannot be traced into the graph, the region calls the deepfuse op instead: still right."""
    import deepfuse.fusion as fusion

    def broken(*args, **kwargs):
        raise RuntimeError("simulated tracing failure")

    monkeypatch.setattr(fusion, "replace_region_traced", broken)
    model = Block().float()
    x, r = torch.randn(3, 64), torch.randn(3, 64)
    with caplog.at_level("WARNING", logger="deepfuse"):
        report = _compile_and_compare(model, (x, r), 1e-5)
    assert len(report.matches) == 2
    assert "simulated tracing failure" in caplog.text


def test_inductor_rewrites_of_matmuls_are_off_where_the_passes_read_the_graph(monkeypatch):
    """Two Inductor settings rewrite matmuls before deepfuse's passes see them, on GPUs only: pad_mm pads an
    odd-sized matmul (pad -> mm -> slice) when a timing says so (an H100 run once left a batch-3 MLA decode step
    unmatched), and coordinate_descent_tuning decomposes every one-token matmul into a multiply and a sum (no
    MoE or MLA matched at decode). deepfuse's compile turns both off, and only for itself."""
    from deepfuse.pipeline import DeepfuseGraphPass

    seen = []
    original = DeepfuseGraphPass.__call__

    def spy(self, graph):
        cfg = torch._inductor.config
        seen.append((cfg.shape_padding, cfg.coordinate_descent_tuning))
        return original(self, graph)

    monkeypatch.setattr(DeepfuseGraphPass, "__call__", spy)
    with torch._inductor.config.patch(coordinate_descent_tuning=True):
        _compile_and_compare(Block().float(), (torch.randn(5, 64), torch.randn(5, 64)), 1e-5)
        assert torch._inductor.config.coordinate_descent_tuning
    assert seen and all(s == (False, False) for s in seen), seen
    assert torch._inductor.config.shape_padding


@pytest.mark.parametrize("switch", ["DEEPFUSE_FP8_RESCALE", "DEEPFUSE_FP8_TMA", "DEEPFUSE_LINEAR_GROUP_NORM"])
def test_graph_switches_key_inductors_graph_cache(monkeypatch, switch):
    """An environment switch that changes what the passes trace in keys Inductor's FX-graph cache: a graph compiled
    under the other setting is not reused."""
    from deepfuse.options import Options
    from deepfuse.pipeline import GRAPH_SWITCHES, DeepfuseGraphPass
    from deepfuse.report import Report

    assert switch in GRAPH_SWITCHES
    keys = []
    for value in ("0", "1", "0"):
        monkeypatch.setenv(switch, value)
        keys.append(DeepfuseGraphPass(Options.from_user({}), Report()).uuid())
    assert keys[0] != keys[1] and keys[0] == keys[2]


def test_every_environment_switch_is_classified():
    """Each DEEPFUSE_* variable deepfuse reads either changes the traced graph (then it keys the FX-graph cache:
    GRAPH_SWITCHES) or changes nothing a compiled graph holds (where files go, logging, how many threads compile)."""
    import pathlib
    import re

    from deepfuse.pipeline import GRAPH_SWITCHES

    elsewhere = {"DEEPFUSE_AUTOTUNE_THREADS", "DEEPFUSE_CACHE_DIR", "DEEPFUSE_LOG"}
    root = pathlib.Path(__file__).resolve().parent.parent
    read = set()
    for folder in ("compiler", "passes", "runtime"):
        for path in (root / folder).rglob("*.py"):
            read |= set(re.findall(r"environ(?:\.get\(|\[)\s*[\"'](DEEPFUSE_[A-Z0-9_]+)", path.read_text()))
    assert read, "no switch found: the search is broken"
    assert read - elsewhere == set(GRAPH_SWITCHES), read
