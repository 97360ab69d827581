"""The MoE pass on real models: found by what it computes, rewritten, and still right."""
import pytest
import torch
import torch.nn.functional as F

import deepfuse
from deepfuse.models import DeepSeekForCausalLM, get_config
from conftest import compile_and_compare as _compile_check, fused_and_unfused_fp8, gathered_experts, rel_err

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("config,routing", [
    ("tiny", {"scoring": "softmax", "group_limited": False, "score_bias": False}),
    ("v2-tiny", {"scoring": "softmax", "group_limited": True, "score_bias": False}),
    ("v3-tiny", {"scoring": "sigmoid", "group_limited": True, "score_bias": True}),
])
@pytest.mark.parametrize("options", [{}, {"interpret": True}], ids=["reference", "interpret"])
def test_bundled_model_moe_is_fused_and_correct(config, routing, options):
    cfg = get_config(config)
    model = DeepSeekForCausalLM.from_config(cfg, seed=int(torch.randint(0, 1000, ())))
    report = _compile_check(model, (torch.randint(0, cfg.vocab_size, (2, 9)),), 1e-4, **options)
    moes = [m for m in report.matches if m.family == "moe"]
    assert len(moes) == cfg.num_hidden_layers - cfg.first_k_dense_replace, str(report)
    for m in moes:
        assert m.params["experts"] == cfg.n_routed_experts and m.params["top_k"] == cfg.num_experts_per_tok
        assert m.params["activation"] == "silu" and m.params["intermediate"] == cfg.moe_intermediate_size
        assert {k: m.params[k] for k in routing} == routing
        assert m.module.endswith("mlp") or "mlp" in m.module, m.module
        # the shared MLP (intermediate n_shared * I) runs as n_shared more experts in the same launches
        assert m.params["shared_experts"] == f"fused: {cfg.n_shared_experts} always-chosen experts of " \
                                             f"{cfg.moe_intermediate_size}", m.params
        # the router, logits to weights and ids, runs as one kernel unless the experts run as plain torch
        assert m.params["routing"] == (f"kernel: {_routing_of(cfg).describe()}" if m.impl != "reference"
                                       else "aten (reference kernels)")


def _routing_of(cfg):
    """The RoutingSpec a bundled config's router computes, from its config fields."""
    from deepfuse.runtime.kernels.routing import RoutingSpec

    bias = cfg.topk_method == "noaux_tc"
    groups = cfg.n_group if cfg.topk_method != "greedy" and cfg.n_group > 1 else 1
    return RoutingSpec(cfg.num_experts_per_tok, cfg.scoring_func, bias, groups, cfg.topk_group if groups > 1 else 1,
                       "top2_sum" if bias else "max", float("-inf"),
                       cfg.norm_topk_prob and cfg.num_experts_per_tok > 1, cfg.routed_scaling_factor)


HF_COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)


def _hf(kind, impl):
    if kind == "deepseek_v2":
        cfg = transformers.DeepseekV2Config(**HF_COMMON, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                                            v_head_dim=16, q_lora_rank=None, n_routed_experts=8, n_shared_experts=1,
                                            num_experts_per_tok=2, first_k_dense_replace=1)
        cls = transformers.DeepseekV2ForCausalLM
    elif kind == "deepseek_v3":
        cfg = transformers.DeepseekV3Config(**HF_COMMON, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                                            v_head_dim=16, q_lora_rank=24, n_routed_experts=8, n_shared_experts=1,
                                            num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1)
        cls = transformers.DeepseekV3ForCausalLM
    elif kind == "qwen2_moe":  # a shared expert of twice the experts' size, behind a sigmoid gate
        cfg = transformers.Qwen2MoeConfig(**HF_COMMON, shared_expert_intermediate_size=64, num_experts=8,
                                          num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[])
        cls = transformers.Qwen2MoeForCausalLM
    else:
        cfg = transformers.MixtralConfig(**HF_COMMON, num_local_experts=8, num_experts_per_tok=2)
        cls = transformers.MixtralForCausalLM
    cfg._experts_implementation = impl
    return cls(cfg).eval()


@pytest.mark.parametrize("kind", ["deepseek_v2", "deepseek_v3", "mixtral", "qwen2_moe"])
@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
def test_hf_moe_models_are_recognized(kind, impl):
    model = _hf(kind, impl)
    ids = torch.randint(0, 256, (1, 7))
    if impl == "batched_mm":
        report = _compile_check(model, (ids,), 1e-4, interpret=True)
    else:
        report = _bf16_against_float64(model, kind, ids)
    moes = [m for m in report.matches if m.family == "moe"]
    layers = model.config.num_hidden_layers - getattr(model.config, "first_k_dense_replace", 0)
    assert len(moes) == layers, str(report)
    assert all(m.params["activation"] == "silu" for m in moes)
    routing = {"deepseek_v2": "kernel: softmax, top-2",  # HF's V2 router multiplies by a scale of 1.0
               "deepseek_v3": "kernel: sigmoid, score-correction bias, best 1 of 2 groups by top2_sum (others -> "
                              "-inf), top-2, renormalized, x 2.5",
               "mixtral": "kernel: softmax, top-2, renormalized", "qwen2_moe": "kernel: softmax, top-2"}[kind]
    shared = {"mixtral": None, "qwen2_moe": "fused: 2 always-chosen experts of 32, weighted per token by sigmoid"}
    for m in moes:
        want, got = shared.get(kind, "fused: 1 always-chosen experts of 32"), m.params.get("shared_experts")
        assert got is None if want is None else got.startswith(want), m.params
    for m in moes:  # bf16 on the CPU runs the reference ops (the interpreter's bf16 dots are wrong)
        assert m.params["routing"] == (routing if m.impl != "reference" else "aten (reference kernels)"), m.params


