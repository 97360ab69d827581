"""The MLA pass on real models: found by what it computes (bundled model in both attention forms, HF
DeepseekV2/V3 with SDPA and eager attention, prefill and decode over their latent caches), rewritten into
deepfuse::mla_attention, and still right."""
import pytest
import torch

import deepfuse
from conftest import rel_err
from deepfuse.models import DeepSeekForCausalLM, get_config

transformers = pytest.importorskip("transformers")


def _mla_matches(report):
    return [m for m in report.matches if m.family == "mla"]


# Both forms through the kernels, each on one config (q LoRA on in v3-tiny, off in v2-tiny). The reference
# kernels on these models: test_batch_of_one_as_inductor_rewrites_it_on_gpus and test_a_dynamic_batch_is_still_matched.
@pytest.mark.parametrize("attn_impl,config,options", [
    ("absorb", "v3-tiny", {"interpret": True}), ("naive", "v2-tiny", {"interpret": True}),
], ids=["absorb-v3-interpret", "naive-v2-interpret"])
def test_bundled_model_prefill_and_decode(attn_impl, config, options):
    cfg = get_config(config)
    model = DeepSeekForCausalLM.from_config(cfg, seed=int(torch.randint(0, 1000, ())), attn_impl=attn_impl)
    ids = torch.randint(0, cfg.vocab_size, (2, 7))
    opts = {"passes": ["mla"], **options}
    with torch.no_grad():
        ref_cache, cache = model.new_cache(2, 12), model.new_cache(2, 12)
        ref_prefill, ref_step = model(ids, 0, ref_cache), model(ids[:, :1], 7, ref_cache)
        report = deepfuse.Report()
        with deepfuse.collect(report):
            compiled = torch.compile(model, backend="deepfuse", options=opts)
            prefill = compiled(ids, 0, cache)
            step = compiled(ids[:, :1], 7, cache)
    assert rel_err(prefill, ref_prefill) < 1e-4 and rel_err(step, ref_step) < 1e-4
    torch.testing.assert_close(cache.kv, ref_cache.kv)  # the cache writes stay the model's
    matches = _mla_matches(report)
    assert len(matches) == 2 * cfg.num_hidden_layers, str(report)
    decode = [m for m in matches if m.params["queries"] == 1]
    assert len(decode) == cfg.num_hidden_layers and all(m.params["context"] == 8 for m in decode)
    for m in matches:
        p = m.params
        assert (p["heads"], p["kv_lora_rank"], p["qk_rope_head_dim"]) == (
            cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim)
        assert (p["qk_nope_head_dim"], p["v_head_dim"]) == (cfg.qk_nope_head_dim, cfg.v_head_dim)
        assert abs(p["scale"] - model.model.layers[0].self_attn.softmax_scale) < 1e-6
        assert m.module.endswith("self_attn")


@pytest.mark.parametrize("attn_impl,kernels", [("absorb", {"interpret": True}), ("naive", {"kernels": "reference"})],
                         ids=["absorb-interpret", "naive-reference"])
