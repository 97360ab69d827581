"""On the GPU: generated kernels compiled for real (bf16 included), autotuning, CUDA graphs."""
import json

import pytest
import torch

import deepfuse
from deepfuse.models import DeepSeekForCausalLM, get_config
from deepfuse.runtime.kernels import rms_norm as kernel
from conftest import fp64_errors, fp64_tokens_outside, rel_err

pytestmark = pytest.mark.gpu


class Norms(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(n) + 0.5)
        self.proj = torch.nn.Linear(n, n, bias=False)

    def norm(self, x):
        dtype = x.dtype
        x = x.float()
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)

    def forward(self, x, residual):
        h = residual + self.proj(x)
        return self.norm(h), h


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_bf16_block_matches_fp64(mode):
    model = Norms(2048).cuda().bfloat16()
    x = torch.randn(300, 2048, device="cuda", dtype=torch.bfloat16)
    r = torch.randn(300, 2048, device="cuda", dtype=torch.bfloat16)
    report = deepfuse.Report()
    with torch.no_grad(), deepfuse.collect(report):
        compiled = torch.compile(model, backend="deepfuse", mode=mode)
        for _ in range(3):  # reduce-overhead records a CUDA graph on a later call, then replays it
            y, h = compiled(x, r)
        ref_y, ref_h = model.double()(x.double(), r.double())
    assert [m.impl for m in report.matches] == ["triton"] and report.matches[0].op == "deepfuse::add_rms_norm"
    assert rel_err(y, ref_y) < 1e-2 and rel_err(h, ref_h) < 1e-2


def test_autotune_result_is_cached_per_gpu_and_bucket():
    x = torch.randn(4096, 2048, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(2048, device="cuda", dtype=torch.bfloat16)
    kernel.launch(x, w, None, 1e-6, True, torch.bfloat16)
    db = json.loads((deepfuse.codegen.cache_dir() / "autotune.json").read_text())
    (key, index), = db.items()
    assert torch.cuda.get_device_name() in key and "|4096|" in key  # then the candidate list's digest
    assert 0 <= index < len(kernel.CONFIGS)


def test_bundled_tiny_model_bf16_on_gpu():
    model = DeepSeekForCausalLM.from_config(get_config("v3-tiny"), device="cuda", dtype=torch.bfloat16, seed=4)
    ids = torch.randint(0, 512, (2, 33), device="cuda")
    report = deepfuse.Report()
    with torch.no_grad(), deepfuse.collect(report):
        out = torch.compile(model, backend="deepfuse")(ids)
    assert {m.family for m in report.matches} == {"moe", "mla", "rms_norm"}
    assert {m.impl for m in report.matches} == {"triton"}
    ours, eager = fp64_errors(model, ids, out)
    assert ours < max(2e-2, 1.5 * eager), (ours, eager)


def test_hf_deepseek_v2_moe_block_is_fused_on_gpu():
    """HF's MoE block (grouped_mm experts) under deepfuse: the experts become the generated kernels."""
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe

    cfg = DeepseekV2Config(hidden_size=512, moe_intermediate_size=256, n_routed_experts=16, num_experts_per_tok=4,
                           n_shared_experts=1, topk_method="greedy")
    cfg._experts_implementation = "grouped_mm"
    block = DeepseekV2Moe(cfg).cuda().bfloat16().eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, p.shape[-1] ** -0.5)
    x = torch.randn(1, 77, 512, device="cuda", dtype=torch.bfloat16)
    report = deepfuse.Report()
    with torch.no_grad(), deepfuse.collect(report):
        out = torch.compile(block, backend="deepfuse")(x)
        ref = block(x)
    moes = [m for m in report.matches if m.family == "moe"]
    assert len(moes) == 1 and moes[0].impl == "triton" and moes[0].params["top_k"] == 4, str(report)
    assert moes[0].params["shared_experts"] == "fused: 1 always-chosen experts of 256", moes[0].params
    assert rel_err(out, ref) < 2e-2
    db = json.loads((deepfuse.codegen.cache_dir() / "autotune.json").read_text())
    assert any("-E16-H512-I256-k4-S1|" in key for key in db)  # tuned at compile time, cached per GPU and bucket