# MoE families the matcher was not written against, as transformers 5.17 builds them (tiny, random): each is found
# by what it computes, with its router's semantics read off its graph, or declined with a reason; right either way.
UNSEEN = {
    "Qwen3Moe": (dict(num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[]),
                 "softmax, top-2", None),
    "Olmoe": (dict(num_experts=8, num_experts_per_tok=2), "softmax, top-2", None),
    "Glm4Moe": (dict(n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                     n_group=2, topk_group=1, partial_rotary_factor=0.5),
                "sigmoid, score-correction bias, best 1 of 2 groups by top2_sum (others -> -inf), top-2, renormalized",
                "fused: 1 always-chosen experts of 32"),
    # its bias is [1, experts], read through a squeeze; its renormalization divides by clamp(sum, min=1e-12)
    "Ernie4_5_Moe": (dict(moe_num_experts=8, moe_k=2, moe_num_shared_experts=1, moe_layer_start_index=0),
                     "softmax, score-correction bias, top-2, renormalized", "fused: 1 always-chosen experts of 32"),
    "HunYuanMoEV1": (dict(num_experts=8, moe_topk=2), "softmax, top-2, renormalized",
                     "fused: 1 always-chosen experts of 96"),
    "MiniMaxM2": (dict(num_local_experts=8, num_experts_per_tok=2), "sigmoid, score-correction bias, top-2, renormalized",
                  None),
    "ExaoneMoe": (dict(num_experts=8, num_experts_per_tok=2), "sigmoid, score-correction bias, top-2, renormalized, "
                  "x 2.5", "fused: 1 always-chosen experts of 32"),
    "GraniteMoe": (dict(num_local_experts=8, num_experts_per_tok=2), "softmax, top-2, renormalized", None),
    # its shared MLP computes gate and up in one matmul, the output halved
    "GraniteMoeShared": (dict(num_local_experts=8, num_experts_per_tok=2, shared_intermediate_size=192),
                         "softmax, top-2, renormalized", "fused: 2 always-chosen experts of 96"),
    # its shared MLP reads the flattened [T, H] hidden states and is added as [B, S, H]
    "Afmoe": (dict(num_experts=8, num_experts_per_tok=2), "sigmoid, score-correction bias, top-2, renormalized",
              "fused: 2 always-chosen experts of 32"),
    "Lfm2Moe": (dict(num_experts=8, num_experts_per_tok=2, num_dense_layers=0, layer_types=["full_attention"] * 2),
                "sigmoid, score-correction bias, top-2, renormalized", None),
    "Qwen3_5MoeText": (dict(num_experts=8, num_experts_per_tok=2, shared_expert_intermediate_size=32,
                            layer_types=["full_attention"] * 2), "softmax, top-2, renormalized",
                       "fused: 1 always-chosen experts of 32, weighted per token by sigmoid"),
    # a parallel block: the MoE's output is added to the attention's, which is no shared MLP
    "Cohere2Moe": (dict(num_experts=8, num_experts_per_tok=2), "softmax, top-2, renormalized", None),
    # experts stored [E, H, 2I] with gate and up rows interleaved, a bias per expert and projection, a clamped SwiGLU
    "GptOss": (dict(num_local_experts=8, num_experts_per_tok=2, layer_types=["full_attention"] * 2),
               "softmax, top-2, renormalized", None),
    # a sparsemixer router (no top-k): the stacked experts are declined with why, not left without a word
    "Phimoe": (dict(num_local_experts=8, num_experts_per_tok=2), None, None),
    # the routing weights scale the experts' input, through a sigmoid, and every expert runs densely on the scaled
    # rows (0 for the unchosen): fused as the sparse sum; the shared MLP stays with Inductor
    "Llama4Text": (dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size_mlp=96,
                        interleave_moe_layer_step=1), "scores as given, top-2",
                   "with Inductor (the routing weights scale the experts' input"),
    # ungated experts and shared MLP, down(relu(up(x))^2): an attention layer, then the MoE layer
    "NemotronH": (dict(n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1,
                       moe_shared_expert_intermediate_size=64, layers_block_type=["attention", "moe"]),
                  "sigmoid, score-correction bias, top-2, renormalized", "fused: 2 always-chosen experts of 32"),
    "Dots1": (dict(n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=0, n_group=1,
                   topk_group=1), "sigmoid, score-correction bias, top-2", "fused: 1 always-chosen experts of 32"),
    "SolarOpen": (dict(n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=0,
                       n_group=1, topk_group=1), "sigmoid, score-correction bias, top-2, renormalized",
                  "fused: 1 always-chosen experts of 32"),
    "FlexOlmo": (dict(num_experts=8, num_experts_per_tok=2, pad_token_id=0), "softmax, top-2", None),
    # a hybrid of Mamba and attention layers (here every layer attention), its MoE on each
    "Jamba": (dict(num_experts=8, num_experts_per_tok=2, attn_layer_period=1, attn_layer_offset=0,
                   expert_layer_period=1, expert_layer_offset=0), "softmax, top-2", None),
    # a per-expert scale on the routing weights (the routing kernel's), tanh-GELU experts told from erf-GELU ones,
    # and a dense MLP beside the experts, which is no shared MLP (it reads other hidden states)
    "Gemma4Text": (dict(enable_moe_block=True, num_experts=8, top_k_experts=2, layer_types=["full_attention"] * 2,
                        pad_token_id=0), "softmax, top-2, renormalized, x a per-expert scale", None),
    # a hybrid (its linear-attention layers listed as none here) with Qwen-MoE's sigmoid-gated shared expert
    "Qwen3Next": (dict(num_experts=8, num_experts_per_tok=2, shared_expert_intermediate_size=32, decoder_sparse_step=1,
                       mlp_only_layers=[], layer_types=["full_attention"] * 2), "softmax, top-2, renormalized",
                  "fused: 1 always-chosen experts of 32, weighted per token by sigmoid"),
    "HYV3": (dict(num_experts=8, num_experts_per_tok=2), "sigmoid, score-correction bias, top-2, renormalized, x 2.826",
             "fused: 1 always-chosen experts of 32"),
    # SiLU clamped at 10 in its experts but not in its shared MLP (which stays apart: checked past the limit, it is
    # no clamped unit), and a sparse attention whose indexer's top-k is no router's
    "HYV4": (dict(n_routed_experts=8, num_experts_per_tok=2, pad_token_id=0),
             "sigmoid, score-correction bias, top-2, renormalized, x 2.827",
             "with Inductor (the value added to the experts is not a gated MLP with the experts' activation"),
    # its own experts loop (an .item() per expert, zero-computation experts that return their input): declined,
    # with the reason that no setting makes it trace
    "LongcatFlash": (dict(n_routed_experts=8, moe_topk=2, zero_expert_num=2, ffn_hidden_size=96,
                          expert_ffn_hidden_size=32, num_layers=1, num_key_value_heads=4, kv_lora_rank=32,
                          q_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=24, head_dim=8), None,
                     None),
    # Qwen3-Omni's thinker (its text model alone)
    "Qwen3OmniMoeText": (dict(num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[]),
                         "softmax, top-2, renormalized", None),
    # GPT-OSS's clamped SwiGLU over gate and up halves (not interleaved), a sigmoid router with a bias, the routed
    # sum scaled before its shared MLP (gate and up one matmul) joins it
    "MiniMaxM3VLText": (dict(num_local_experts=8, num_experts_per_tok=2, shared_intermediate_size=96, index_head_dim=16,
                             index_n_heads=2, layer_types=["full_attention"] * 2, routed_scaling_factor=2.0),
                        "sigmoid, score-correction bias, top-2, renormalized", "fused: 1 always-chosen experts of 96"),
    # a token classifier (no causal mask): GPT-OSS's clamped SwiGLU over [E, H, 2I] gate and up halves with biases,
    # a biased router whose top-k logits are softmaxed, then divided by k
    "OpenAIPrivacyFilter": (dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32, pad_token_id=0),
                            "softmax, top-2, renormalized, x 0.5", None),
}
ACTIVATION = {"GptOss": "swiglu_clamped(alpha=1.702, limit=7.0)", "NemotronH": "relu2", "Gemma4Text": "gelu_tanh",
              "OpenAIPrivacyFilter": "swiglu_clamped(alpha=1.702, limit=7.0)",
              "HYV4": "silu_clamped(limit=10.0)",
              "MiniMaxM3VLText": "swiglu_clamped(alpha=1.702, limit=7.0)"}  # silu otherwise
MODEL_CLASS = {"OpenAIPrivacyFilter": "OpenAIPrivacyFilterForTokenClassification",  # ...ForCausalLM otherwise
               "Qwen3OmniMoeText": "Qwen3OmniMoeThinkerTextModel", "MiniMaxM3VLText": "MiniMaxM3VLTextModel"}