def test_fp8_latent_cache_is_read_in_fp8(attn_impl, kernels, monkeypatch):
    """The bundled model over its FP8 latent cache (c_kv in FP8, one scale per token): the cache returns the
    latent dequantized in plain torch, and the pass hands the kernels the FP8 rows and their scales instead,
    so the dequantized copy is never made. Prefill and a static-cache decode step, against eager over the same
    kind of cache."""
    from deepfuse.runtime.kernels import mla as kernel

    latents = []
    for name in ("mla_attention", "reference"):
        real = getattr(kernel, name)

        def spy(q_nope, q_pe, c_kv, *args, real=real, **kwargs):
            if q_nope.dtype != torch.float64:  # not the pass's own check of the region, in float64
                latents.append(c_kv.dtype)
            return real(q_nope, q_pe, c_kv, *args, **kwargs)

        monkeypatch.setattr(kernel, name, spy)
    cfg = get_config("v2-tiny", num_hidden_layers=1)  # one layer: the compile is most of the time
    model = DeepSeekForCausalLM.from_config(cfg, seed=int(torch.randint(0, 1000, ())), attn_impl=attn_impl)
    ids = torch.randint(0, cfg.vocab_size, (2, 7))
    torch._dynamo.reset()
    with torch.no_grad():
        ref_cache, cache = model.new_cache(2, 12, fp8=True), model.new_cache(2, 12, fp8=True)
        ref = [model(ids, torch.tensor(0), ref_cache), model(ids[:, :1], torch.tensor(7), ref_cache)]
        latents.clear()
        report = deepfuse.Report()
        with deepfuse.collect(report):
            compiled = torch.compile(model, backend="deepfuse", options={"passes": ["mla"], **kernels})
            out = [compiled(ids, torch.tensor(0), cache), compiled(ids[:, :1], torch.tensor(7), cache)]
    assert all(rel_err(o, r) < 1e-4 for o, r in zip(out, ref))
    torch.testing.assert_close(cache.layers[0].kv_scale, ref_cache.layers[0].kv_scale)
    matches = _mla_matches(report)
    assert len(matches) == 2 * cfg.num_hidden_layers and not report.declined, str(report)
    assert latents and set(latents) == {torch.float8_e4m3fn}, latents
    c, r = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    for m in matches:  # FP8 rows, an fp32 scale, an fp32 rope key (the model is fp32)
        assert m.params["latent_format"].startswith("float8_e4m3fn")
        assert m.params["latent_bytes_per_token"] == c + 4 + 4 * r


@pytest.mark.parametrize("attn_impl", ["absorb", "naive"])
def test_batch_of_one_as_inductor_rewrites_it_on_gpus(attn_impl, monkeypatch):
    """At batch 1 on a GPU, Inductor's joint-graph pass turns every bmm of batch 1 into an mm (squeeze, mm,
    unsqueeze) before deepfuse sees the graph: the score and output products of one sequence are then plain
    mms of two activations. The pass is made to apply on CPU here (it checks for the GPU's device type), so
    the graph is the one a GPU compile sees: prefill and a static-cache decode step, both matched."""
    from torch._inductor.fx_passes import joint_graph

    monkeypatch.setattr(joint_graph, "get_gpu_type", lambda: "cpu")
    cfg = get_config("v2-tiny")
    model = DeepSeekForCausalLM.from_config(cfg, seed=int(torch.randint(0, 1000, ())), attn_impl=attn_impl)
    ids = torch.randint(0, cfg.vocab_size, (1, 7))
    torch._dynamo.reset()
    with torch.no_grad():
        ref_cache, cache = model.new_cache(1, 12), model.new_cache(1, 12)
        ref = [model(ids, 0, ref_cache), model(ids[:, :1], 7, ref_cache)]
        report = deepfuse.Report()
        with deepfuse.collect(report):
            compiled = torch.compile(model, backend="deepfuse", options={"passes": ["mla"]})
            out = [compiled(ids, torch.tensor(0), cache), compiled(ids[:, :1], torch.tensor(7), cache)]
    assert all(rel_err(o, r) < 1e-4 for o, r in zip(out, ref))
    assert len(_mla_matches(report)) == 2 * cfg.num_hidden_layers, str(report)