def _one_moe_in_bf16_against_float64(model, x):
    """``model`` compiled by deepfuse in bf16 on the GPU, within twice eager bf16's error of float64 (or 2e-2); its
    one moe match, run by the generated kernels."""
    model, x = model.cuda().eval(), x.cuda()
    with torch.no_grad():
        exact = model.double()(x.double()).float()
        model = model.bfloat16()
        eager = model(x.bfloat16())
        report = deepfuse.Report()
        with deepfuse.collect(report):
            out = torch.compile(model, backend="deepfuse")(x.bfloat16())
    (m,) = [m for m in report.matches if m.family == "moe"]
    assert m.impl == "triton" and rel_err(out, exact) < max(2e-2, 2 * rel_err(eager, exact)), str(report)
    return m


@pytest.mark.parametrize("fused", ["gate first", "up first, transposed"])
def test_shared_mlp_with_gate_and_up_in_one_matmul_on_gpu(fused):
    """Granite's form of the shared MLP (one matmul, its output halved) checked on the GPU (its check's weights
    drawn on the model's device) and run in the experts' launches, against eager bf16 and float64."""
    from test_moe_pass import SharedMLP

    m = _one_moe_in_bf16_against_float64(SharedMLP(fused=fused, shared_inter=32), torch.randn(5, 32))
    assert m.params["shared_experts"] == "fused: 2 always-chosen experts of 16", m.params


def test_routing_weights_scaling_the_input_on_gpu():
    """Llama 4's form (every expert run densely on rows scaled by sigmoid scores, 0 for the unchosen) as the sparse
    launches over the T * k scaled rows, bf16, against float64."""
    from test_moe_pass import InputScaled

    m = _one_moe_in_bf16_against_float64(InputScaled(), torch.randn(9, 32))
    assert m.params["routing_weights"].startswith("scale the experts' input (sigmoid)"), m.params


@pytest.mark.parametrize("interleaved", [True, False])
def test_gpt_oss_experts_on_gpu(interleaved):
    """GPT-OSS's experts' form (biases, interleaved or halved gate/up rows stored [E, H, 2I], clamped SwiGLU) through
    the generated kernels in bf16, against float64 (the clamps' limits crossed: x scaled up)."""
    from test_moe_pass import BiasedExperts

    m = _one_moe_in_bf16_against_float64(BiasedExperts(interleaved=interleaved), 3 * torch.randn(70, 32))
    assert m.params["activation"] == "swiglu_clamped(alpha=1.5, limit=5.0)", m.params


def test_bundled_moe_with_cuda_graphs():
    model = DeepSeekForCausalLM.from_config(get_config("v3-tiny"), device="cuda", dtype=torch.bfloat16, seed=5)
    ids = torch.randint(0, 512, (1, 16), device="cuda")
    with torch.no_grad():
        compiled = torch.compile(model, backend="deepfuse", mode="reduce-overhead")
        for _ in range(3):
            out = compiled(ids).clone()
    outside = fp64_tokens_outside(model, ids, out)  # token by token: a router near-tie once failed the whole
    assert len(outside) <= 1, outside  # output's comparison (H100, 4678a29), passing when rerun


def test_dynamic_shapes_on_gpu():
    """Symbolic token counts: every family's launchers traced with symbolic grids and buffer sizes."""
    model = DeepSeekForCausalLM.from_config(get_config("v3-tiny"), device="cuda", dtype=torch.bfloat16, seed=6)
    report = deepfuse.Report()
    with torch.no_grad(), deepfuse.collect(report), torch._dynamo.config.patch(specialize_float=True):
        compiled = torch.compile(model, backend="deepfuse", dynamic=True)
        for length in (9, 30, 17):
            ids = torch.randint(0, 512, (2, length), device="cuda")
            ours, eager = fp64_errors(model, ids, compiled(ids))
            assert ours < max(2e-2, 1.5 * eager), (length, ours, eager)
    assert {m.family for m in report.matches} == {"moe", "mla", "rms_norm"}, str(report)