def _randomize_zeros(model) -> None:
    """Draw the parameters a model initializes to zeros (some routers and biases, where every expert ties), norms
    aside."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.abs().any() and "norm" not in name:
                p.normal_(0, 0.5)


@pytest.mark.parametrize("family", sorted(UNSEEN))
def test_unseen_hf_moe_families_are_fused_or_declined_and_right(family):
    if not hasattr(transformers, family + "Config"):
        pytest.skip(f"this transformers has no {family}")
    kwargs, routing, shared = UNSEEN[family]
    cfg = getattr(transformers, family + "Config")(**{**HF_COMMON, "num_key_value_heads": 2, "head_dim": 16,
                                                      **kwargs})
    model = getattr(transformers, MODEL_CLASS.get(family, family.removesuffix("Text") + "ForCausalLM"))(cfg).eval()
    _randomize_zeros(model)
    report = _compile_check(model, (torch.randint(0, 256, (1, 7)),), 1e-4, interpret=True)
    moes = [m for m in report.matches if m.family == "moe"]
    if routing is None:
        assert not moes and [d for d in report.declined if d.family == "moe"], str(report)
        return
    # (an attention indexer's top-k, HY-V4's, is declined as no router's)
    assert moes and not [d for d in report.declined if d.family == "moe" and "indexer" not in d.reason], str(report)
    for m in moes:
        assert m.params["activation"] == ACTIVATION.get(family, "silu"), m.params
        assert m.params["routing"] == f"kernel: {routing}", m.params
        assert ("ungated" in m.params) == (family == "NemotronH"), m.params
        assert ("biases" in m.params and "gate_up_rows" in m.params) == (family == "GptOss"), m.params
        assert m.params.get("routing_weights", "").startswith("scale the experts' input (sigmoid)") == (
            family == "Llama4Text"), m.params
        got = m.params.get("shared_experts")
        assert got is None if shared is None else got.startswith(shared), m.params  # (a gate names its node)
        if family == "OpenAIPrivacyFilter":  # a division by top_k (an int): its fitted scale is 1/2 exactly
            assert m.params["routed_scaling"] == 0.5, m.params


def test_inkling_stacked_shared_experts_join_the_routed_ones():
    """Inkling (transformers 5.17, not written against): its router scores routed and shared experts in one matmul,
    and the shared experts' per-token weights come from the same normalization as the chosen experts' (over the
    chosen logits gathered at the top-k ids), so every path from the top-k meets the shared experts' bmm before it
    reaches the layer's output. The routed experts' own sum is the region; the stacked shared experts ([S, I, H]
    weights, batched matmuls, each expert's intermediate times its own column of the router's [T, S] weights) join
    its launches as always-chosen experts; the router stays with Inductor."""
    if not hasattr(transformers, "InklingTextConfig"):
        pytest.skip("this transformers has no Inkling")
    cfg = transformers.InklingTextConfig(**{**HF_COMMON, "num_key_value_heads": 2, "head_dim": 16,
                                            "num_hidden_layers": 1},
                                         n_routed_experts=8, num_experts_per_tok=4, n_shared_experts=2)
    model = transformers.InklingForCausalLM(cfg).eval()
    _randomize_zeros(model)
    report = _compile_check(model, (torch.randint(0, 256, (1, 7)),), 1e-4, interpret=True)
    moes = [m for m in report.matches if m.family == "moe"]
    assert len(moes) == cfg.num_hidden_layers, str(report)
    for m in moes:
        assert (m.params["experts"], m.params["top_k"], m.params["activation"]) == (8, 4, "silu"), m.params
        assert m.params["routing"].startswith("top-k kernel (the router reads"), m.params
        assert m.params["shared_experts"].startswith("fused: 2 always-chosen experts of 32, stacked [S, I, H], each "
                                                     "weighted per token by its column of"), m.params
        assert m.params["shared_experts"].endswith("(the [T, S] weights of model.layers.0.mlp.gate)"), m.params
    assert not [d for d in report.declined if d.family == "moe"], str(report)


def test_stacked_shared_experts_stored_transposed_or_computing_something_else(monkeypatch):
    """Inkling's stacked shared experts written two other ways (one layer, interpreter): gate and up stored [S, H, I]
    and down [S, I, H], multiplied untransposed, and not weighted per token, join the launches (their storage read
    off the check, each expert weighing 1); a tanh on each expert's down output is no shared MLP of the experts'
    form: declined, said so. Either way the result is eager's."""
    if not hasattr(transformers, "InklingTextConfig"):
        pytest.skip("this transformers has no Inkling")
    from transformers.models.inkling import modeling_inkling as inkling

    def transposed(self, hidden_states, gammas):  # (gammas unused)
        shape = hidden_states.shape
        x = hidden_states.reshape(1, -1, shape[-1]).expand(self.n_shared_experts, -1, -1)
        inner = self.act_fn(torch.bmm(x, self.gate_proj)) * torch.bmm(x, self.up_proj)
        return torch.bmm(inner, self.down_proj).sum(dim=0).view(shape)

    def tanh_after_down(self, hidden_states, gammas):
        shape = hidden_states.shape
        x = hidden_states.reshape(1, -1, shape[-1]).expand(self.n_shared_experts, -1, -1)
        gammas = gammas.reshape(-1, self.n_shared_experts, 1).transpose(0, 1)
        inner = self.act_fn(torch.bmm(x, self.gate_proj.transpose(1, 2))) * torch.bmm(x, self.up_proj.transpose(1, 2))
        return torch.tanh(torch.bmm(inner * gammas, self.down_proj.transpose(1, 2))).sum(dim=0).view(shape)

    cfg = transformers.InklingTextConfig(**{**HF_COMMON, "num_key_value_heads": 2, "head_dim": 16,
                                            "num_hidden_layers": 1}, n_routed_experts=8, num_experts_per_tok=2,
                                         n_shared_experts=3)
    for forward, fused in ((transposed, True), (tanh_after_down, False)):
        monkeypatch.setattr(inkling.InklingSharedExperts, "forward", forward)
        model = inkling.InklingForCausalLM(cfg).eval()
        if fused:  # stored the other way round: [S, H, I] gate and up, [S, I, H] down
            experts = model.model.layers[0].mlp.shared_experts
            for name in ("gate_proj", "up_proj", "down_proj"):
                setattr(experts, name, torch.nn.Parameter(getattr(experts, name).transpose(1, 2).contiguous()))
        _randomize_zeros(model)
        torch._dynamo.reset()
        report = _compile_check(model, (torch.randint(0, 256, (1, 7)),), 1e-4, interpret=True)
        (moe,) = [m for m in report.matches if m.family == "moe"]
        if fused:
            assert moe.params["shared_experts"] == "fused: 3 always-chosen experts of 32, stacked [S, I, H]", \
                moe.params
        else:
            assert moe.params["shared_experts"].startswith("with Inductor (the value added to the experts is not "
                                                           "stacked gated MLPs"), moe.params


def test_stacked_shared_experts_beside_fp8_experts_stay_apart_said_so():
    """Inkling quantized while compiling (fp8-block): its FP8 routed experts are fused, its stacked shared experts
    (float kernels only) stay with Inductor with that reason, not as stacked weights no top-k chooses; equal to the
    same quantized model with no pattern pass."""
    if not hasattr(transformers, "InklingTextConfig"):
        pytest.skip("this transformers has no Inkling")
    cfg = transformers.InklingTextConfig(**{**HF_COMMON, "hidden_size": 128, "num_key_value_heads": 2, "head_dim": 32,
                                            "moe_intermediate_size": 128, "num_hidden_layers": 1},
                                         n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=2)
    model = transformers.InklingForCausalLM(cfg).eval()
    _randomize_zeros(model)
    ids, report = torch.randint(0, 256, (1, 7)), deepfuse.Report()
    fused, unfused = fused_and_unfused_fp8(model, lambda compiled: compiled(ids).logits, report)
    assert rel_err(fused, unfused) < 1e-3
    (moe,) = [m for m in report.matches if m.family == "moe"]
    assert moe.params["shared_experts"] == ("with Inductor (stacked shared experts (batched matmuls over [S, I, H] "
                                            "weights) join float experts' launches only)"), moe.params
    assert not [d for d in report.declined if d.family == "moe"], str(report)