def test_a_dynamic_batch_is_still_matched():
    """A second batch size makes Dynamo recompile with a symbolic batch, which the region's inputs may carry as
    a different symbol than the one the check derives (the cache slice's); the shape environment proves them
    equal, and every layer is still rewritten."""
    cfg = get_config("v2-tiny")
    model = DeepSeekForCausalLM.from_config(cfg, seed=int(torch.randint(0, 1000, ())))
    compiled = torch.compile(model, backend="deepfuse", options={"kernels": "reference"})
    torch._dynamo.reset()
    for b in (1, 3):
        ids = torch.randint(0, cfg.vocab_size, (b, 1))
        with torch.no_grad():
            ref = model(ids, torch.tensor(5), model.new_cache(b, 16))
            report = deepfuse.Report()
            with deepfuse.collect(report):
                out = compiled(ids, torch.tensor(5), model.new_cache(b, 16))
        assert rel_err(out, ref) < 1e-4
        assert len(_mla_matches(report)) == cfg.num_hidden_layers, str(report)
        # the one decline: the latent's norm, only written into the cache, is left to Inductor's write kernel
        assert {(d.family, d.module.split(".")[-1]) for d in report.declined} == {("rms_norm", "kv_a_layernorm")}


HF_COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
                 qk_rope_head_dim=8, v_head_dim=24, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                 first_k_dense_replace=2, max_position_embeddings=256)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "mscale": 0.707, "mscale_all_dim": 0.707}


def _hf(kind, attn, q_lora_rank, yarn):
    extra = {"rope_parameters": YARN} if yarn else {}
    if kind == "v2":
        cfg = transformers.DeepseekV2Config(**HF_COMMON, q_lora_rank=q_lora_rank, **extra)
        model = transformers.DeepseekV2ForCausalLM(cfg)
    else:
        cfg = transformers.DeepseekV3Config(**HF_COMMON, q_lora_rank=q_lora_rank, **extra)
        model = transformers.DeepseekV3ForCausalLM(cfg)
    model.config._attn_implementation = attn
    return model.eval()


def _prefill_and_decode_against_eager(model, ids):
    """An HF model's prefill, then one decode step over the cache it returned, compiled with the mla pass (through
    the interpreter) against eager's; the report."""
    with torch.no_grad():
        past = model(ids, use_cache=True).past_key_values
        ref_step = model(ids[:, :1], past_key_values=past, use_cache=True).logits
        ref_prefill = model(ids).logits
        report = deepfuse.Report()
        with deepfuse.collect(report):
            compiled = torch.compile(model, backend="deepfuse", options={"passes": ["mla"], "interpret": True})
            prefill = compiled(ids, use_cache=True)
            step = compiled(ids[:, :1], past_key_values=prefill.past_key_values, use_cache=True).logits
    assert rel_err(prefill.logits, ref_prefill) < 1e-4 and rel_err(step, ref_step) < 1e-4
    return report


@pytest.mark.parametrize("kind,attn,q_lora_rank,yarn", [
    ("v2", "sdpa", None, False),
    ("v2", "eager", 24, True),
    ("v3", "sdpa", 24, True),
    ("v3", "eager", None, False),
])
def test_hf_deepseek_attention_prefill_and_decode(kind, attn, q_lora_rank, yarn):
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    model = _hf(kind, attn, q_lora_rank, yarn)
    ids = torch.randint(0, 256, (2, 6))
    report = _prefill_and_decode_against_eager(model, ids)
    matches = _mla_matches(report)
    assert sorted(m.params["queries"] for m in matches) == [1, 1, 6, 6], str(report)
    assert all(m.params["context"] == (7 if m.params["queries"] == 1 else 6) for m in matches)
    assert all(m.params["v_head_dim"] == 24 and m.impl == "interpret" for m in matches)
    attn_module = model.model.layers[0].self_attn
    assert all(abs(m.params["scale"] - attn_module.scaling) < 1e-6 for m in matches)


# Latent attention in families the matcher was not written against (transformers 5.17, tiny, random): found by
# what it computes, prefill and decode over their own cache objects.
UNSEEN = {
    "Glm4MoeLite": dict(q_lora_rank=24, n_group=1, topk_group=1),
    "LongcatFlash": dict(q_lora_rank=24, moe_topk=2, zero_expert_num=2, ffn_hidden_size=96, expert_ffn_hidden_size=32,
                         num_layers=1, head_dim=8),  # two attentions a layer
    "Mistral4": dict(q_lora_rank=24, head_dim=8),
    "MiniCPM3": dict(q_lora_rank=24),
    "Youtu": dict(q_lora_rank=24, head_dim=8),
    "AXK1": dict(q_lora_rank=24, head_dim=8),
    # a hybrid: its linear-attention layers listed as none, every layer MLA
    "KimiLinear": dict(q_lora_rank=24, head_dim=8, pad_token_id=0,
                       linear_attn_config=dict(full_attn_layers=[1, 2], kda_layers=[])),
}