def test_step3p7_experts_loop_is_traced_and_its_clamp_after_the_silu_is_told_apart():
    """Step-3.7-Flash (transformers 5.17): its experts module has the experts interface's weights and loop but not
    the interface, so Dynamo broke the graph in the loop; deepfuse runs transformers' traceable form of it while
    compiling (``canonical.HF_EXPERTS_WITHOUT_INTERFACE``). Its unit clamps the SiLU's output where DeepSeek-V4's
    clamps the gate before it (at most 0.0064 apart at a limit of 7, less than the pass's check tells apart): the
    graph decides which. A limit of 0 (none) writes a clamp at infinity: plain SiLU. Its shared MLP joins the
    routed sum after that is scaled by a constant: the fused launch scales the routed slots' weights instead."""
    if not hasattr(transformers, "Step3p7TextConfig"):
        pytest.skip("this transformers has no Step3p7")
    cfg = transformers.Step3p7TextConfig(**{**HF_COMMON, "num_key_value_heads": 2, "head_dim": 16},
                                         n_routed_experts=8, num_experts_per_tok=2, share_expert_dim=32,
                                         sliding_window=64, mlp_layer_types=["sparse"] * 2,
                                         layer_types=["full_attention"] * 2, swiglu_limits=[7.0, 0.0],
                                         moe_router_scaling_factor=2.5)
    model = transformers.Step3p7TextModel(cfg).eval()
    report = _compile_check(model, (torch.randint(0, 256, (1, 7)),), 1e-4, interpret=True)
    moes = sorted((m for m in report.matches if m.family == "moe"), key=lambda m: m.module)
    assert [m.params["activation"] for m in moes] == ["silu_out_clamped(limit=7.0)", "silu"], str(report)
    assert all(m.params["routing"] == "kernel: sigmoid, score-correction bias, top-2, renormalized" for m in moes)
    # the shared MLP after the routed sum's scaling (2.5) joins the launches where its activation is the experts'
    # (the second layer's); the first layer's shared MLP clamps nothing, checked past the experts' limit
    assert [m.params["shared_experts"][:27] for m in moes] == ["with Inductor (the value ad",
                                                                "fused: 1 always-chosen expe"], str(report)
    assert not [d for d in report.declined if d.family == "moe"], str(report)


def test_fp8_experts_join_a_shared_mlp_past_a_routed_scaling():
    """Step-3.7 quantized while compiling (fp8-block): its FP8 experts and FP8 shared MLP in one pair of launches
    though the routed sum is scaled (by 2.5) before the shared MLP joins it; equal to the same quantized model with
    no pattern pass (interpreter, fp32)."""
    if not hasattr(transformers, "Step3p7TextConfig"):
        pytest.skip("this transformers has no Step3p7")
    cfg = transformers.Step3p7TextConfig(**{**HF_COMMON, "hidden_size": 128, "num_key_value_heads": 2,
                                            "head_dim": 32, "moe_intermediate_size": 128, "num_hidden_layers": 1},
                                         n_routed_experts=4, num_experts_per_tok=2, share_expert_dim=128,
                                         sliding_window=64, mlp_layer_types=["sparse"],
                                         layer_types=["full_attention"], moe_router_scaling_factor=2.5)
    model = transformers.Step3p7TextModel(cfg).eval()
    ids = torch.randint(0, 256, (1, 7))
    report = deepfuse.Report()
    outs = fused_and_unfused_fp8(model, lambda compiled: compiled(ids).last_hidden_state, report)
    moes = [m for m in report.matches if m.family == "moe"]
    assert len(moes) == 1 and all("W8A8" in str(m.params.get("expert_weights")) for m in moes), str(report)
    assert all(m.params["shared_experts"] == "fused: 1 always-chosen FP8 experts of 128" for m in moes), str(report)
    # the same W8A8 math, summed in another order: an intermediate on an e4m3 rounding boundary can land one step
    # apart (1.3e-3 seen once in a suite run of random weights); a wrong scale or a missed shared MLP is 1e-2 and more
    assert rel_err(outs[0], outs[1]) < 2e-3


def _bf16_against_float64(model, kind, ids):
    """``model`` (grouped_mm experts: torch._grouped_mm takes bf16 only) compiled in bf16, against the same
    weights in float64 (batched_mm experts), token by token: within twice eager bf16's error or 3e-2. One token of
    the 7 may be outside: a bf16 router near a tie can pick another expert than float64 for one token (seen
    once at 0.036 on the whole output, with fresh random weights); a wrong rewrite misses on every token."""
    exact = _hf(kind, "batched_mm").double()
    exact.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    model = model.bfloat16()
    report = deepfuse.Report()
    with torch.no_grad():
        ref, eager = exact(ids).logits[0], model(ids).logits[0]
        with deepfuse.collect(report):
            out = torch.compile(model, backend="deepfuse")(ids).logits[0]
    outside = [t for t in range(ids.shape[1])
               if rel_err(out[t], ref[t]) >= max(2 * rel_err(eager[t], ref[t]), 3e-2)]
    assert len(outside) <= 1, [(t, rel_err(out[t], ref[t]), rel_err(eager[t], ref[t])) for t in outside]
    return report


@pytest.mark.parametrize("kind,dtype", [("deepseek_v2", "float32"), ("deepseek_v3", "float32"),
                                        ("mixtral", "float32"), ("deepseek_v2", "bfloat16")])
def test_hf_eager_experts_loop_is_fused_through_the_canonical_form(kind, dtype):
    """transformers' default experts implementation, a per-expert Python loop Dynamo breaks the graph in: while
    deepfuse compiles, the module runs transformers' own traceable form of the same function (batched_mm in
    fp32, grouped_mm in bf16), and is fused. Eager calls keep the loop."""
    from transformers.integrations import moe as hf_moe

    model = _hf(kind, "eager").to(getattr(torch, dtype))
    fp32 = dtype == "float32"  # the interpreter's bf16 tl.dot is wrong: bf16 runs the op's reference here
    report = _compile_check(model, (torch.randint(0, 256, (1, 7)),), 1e-4 if fp32 else 3e-2, interpret=fp32)
    moes = [m for m in report.matches if m.family == "moe"]
    layers = model.config.num_hidden_layers - getattr(model.config, "first_k_dense_replace", 0)
    assert len(moes) == layers and not [d for d in report.declined if d.family == "moe"], str(report)
    experts = next(m for m in model.modules() if type(m).__name__.endswith("Experts"))
    eager_forward = hf_moe.ALL_EXPERTS_FUNCTIONS.get_interface("eager", "the loop")
    assert eager_forward == "the loop" and experts.config._experts_implementation == "eager"


def test_experts_after_a_graph_break_decline_with_the_setting_that_fixes_it(monkeypatch):
    """Without the canonical form (as with a transformers older than its experts interface), the eager loop
    breaks Dynamo's graph after the router: declined, with the one-line setting that makes the experts trace."""
    from transformers.integrations import moe as hf_moe
    from deepfuse.canonical import install

    install()  # (as loading the backend does; this test may run first)
    monkeypatch.setattr(hf_moe.ExpertsInterface, "get_interface", hf_moe.ExpertsInterface.get_interface.__wrapped__)
    report = deepfuse.explain(_hf("deepseek_v2", "eager"), torch.randint(0, 256, (1, 5)))
    assert not [m for m in report.matches if m.family == "moe"]
    assert any("grouped_mm" in d.reason for d in report.declined if d.family == "moe"), str(report)


# Models whose own experts loop is no transformers experts module: no setting makes it trace, and the reason says so.
OWN_LOOPS = {
    "Dbrx": dict(vocab_size=256, d_model=64, n_heads=4, n_layers=2, max_seq_len=256,
                 attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
                 ffn_config=dict(moe_num_experts=8, moe_top_k=2, ffn_hidden_size=32)),
    "JetMoe": dict(HF_COMMON, num_local_experts=8, num_experts_per_tok=2, kv_channels=16),
}


@pytest.mark.parametrize("family", sorted(OWN_LOOPS))
def test_a_models_own_experts_loop_is_declined_with_what_would_make_it_trace(family):
    if not hasattr(transformers, family + "Config"):
        pytest.skip(f"this transformers has no {family}")
    model = getattr(transformers, family + "ForCausalLM")(getattr(transformers, family + "Config")(**OWN_LOOPS[family]))
    report = deepfuse.explain(model.eval(), torch.randint(0, 256, (1, 5)))
    declined = [d.reason for d in report.declined if d.family == "moe"]
    assert declined and not [m for m in report.matches if m.family == "moe"], str(report)
    assert all("not a transformers experts module" in r and "grouped_mm'" not in r for r in declined), declined