@pytest.mark.parametrize("family", sorted(UNSEEN))
def test_mla_in_families_it_was_not_written_against(family):
    if not hasattr(transformers, family + "Config"):
        pytest.skip(f"this transformers has no {family}")
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    cfg = getattr(transformers, family + "Config")(**{**HF_COMMON, **UNSEEN[family]})
    model = getattr(transformers, family + "ForCausalLM")(cfg).eval()
    ids = torch.randint(0, 256, (2, 6))
    report = _prefill_and_decode_against_eager(model, ids)
    matches = _mla_matches(report)
    assert sorted({m.params["queries"] for m in matches}) == [1, 6] and len(matches) >= 4, str(report)
    assert all(m.params["v_head_dim"] == 24 and m.params["kv_lora_rank"] == 32 for m in matches), str(report)


def test_plain_mha_is_left_alone_silently():
    cfg = transformers.MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2)
    model = transformers.MixtralForCausalLM(cfg).eval()
    report = deepfuse.explain(model, torch.randint(0, 128, (1, 7)), passes=["mla"])
    assert not report.matches and not report.declined, str(report)


@pytest.mark.parametrize("use_cache,v_head_dim", [(True, 24), (False, 24), (False, 16)])
def test_deepseek_v32_sparse_attention(use_cache, v_head_dim):
    """DeepSeek-V3.2 (transformers' DeepseekV32, tiny): keys and values come from kv_b_proj over one latent, and
    its indexer's top-k masks the keys each query may see. With transformers' cache, which holds the keys and values
    expanded, it is declined, and explain says why at each layer's attention instead of nothing; without a cache,
    the indexer's mask is read as the attention's mask, and the result is eager's. The indexer's queries are as
    wide as the latent here (2 x 16 = 32), and with v_head_dim = qk_nope_head_dim, as in the real model, one of
    them was taken for the latent once (it reaches keys and values through the mask)."""
    if not hasattr(transformers, "DeepseekV32Config"):
        pytest.skip("this transformers has no DeepseekV32")
    cfg = transformers.DeepseekV32Config(**{**HF_COMMON, "first_k_dense_replace": 1, "n_group": 2, "topk_group": 1,
                                            "v_head_dim": v_head_dim},
                                         q_lora_rank=24, index_n_heads=2, index_head_dim=16, index_topk=4)
    declined = _sparse_attention_checked(transformers.DeepseekV32ForCausalLM(cfg).eval(), use_cache)
    assert all(d.reason.startswith("keys and values both come from") and f"[{4 * (16 + v_head_dim)}, 32]"
               in d.reason for d in declined)


def _sparse_attention_checked(model, use_cache: bool) -> list:
    """``model`` (a sparse latent attention, two layers, an indexer keeping 4 keys) compiled on 9 tokens against
    eager: without a cache both attentions fused, the indexer's mask read; with transformers' cache both declined
    saying it holds the keys and values expanded. The declines."""
    model.config.use_cache = use_cache
    ids = torch.randint(0, 256, (1, 9))  # more tokens than the indexer keeps: a mask that hides some
    report = deepfuse.Report()
    with torch.no_grad(), deepfuse.collect(report):
        out = torch.compile(model, backend="deepfuse", options={"passes": ["mla"], "interpret": True})(ids).logits
        assert rel_err(out, model(ids).logits) < 1e-4
    declined = [d for d in report.declined if d.family == "mla"]
    if use_cache:
        assert not _mla_matches(report) and len(declined) == 2, str(report)
        assert all("caches its keys and values expanded" in d.reason and "use_cache=False" in d.reason
                   for d in declined), str(report)
    else:
        assert len(_mla_matches(report)) == 2 and not declined, str(report)
        assert all(m.params["mask"] for m in _mla_matches(report)), str(report)
    return declined


# Sparse (DSA) latent attention in families the matcher was not written against: an indexer's top-k masks the keys.
DSA = {"GlmMoeDsa": "glm_moe_dsa", "AXK2": "axk2"}


@pytest.mark.parametrize("family", sorted(DSA))
@pytest.mark.parametrize("use_cache", [False, True])
def test_sparse_latent_attention_in_families_it_was_not_written_against(family, use_cache):
    """GLM-MoE-DSA and A.X K2 (transformers 5.17, tiny): without a cache, fused with the indexer's mask read as the
    attention's (A.X K2's output gate, attn * sigmoid(x . W_gate), left after the fused attention); with
    transformers' cache, which holds the keys and values expanded, declined saying so."""
    if not hasattr(transformers, family + "Config"):
        pytest.skip(f"this transformers has no {family}")
    cfg = getattr(transformers, family + "Config")(**{**HF_COMMON, "first_k_dense_replace": 1, "head_dim": 8},
                                                   q_lora_rank=24, index_n_heads=2, index_head_dim=16, index_topk=4)
    _sparse_attention_checked(getattr(transformers, family + "ForCausalLM")(cfg).eval(), use_cache)


class LatentAttention(torch.nn.Module):
    """A hand-written latent attention with no DeepSeek names and no cache. ``values`` is applied to the
    expanded values before P.V: the identity makes it MLA; a nonlinearity makes a look-alike that shares W
    and c_kv on both sides but computes something else, which the check on random inputs must refuse."""

    def __init__(self, values=lambda v: v, h=2, dn=8, r=8, dv=8, c=16, hidden=32, mask=None, temperature=1.0):
        super().__init__()
        self.values, self.h, self.dn, self.r, self.mask = values, h, dn, r, mask
        self.temperature = temperature
        self.q = torch.nn.Linear(hidden, h * (dn + r), bias=False)
        self.kv_a = torch.nn.Linear(hidden, c + r, bias=False)
        self.kv_b = torch.nn.Linear(c, h * (dn + dv), bias=False)
        self.o = torch.nn.Linear(h * dv, hidden, bias=False)

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.h, -1).transpose(1, 2)
        c_kv, k_pe = self.kv_a(x).split([self.kv_b.in_features, self.r], dim=-1)
        kv = self.kv_b(c_kv).view(b, s, self.h, -1).transpose(1, 2)
        k_nope, v = kv.split([self.dn, kv.shape[-1] - self.dn], dim=-1)
        k = torch.cat([k_nope, k_pe[:, None].expand(b, self.h, s, self.r)], dim=-1)
        scores = q @ k.transpose(-1, -2) * 0.3
        if self.temperature != 1.0:  # a second factor: the scale is the product
            scores = scores * self.temperature
        if self.mask is not None:  # a mask the forward builds from the sizes: mask(s, device) -> [s, s]
            scores = scores + self.mask(s, x.device)
        probs = scores.softmax(dim=-1)
        return self.o((probs @ self.values(v)).transpose(1, 2).reshape(b, s, -1))


def test_a_latent_attention_computing_something_else_is_declined():
    model = LatentAttention(values=torch.tanh).eval()  # not MLA: a nonlinearity on the values
    x = torch.randn(2, 5, 32)
    report = deepfuse.explain(model, x, passes=["mla"])
    assert not report.matches
    assert any("not the MLA computation" in d.reason for d in report.declined), str(report)
    with torch.no_grad():
        assert rel_err(torch.compile(model, backend="deepfuse")(x), model(x)) < 1e-5