class StackedExperts(torch.nn.Module):
    """A router and stacked gated experts (gate+up [E, 2I, H], down [E, H, I]); subclasses say how they are run."""

    def __init__(self, e=4, h=32, i=16, k=2):
        super().__init__()
        self.router = torch.nn.Linear(h, e, bias=False)
        self.w1 = torch.nn.Parameter(torch.randn(e, 2 * i, h) / h**0.5)
        self.w2 = torch.nn.Parameter(torch.randn(e, h, i) / i**0.5)
        self.k = k


class ReluExperts(StackedExperts):
    """Routed experts with an activation the kernels do not implement: must be declined, never approximated."""

    def forward(self, x):
        weights, ids = self.router(x).softmax(-1).topk(self.k, dim=-1)
        return gathered_experts(x, ids, weights, self.w1, self.w2, F.relu)


class UngatedExperts(torch.nn.Module):
    """Ungated experts, down(act(up(x))), as a model nobody rewrote may write them (each slot's weights gathered,
    two bmm), the up weights stored [E, I, H] or transposed, with a shared MLP ungated or gated, or none."""

    def __init__(self, act, transposed=False, shared=None, e=6, h=32, i=16):
        super().__init__()
        self.act, self.transposed, self.shared = act, transposed, shared
        self.router = torch.nn.Linear(h, e, bias=False)
        up = torch.randn(e, i, h) / h ** 0.5
        self.w_up = torch.nn.Parameter(up.transpose(1, 2).contiguous() if transposed else up)
        self.w_down = torch.nn.Parameter(torch.randn(e, h, i) / i ** 0.5)
        self.gate, self.up, self.down = (torch.nn.Linear(*shape, bias=False) for shape in ((h, 2 * i), (h, 2 * i),
                                                                                           (2 * i, h)))

    def forward(self, x):
        weights, ids = self.router(x).sigmoid().topk(2, dim=-1)
        w_up = self.w_up.transpose(1, 2) if self.transposed else self.w_up
        k = ids.shape[1]
        up = torch.bmm(w_up[ids.flatten()], x.repeat_interleave(k, 0).unsqueeze(-1)).squeeze(-1)
        y = torch.bmm(self.w_down[ids.flatten()], self.act(up).unsqueeze(-1)).squeeze(-1)
        out = (y * weights.flatten()[:, None]).view(x.shape[0], k, -1).sum(1)
        if self.shared == "ungated":
            out = out + self.down(self.act(self.up(x)))
        elif self.shared == "gated":
            out = out + self.down(self.act(self.gate(x)) * self.up(x))
        return out


def _relu2(v):
    return torch.relu(v) ** 2


@pytest.mark.parametrize("act,transposed,shared,want", [
    (_relu2, False, None, None),
    (_relu2, True, "ungated", "fused: 2 always-chosen experts of 16"),
    (F.gelu, False, "ungated", "fused: 2 always-chosen experts of 16"),
    (_relu2, False, "gated", "with Inductor (a gated shared MLP beside ungated experts does not join their launches)"),
], ids=["relu2", "transposed-with-shared", "gelu-with-shared", "gated-shared"])
def test_ungated_experts_are_fused(act, transposed, shared, want):
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    model = UngatedExperts(act, transposed, shared)
    x = torch.randn(7, 32)
    report = _compile_check(model, (x,), 1e-5, interpret=True)
    (m,) = [m for m in report.matches if m.family == "moe"]
    assert m.params["activation"] == ("gelu" if act is F.gelu else "relu2") and "ungated" in m.params, m.params
    assert m.params.get("shared_experts") == want or m.params["shared_experts"].startswith(want), m.params
    assert m.params["gate_up_transposed"] == transposed


def test_ungated_experts_in_float64_run_the_reference():
    """The reference kernels take any float dtype, gated or not (a float64 model compiles as a gated one does)."""
    model = UngatedExperts(_relu2, shared="ungated").double().eval()
    report = _compile_check(model, (torch.randn(7, 32, dtype=torch.float64),), 1e-12)
    (m,) = [m for m in report.matches if m.family == "moe"]
    assert m.impl == "reference" and "ungated" in m.params and m.params["shared_experts"].startswith("fused"), m.params


class LatentExperts(torch.nn.Module):
    """Routed experts over a latent: the router reads x, the experts a projection of x to a narrower width, and
    their weighted sum is projected back (Nemotron-3-Super's MoE), plus a shared MLP on x."""

    def __init__(self, h=32, latent=16, i=8, e=6):
        super().__init__()
        self.router = torch.nn.Linear(h, e, bias=False)
        self.fc1, self.fc2 = torch.nn.Linear(h, latent, bias=False), torch.nn.Linear(latent, h, bias=False)
        self.w1 = torch.nn.Parameter(torch.randn(e, 2 * i, latent) / latent ** 0.5)
        self.w2 = torch.nn.Parameter(torch.randn(e, latent, i) / i ** 0.5)
        self.shared = torch.nn.Sequential(torch.nn.Linear(h, 2 * h), torch.nn.SiLU(), torch.nn.Linear(2 * h, h))

    def forward(self, x):
        weights, ids = self.router(x).softmax(-1).topk(2, dim=-1)
        routed = gathered_experts(self.fc1(x), ids, weights / weights.sum(-1, keepdim=True), self.w1, self.w2, F.silu)
        return self.fc2(routed) + self.shared(x)


def test_experts_over_a_latent_are_fused():
    """The experts region ends at the latent sum (the first value of its width every path from the router passes
    through), the projections and the shared MLP staying with Inductor; Nemotron-H with its latent too."""
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    report = _compile_check(LatentExperts().eval(), (torch.randn(7, 32),), 1e-5, interpret=True)
    (m,) = [m for m in report.matches if m.family == "moe"]
    assert (m.params["hidden"], m.params["intermediate"], m.params["activation"]) == (16, 8, "silu"), m.params
    assert not [d for d in report.declined if d.family == "moe"], str(report)
    cfg = transformers.NemotronHConfig(**{**HF_COMMON, "num_key_value_heads": 2, "head_dim": 16, **UNSEEN[
        "NemotronH"][0], "moe_latent_size": 32, "layers_block_type": ["moe", "attention"]})
    model = transformers.NemotronHForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.layers[0].mixer.gate.weight.normal_()  # (initialized to zeros: every expert would tie)
    report = _compile_check(model, (torch.randint(0, 256, (1, 7)),), 1e-4, interpret=True)
    (m,) = [m for m in report.matches if m.family == "moe"]
    assert (m.params["hidden"], m.params["activation"]) == (32, "relu2") and "ungated" in m.params, m.params


class RoutedBeforeFlattening(StackedExperts):
    """A router choosing over [batch, seq, experts] scores, its ids and weights flattened to [tokens, k] after the
    top-k (as hand-written MoEs often are)."""

    def forward(self, x):
        b, s, h = x.shape
        weights, ids = self.router(x).softmax(-1).topk(self.k, dim=-1)  # [B, S, k]
        weights = weights / weights.sum(-1, keepdim=True)
        out = gathered_experts(x.reshape(-1, h), ids.reshape(-1, self.k), weights.reshape(-1, self.k), self.w1,
                               self.w2, F.silu)
        return out.view(b, s, h)


class LogitsGiven(StackedExperts):
    """Experts whose router logits come in as an input (computed before a graph break, say)."""

    def forward(self, x, logits):
        weights, ids = logits.softmax(-1).topk(self.k, dim=-1)
        return gathered_experts(x, ids, weights, self.w1, self.w2, F.silu)


def test_router_logits_from_outside_the_graph_are_declined_saying_so():
    model = LogitsGiven().eval()
    report = deepfuse.explain(model, torch.randn(5, 32), torch.randn(5, 4))
    assert not [m for m in report.matches if m.family == "moe"], str(report)
    assert any("logits are an input of this graph" in d.reason for d in report.declined), str(report)


class ZeroComputationExperts(StackedExperts):
    """LongCat-Flash's idea written traceably: the router chooses among E + Z ids, and the last Z experts compute
    nothing (their weight times the input). The routed part gathers the clamped ids with the zero experts' weights
    masked to 0, so a region ending at the routed sum computes the canonical MoE for every id the check draws
    (below E), and reads past the weights for the ids the router does choose (E and up)."""

    def __init__(self, e=4, zero=2, h=32, i=16, k=2):
        super().__init__(e, h, i, k)
        self.router = torch.nn.Linear(h, e + zero, bias=False)
        self.e = e

    def forward(self, x):
        weights, ids = self.router(x).softmax(-1).topk(self.k, dim=-1)
        real = ids < self.e
        routed = gathered_experts(x, ids.clamp(max=self.e - 1), weights * real, self.w1, self.w2, F.silu)
        return routed + (weights * ~real).sum(-1, keepdim=True) * x


def test_a_router_choosing_among_more_ids_than_experts_is_declined():
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    model = ZeroComputationExperts().eval()
    x = torch.randn(64, 32)
    assert (model.router(x).topk(2, dim=-1).indices >= 4).any()  # some tokens choose a zero-computation expert
    report = _compile_check(model, (x,), 1e-5, interpret=True)
    assert not [m for m in report.matches if m.family == "moe"], str(report)
    assert any("chooses among 6 ids, more than the 4 experts" in d.reason for d in report.declined), str(report)


def test_a_router_choosing_before_its_tokens_are_flattened():
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    report = _compile_check(RoutedBeforeFlattening(e=6).eval(), (torch.randn(2, 5, 32),), 1e-5, interpret=True)
    (m,) = [m for m in report.matches if m.family == "moe"]
    assert m.params["routing"] == "kernel: softmax, top-2, renormalized" and m.params["top_k"] == 2, m.params
    assert not report.declined, str(report)


class SharedMLP(torch.nn.Module):
    """Routed experts plus a shared MLP whose activation or size the fused launch cannot take."""

    def __init__(self, act=F.silu, shared_inter=16, routed_input_scale=1.0, gate=None, fused=None):
        super().__init__()
        self.act, self.scale, self.gate_kind, self.fused = act, routed_input_scale, gate, fused
        self.shared_gate = torch.nn.Linear(32, 32 if gate == "per_channel" else 1, bias=False)
        self.router = torch.nn.Linear(32, 4, bias=False)
        self.w1 = torch.nn.Parameter(torch.randn(4, 32, 32) / 32 ** 0.5)  # gate+up: I = 16
        self.w2 = torch.nn.Parameter(torch.randn(4, 32, 16) / 4)
        self.gate = torch.nn.Linear(32, shared_inter, bias=False)
        self.up = torch.nn.Linear(32, shared_inter, bias=False)
        self.down = torch.nn.Linear(shared_inter, 32, bias=False)
        # gate and up as one weight (Granite's input_linear), [2I, H] as Linear holds it or [H, 2I]
        self.gate_up = torch.nn.Parameter(torch.randn(2 * shared_inter, 32) / 32 ** 0.5)
        self.gate_up_t = torch.nn.Parameter(torch.randn(32, 2 * shared_inter) / 32 ** 0.5)

    def forward(self, h):
        x = h * self.scale if self.scale != 1.0 else h  # the routed experts' input; the shared MLP reads h
        weights, ids = self.router(x).softmax(-1).topk(2, dim=-1)
        routed = gathered_experts(x, ids, weights, self.w1, self.w2, F.silu)
        if self.fused:
            both = h @ self.gate_up_t if self.fused.endswith("transposed") else F.linear(h, self.gate_up)
            gate, up = both.chunk(2, dim=-1) if self.fused.startswith("gate") else both.chunk(2, dim=-1)[::-1]
            shared = self.down(self.act(gate) * up)
        else:
            shared = self.down(self.act(self.gate(h)) * self.up(h))
        if self.gate_kind in ("sigmoid", "per_channel"):  # Qwen-MoE's gate, or one factor per channel
            shared = torch.sigmoid(self.shared_gate(h)) * shared
        elif self.gate_kind == "of_itself":  # a factor computed from the shared output: not a gate of the input
            shared = shared * torch.sigmoid(shared.sum(-1, keepdim=True))
        elif self.gate_kind == "of_the_routed":  # a factor computed from the routed output
            shared = shared * torch.sigmoid(routed.sum(-1, keepdim=True))
        return routed + shared


@pytest.mark.parametrize("variant,want", [
    ({}, "fused: 1 always-chosen experts of 16"),
    ({"tokens": 600}, "with Inductor (600 tokens: past 512, cuBLAS runs the shared MLP faster"),
    ({"shared_inter": 48}, "fused: 3 always-chosen experts of 16"),
    ({"act": F.relu}, "with Inductor (the value added to the experts is not a gated MLP with the experts' activation"),
    ({"shared_inter": 24}, "with Inductor (the shared intermediate size 24 is not a multiple of the experts' 16)"),
    ({"routed_input_scale": 2.0}, "with Inductor (the shared MLP reads other hidden states than the routed experts"),
    ({"gate": "sigmoid"}, "fused: 1 always-chosen experts of 16, weighted per token by sigmoid (a gated shared MLP)"),
    ({"gate": "sigmoid", "shared_inter": 48}, "fused: 3 always-chosen experts of 16, weighted per token by"),
    ({"gate": "per_channel"}, "with Inductor (the value added to the experts holds 4 matmuls"),
    ({"gate": "of_itself"}, "with Inductor (the value added to the experts is not a gated MLP"),
    ({"gate": "of_the_routed"}, None),  # the routed output read twice: no shared MLP is looked for
    ({"fused": "gate first"}, "fused: 1 always-chosen experts of 16"),
    ({"fused": "up first", "shared_inter": 32}, "fused: 2 always-chosen experts of 16"),
    ({"fused": "gate first, transposed", "gate": "sigmoid"}, "fused: 1 always-chosen experts of 16, weighted"),
    ({"fused": "up first", "act": F.relu}, "with Inductor (the value added to the experts is not a gated MLP"),
])
def test_shared_experts_fused_only_when_checked(variant, want):
    variant = dict(variant)
    tokens = variant.pop("tokens", 5)
    report = _compile_check(SharedMLP(**variant), (torch.randn(tokens, 32),), 1e-5, interpret=True)
    (m,) = [m for m in report.matches if m.family == "moe"]
    assert m.params["shared_experts"].startswith(want) if want else "shared_experts" not in m.params, m.params


class InputScaled(torch.nn.Module):
    """Experts whose routing weights scale their input, Llama 4's dense form: every expert runs on x times its
    score, the scores sigmoid(top-k logits) at the chosen experts and sigmoid(-inf) = 0 elsewhere; or, with
    ``softmax``, scores no kernel form computes."""

    def __init__(self, softmax=False):
        super().__init__()
        self.softmax = softmax
        self.router = torch.nn.Linear(32, 4, bias=False)
        self.gate_up = torch.nn.Parameter(torch.randn(4, 32, 32) / 32 ** 0.5)  # [E, H, 2I], I = 16
        self.down = torch.nn.Parameter(torch.randn(4, 16, 32) / 4)

    def forward(self, x):
        logits = self.router(x)
        values, ids = logits.topk(2, dim=-1)
        scores = torch.full_like(logits, float("-inf")).scatter(1, ids, values)
        scores = scores.softmax(-1) if self.softmax else torch.sigmoid(scores)
        rows = x.repeat(4, 1) * scores.t().reshape(-1, 1)
        gate, up = torch.bmm(rows.view(4, -1, 32), self.gate_up).chunk(2, dim=-1)
        return torch.bmm(F.silu(gate) * up, self.down).sum(dim=0)