def test_the_nearest_scale_is_kept_not_the_first_within_tolerance():
    """Scores scaled by 0.3 then by 0.99: in bf16 the check cannot tell 0.3 from the true 0.297 by its tolerance
    alone; the nearest candidate is kept."""
    model = LatentAttention(temperature=0.99).eval().bfloat16()
    report = deepfuse.explain(model, torch.randn(2, 5, 32).bfloat16(), passes=["mla"])
    (m,) = [m for m in report.matches if m.family == "mla"]
    assert abs(m.params["scale"] - 0.297) < 1e-6, m.params


def test_a_hand_written_mla_matches_too():
    """The same module with the values left alone is MLA (no DeepSeek names, no cache): it matches."""
    model = LatentAttention().eval()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        ref = model(x)
        report = deepfuse.Report()
        with deepfuse.collect(report):
            out = torch.compile(model, backend="deepfuse", options={"passes": ["mla"], "interpret": True})(x)
    assert rel_err(out, ref) < 1e-5
    (m,) = _mla_matches(report)
    assert m.params["causal"] is False and m.params["scale"] == pytest.approx(0.3)


def _causal(s, device):
    keys = torch.arange(s, device=device)
    return torch.zeros(s, s, device=device).masked_fill(keys[None, :] > keys[:, None], float("-inf"))


def _causal_finfo_min(s, device):  # HF's eager masks: finfo.min where hidden
    return _causal(s, device).clamp_min(torch.finfo(torch.float32).min)


def _sliding_window(s, device):  # causal and at most 3 keys back
    keys = torch.arange(s, device=device)
    return _causal(s, device).masked_fill(keys[None, :] < keys[:, None] - 2, float("-inf"))


def _causal_with_bias(s, device):  # causal plus an ALiBi-like slope
    keys = torch.arange(s, device=device)
    return _causal(s, device) - 0.1 * (keys[:, None] - keys[None, :]).clamp_min(0)


@pytest.mark.parametrize("mask,causal", [(_causal, True), (_causal_finfo_min, True), (_sliding_window, False),
                                         (_causal_with_bias, False)],
                         ids=["causal", "causal-finfo-min", "sliding-window", "causal-bias"])
def test_a_causal_mask_built_in_the_graph_is_recognized(mask, causal):
    """A mask the forward builds from sizes alone is run at compile time: the causal one (-inf or finfo.min
    where hidden) becomes the kernels' own causality, no mask read; a sliding window or a bias added to the
    causal mask stays a mask the kernels read. Both ways the result is the module's. Two lengths: the second
    compiles with a symbolic length, where the check runs the mask at other lengths too."""
    model = LatentAttention(mask=mask).eval()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="deepfuse", options={"passes": ["mla"], "kernels": "reference"})
    for s in (5, 8):
        x = torch.randn(2, s, 32)
        report = deepfuse.Report()
        with torch.no_grad(), deepfuse.collect(report):
            out, ref = compiled(x), model(x)
        assert rel_err(out, ref) < 1e-5
        (m,) = _mla_matches(report)
        assert m.params["mask"] is not causal and m.params["causal"] is causal
        assert ("mask_form" in m.params) is causal


def test_a_mask_from_an_input_is_read_as_a_mask():
    """A padding mask passed in is data, whatever it holds (here: causal): never taken for causality."""
    class Masked(LatentAttention):
        def forward(self, x, mask):
            self.mask = lambda s, device: mask
            return super().forward(x)

    model = Masked().eval()
    x = torch.randn(2, 6, 32)
    report = deepfuse.Report()
    with torch.no_grad(), deepfuse.collect(report):
        out = torch.compile(model, backend="deepfuse", options={"passes": ["mla"], "kernels": "reference"})(
            x, _causal(6, "cpu"))
        ref = model(x, _causal(6, "cpu"))
    assert rel_err(out, ref) < 1e-5
    (m,) = _mla_matches(report)
    assert m.params["mask"] is True and "mask_form" not in m.params