@pytest.mark.parametrize("softmax", [False, True])
def test_routing_weights_that_scale_the_input(softmax):
    report = _compile_check(InputScaled(softmax), (torch.randn(6, 32),), 1e-5, interpret=True)
    moes = [m for m in report.matches if m.family == "moe"]
    if softmax:  # softmax over the scattered scores: the chosen experts' weights depend on each other
        assert not moes and [d for d in report.declined if d.family == "moe"], str(report)
    else:
        assert len(moes) == 1 and moes[0].params["routing_weights"].startswith("scale the experts' input (sigmoid)")


class BiasedExperts(torch.nn.Module):
    """GPT-OSS-like experts written by hand: biases on both projections, gate/up as halves or interleaved rows, the
    SwiGLU clamped at ``limit`` with ``alpha`` (or plain SiLU); ``one_bias`` drops the down bias, ``swapped``
    clamps the up value from above only (a clamped SwiGLU the kernels do not compute)."""

    def __init__(self, limit=5.0, alpha=1.5, interleaved=True, clamped=True, one_bias=False, swapped=False):
        super().__init__()
        self.limit, self.alpha, self.interleaved, self.clamped = limit, alpha, interleaved, clamped
        self.one_bias, self.swapped = one_bias, swapped
        self.router = torch.nn.Linear(32, 6)
        self.gate_up = torch.nn.Parameter(torch.randn(6, 32, 32) / 32 ** 0.5)  # [E, H, 2I], I = 16
        self.gate_up_bias = torch.nn.Parameter(torch.randn(6, 32))
        self.down = torch.nn.Parameter(torch.randn(6, 16, 32) / 4)
        self.down_bias = torch.nn.Parameter(torch.randn(6, 32))

    def forward(self, x):
        values, ids = self.router(x).topk(2, dim=-1)
        weights = values.softmax(dim=-1)
        out = torch.zeros_like(x)
        for j in range(2):
            e = ids[:, j]
            both = torch.bmm(x[:, None], self.gate_up[e])[:, 0] + self.gate_up_bias[e]
            gate, up = (both[:, 0::2], both[:, 1::2]) if self.interleaved else both.chunk(2, dim=-1)
            if self.clamped:
                gate = gate.clamp(max=self.limit)
                up = up.clamp(max=self.limit) if self.swapped else up.clamp(-self.limit, self.limit)
                h = (up + 1) * gate * torch.sigmoid(gate * self.alpha)
            else:
                h = F.silu(gate) * up
            y = torch.bmm(h[:, None], self.down[e])[:, 0] + (0 if self.one_bias else self.down_bias[e])
            out = out + y * weights[:, j, None]
        return out


@pytest.mark.parametrize("form,want", [
    (dict(), "swiglu_clamped(alpha=1.5, limit=5.0)"),
    (dict(interleaved=False, limit=3.0, alpha=2.0), "swiglu_clamped(alpha=2.0, limit=3.0)"),
    (dict(clamped=False), "silu"),
    (dict(one_bias=True), None),  # a gate/up bias without a down bias: no form the kernels know
    (dict(swapped=True), None),   # up clamped from above only
], ids=str)
def test_expert_biases_interleaved_rows_and_clamped_swiglu_read_off_the_graph(form, want):
    """The constants of a clamped SwiGLU, the gate/up row order and the biases are read off the graph and checked;
    a form that differs anywhere is declined, never approximated."""
    report = _compile_check(BiasedExperts(**form), (torch.randn(9, 32),), 1e-5, interpret=True)
    moes = [m for m in report.matches if m.family == "moe"]
    if want is None:
        assert not moes and [d for d in report.declined if d.family == "moe"], str(report)
        return
    assert len(moes) == 1 and moes[0].params["activation"] == want, str(report)
    assert "biases" in moes[0].params
    assert ("gate_up_rows" in moes[0].params) == form.get("interleaved", True), moes[0].params


@pytest.mark.parametrize("impl", ["eager", "grouped_mm", "batched_mm"])
def test_gpt_oss_experts_in_each_transformers_implementation(impl):
    """GPT-OSS's experts as transformers runs them: its per-expert loop (through the canonical form), grouped_mm
    and batched_mm, fused and equal to eager."""
    cfg = transformers.GptOssConfig(**{**HF_COMMON, "num_key_value_heads": 2, "head_dim": 16}, num_local_experts=8,
                                    num_experts_per_tok=2, layer_types=["full_attention"] * 2)
    cfg._experts_implementation = impl
    model = transformers.GptOssForCausalLM(cfg).eval()
    _randomize_zeros(model)  # (its routers and biases start at zero)
    report = _compile_check(model, (torch.randint(0, 256, (1, 7)),), 1e-4, interpret=True)
    moes = [m for m in report.matches if m.family == "moe"]
    assert len(moes) == 2 and all(m.params["activation"].startswith("swiglu_clamped") for m in moes), str(report)


def test_deepseek_v4_moe_clamped_silu_and_hash_routed_layers():
    """DeepSeek-V4 (transformers' DeepseekV4, tiny): its experts and shared MLP clamp the gate and up values at
    swiglu_limit before SiLU, which the check must see (a random check whose values stay under the limit took it
    for plain SiLU, a wrong answer wherever real values cross it); its first layers choose experts by a token-id
    table (hash routing), whose ids stand where a top-k's would: every layer fused, equal to eager."""
    if not hasattr(transformers, "DeepseekV4Config"):
        pytest.skip("this transformers has no DeepseekV4")
    cfg = transformers.DeepseekV4Config(
        vocab_size=256, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=1, head_dim=32, q_lora_rank=32, num_experts_per_tok=2, n_routed_experts=8,
        n_shared_experts=1, o_groups=2, o_lora_rank=32, index_n_heads=2, index_head_dim=16, index_topk=4,
        max_position_embeddings=256, sliding_window=8)
    assert cfg.mlp_layer_types[:4] == ["hash_moe"] * 3 + ["moe"], cfg.mlp_layer_types
    model = transformers.DeepseekV4ForCausalLM(cfg).eval()
    _randomize_zeros(model)
    report = _compile_check(model, (torch.randint(0, 256, (1, 7)),), 1e-4, interpret=True)
    moes = sorted((m for m in report.matches if m.family == "moe"), key=lambda m: m.module)
    assert [m.module for m in moes] == [f"model.layers.{i}.mlp.gate" for i in range(4)], str(report)
    for m in moes:
        assert m.params["activation"] == f"silu_clamped(limit={float(cfg.swiglu_limit)})", m.params
        assert m.params["shared_experts"] == "fused: 1 always-chosen experts of 32", m.params
    assert [m.params["routing"].startswith("a token-id table's experts") for m in moes] == [True] * 3 + [False]
    want = f"kernel: sqrtsoftplus, score-correction bias, top-2, renormalized, x {cfg.routed_scaling_factor:g}"
    assert moes[3].params["routing"] == want and moes[3].params["scoring"] == "sqrtsoftplus", moes[3].params
    assert not [d for d in report.declined if d.family == "moe" and "stacked" in d.reason], str(report)


def test_clamp_limits_are_checked_past_the_limit():
    """A clamped SiLU unit whose limit sits far above what unit-scale random values reach is still told apart
    from plain SiLU, and its limit read exactly: the checks draw values past the largest limit."""
    for limit in (10.0, 50.0):
        report = _compile_check(ClampedMoE(limit), (torch.randn(9, 32),), 1e-5, interpret=True)
        (m,) = [m for m in report.matches if m.family == "moe"]
        assert m.params["activation"] == f"silu_clamped(limit={limit})", m.params


class ClampedMoE(torch.nn.Module):
    """Routed experts stored [E, 2I, H] / [E, H, I] with DeepSeek-V4's clamped SiLU unit (gate and up clamped at
    ``limit``), or plain SiLU experts behind a router whose logits are clamped at ``router_limit`` before the
    softmax: clamps unit-scale random values never reach."""

    def __init__(self, limit=None, router_limit=None, experts=4):
        super().__init__()
        self.limit, self.router_limit = limit, router_limit
        self.router = torch.nn.Linear(32, experts, bias=False)
        self.w1 = torch.nn.Parameter(torch.randn(experts, 32, 32) / 32 ** 0.5)
        self.w2 = torch.nn.Parameter(torch.randn(experts, 32, 16) / 4)

    def forward(self, x):
        logits = self.router(x)
        logits = logits if self.router_limit is None else logits.clamp(max=self.router_limit)
        weights, ids = logits.softmax(-1).topk(2, dim=-1)
        out = torch.zeros_like(x)
        for j in range(2):
            gate, up = torch.bmm(x[:, None], self.w1[ids[:, j]].transpose(1, 2))[:, 0].chunk(2, dim=-1)
            if self.limit is not None:
                gate, up = gate.clamp(max=self.limit), up.clamp(-self.limit, self.limit)
            h = F.silu(gate) * up
            out = out + torch.bmm(h[:, None], self.w2[ids[:, j]].transpose(1, 2))[:, 0] * weights[:, j, None]
        return out


def test_a_clamp_in_the_router_is_checked_past_its_limit():
    """The routing kernel computes no clamp: a router with one keeps its own code (the experts are still fused),
    where a check on logits under the limit took it for a plain softmax router. (Not compared end to end: past the
    limit the clamped logits tie, and which tied expert a top-k picks is the known tie-order difference.)"""
    report = deepfuse.explain(ClampedMoE(router_limit=10.0, experts=8), torch.randn(9, 32), interpret=True)
    (m,) = [m for m in report.matches if m.family == "moe"]
    assert m.params["routing"].startswith("top-k kernel (the router is not one the routing kernel computes"), m.params


def test_unsupported_activation_is_declined_not_approximated():
    report = _compile_check(ReluExperts(), (torch.randn(6, 32),), 1e-5)
    assert not [m for m in report.matches if m.family == "moe"]
    assert any("not the routed-experts computation" in d.reason for d in report.declined), str(report)


class ExpertsLayers(torch.nn.Module):
    """Experts blocks one after another, each with its own router and weights, the activations given: a model's
    layers compiled whole, as one graph."""

    def __init__(self, acts, h=32):
        super().__init__()
        self.blocks, self.acts = torch.nn.ModuleList(StackedExperts(h=h) for _ in acts), acts

    def forward(self, x):
        for block, act in zip(self.blocks, self.acts):
            weights, ids = block.router(x).softmax(-1).topk(block.k, dim=-1)
            x = x + gathered_experts(x, ids, weights, block.w1, block.w2, act)
        return x


def test_layers_computing_the_same_are_checked_once(monkeypatch):
    """The check by running (about 10 s a layer at V2-Lite's shapes on the CPU) runs once for the layers of a graph
    that compute the same function of same-shaped inputs; a layer computing another (GELU, ReLU) is checked on
    its own, and each layer gets its own weights, activation and result."""
    from deepfuse.passes import moe

    runs, check = [], moe._check
    monkeypatch.setattr(moe, "_check", lambda *args: runs.append(1) or check(*args))
    report = _compile_check(ExpertsLayers([F.silu, F.silu, F.gelu, F.silu, F.relu]), (torch.randn(6, 32),), 1e-5)
    moes = [m for m in report.matches if m.family == "moe"]
    assert [m.params["activation"] for m in moes] == ["silu", "silu", "gelu", "silu"], str(report)
    assert len(runs) == 3, len(runs)
    assert [d.reason for d in report.declined if d.family == "moe"] == [
        "the region downstream of the router is not the routed-experts computation (checked on random inputs)"]


def test_atomic_combine_option_reaches_the_kernel():
    cfg = get_config("v3-tiny")
    model = DeepSeekForCausalLM.from_config(cfg, seed=3)
    report = _compile_check(model, (torch.randint(0, cfg.vocab_size, (2, 5)),), 1e-4, interpret=True,
                            deterministic=False)
    moes = [m for m in report.matches if m.family == "moe"]
    assert moes and all(m.params["deterministic"] is False for m in moes)


def test_moe_pass_can_be_switched_off():
    model = DeepSeekForCausalLM.from_config(get_config("tiny"), seed=0)
    report = deepfuse.explain(model, torch.randint(0, 512, (1, 4)), passes=["rms_norm"])
    assert not [m for m in report.matches if m.family == "moe"] and report.matches


class FP8Experts(torch.nn.Module):
    """Routed experts over FP8 weights (``fp8`` True: 128 x 128 blocks read through
    deepfuse::fp8_block_dequantize) whose projections' inputs the model quantizes itself: ``quantize`` names
    which ("both", "x": the first only, "none")."""

    def __init__(self, fp8=True, quantize="both", e=4, h=64, i=32):
        super().__init__()
        import deepfuse.runtime.ops  # noqa: F401  (registers deepfuse::fp8_block_dequantize)
        from deepfuse.runtime.kernels import moe

        self.router = torch.nn.Linear(h, e, bias=False)
        w1, w2 = torch.randn(e, 2 * i, h) / h**0.5, torch.randn(e, h, i) / i**0.5
        if fp8:
            for name, w in (("w1", w1), ("w2", w2)):
                q, s = moe.quantize_experts(w)
                self.register_buffer(f"{name}_q", q)
                self.register_buffer(f"{name}_s", s)
        else:
            self.w1_f, self.w2_f = torch.nn.Parameter(w1), torch.nn.Parameter(w2)
        self.fp8, self.quantize = fp8, quantize

    def forward(self, x):
        from deepfuse.quantize import fp8_fake_quantize

        if self.fp8:
            w1 = torch.ops.deepfuse.fp8_block_dequantize(self.w1_q, self.w1_s, x.dtype)
            w2 = torch.ops.deepfuse.fp8_block_dequantize(self.w2_q, self.w2_s, x.dtype)
        else:
            w1, w2 = self.w1_f, self.w2_f
        weights, ids = self.router(x).softmax(-1).topk(2, dim=-1)
        k = ids.shape[1]
        xs = x.repeat_interleave(k, 0)
        if self.quantize in ("both", "x"):
            xs = fp8_fake_quantize(xs, -1)
        gate, up = torch.bmm(w1[ids.flatten()], xs.unsqueeze(-1)).squeeze(-1).chunk(2, -1)
        h = F.silu(gate) * up
        if self.quantize == "both":
            h = fp8_fake_quantize(h, -1)
        out = torch.bmm(w2[ids.flatten()], h.unsqueeze(-1)).squeeze(-1)
        return (out * weights.flatten()[:, None]).view(x.shape[0], k, -1).sum(1)


@pytest.mark.parametrize("fp8,quantize,want", [
    (True, "both", "activations quantized per row and 128-wide tile (W8A8)"),
    (True, "none", "activations as they are (W8A16)"),
    (True, "x", "not both projections' inputs per row and 128-wide tile"),
    (False, "both", "their weights are not FP8"),
])
def test_fp8_experts_are_matched_by_their_activations_quantization(fp8, quantize, want):
    """Experts whose graph quantizes both projections' inputs run as the W8A8 kernels, those that quantize
    none as W8A16; a graph quantizing one of them, or float weights with quantized activations, is declined
    with the reason (no kernel computes it). Against the graph itself, fp32, through the interpreter."""
    torch.manual_seed(int(torch.randint(0, 1000, ())))
    report = _compile_check(FP8Experts(fp8, quantize), (torch.randn(7, 64),), 1e-4, interpret=True)
    moes = [m for m in report.matches if m.family == "moe"]
    if want.startswith("activations"):
        assert len(moes) == 1 and moes[0].params["expert_weights"].endswith(want), str(report)
    else:
        assert not moes and any(want in d.reason for d in report.declined if d.family == "moe"), str(report)
