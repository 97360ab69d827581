"""The quantized-matmul kernels compiled for the GPU, in bf16 (which the interpreter cannot check), at
DeepSeek-V2-Lite projection shapes and odd ones, against float64 math on the dequantized operands."""
import pytest
import torch

from conftest import fp64_errors, rel_err
from deepfuse.runtime.kernels import quant

pytestmark = pytest.mark.gpu

MODES = [("fp8-block", True, False), ("fp8-block", True, True), ("fp8-block", False, None),
         ("int8-channel", False, None)]
SHAPES = [(1, 3072, 2048), (16, 2048, 10944), (128, 4096, 512), (4096, 2048, 2048), (333, 1000, 1000), (0, 256, 256)]


@pytest.mark.parametrize("mode", MODES, ids=["fp8-fused-quant", "fp8-prequant", "fp8-weight-only", "int8"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"m{m}n{n}k{k}" for m, n, k in SHAPES])
def test_quant_matmul_bf16_on_gpu(mode, shape):
    fmt, act_quant, pre = mode
    m, n, k = shape
    x = torch.randn(m, k + 8, device="cuda", dtype=torch.bfloat16)
    if m:
        x.view(-1)[torch.randint(0, x.numel(), (m * k // 300 + 1,), device="cuda")] *= 100
    x = x[:, :k]  # non-contiguous rows
    w = torch.randn(n, k, device="cuda") / k ** 0.5
    w.view(-1)[torch.randint(0, n * k, (n * k // 500 + 1,), device="cuda")] *= 100
    wq, scale = quant.quantize_weight(w, fmt)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    out = quant.quant_matmul(x, wq, scale, bias, fmt, act_quant, prequantize=pre)
    assert out.shape == (m, n) and out.dtype == torch.bfloat16
    if m:
        ref = quant.reference(x.double(), wq, scale, bias.double(), fmt, act_quant, compute=torch.float64)
        assert rel_err(out, ref) < 1e-2


def _plain_and_fused(model, x, run=lambda compiled, x: compiled(x)):
    """``model`` under options["quantize"]="fp8-block": (its plain quantized form on x, compiled by Inductor alone;
    what ``run`` makes of the form deepfuse's passes rewrote, given x; the report of that compile)."""
    import deepfuse

    with torch.no_grad():
        ref = torch.compile(model, backend="deepfuse", options={"quantize": "fp8-block", "passes": []})(x)
        torch._dynamo.reset()
        report = deepfuse.Report()
        with deepfuse.collect(report):
            out = run(torch.compile(model, backend="deepfuse", options={"quantize": "fp8-block"}), x)
    return ref, out, report


def _fp8_operands(m, n, k):
    """bf16 activations with outliers, a weight in 128 x 128 FP8 blocks and its scales, a bf16 bias."""
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    x.view(-1)[torch.randint(0, x.numel(), (m * k // 300 + 1,), device="cuda")] *= 100
    w = torch.randn(n, k, device="cuda") / k ** 0.5
    wq, scale = quant.quantize_weight(w, "fp8-block")
    return x, wq, scale, torch.randn(n, device="cuda", dtype=torch.bfloat16)


@pytest.mark.parametrize("cfg", quant.TMA_SMALL_CONFIGS + quant.TMA_LARGE_CONFIGS + quant.RESCALE_CONFIGS,
                         ids=lambda c: f"{c['BLOCK_M']}x{c['BLOCK_N']}/w{c['num_warps']}/s{c['num_stages']}")
@pytest.mark.parametrize("shape", [(4096, 2048, 2048), (333, 1000, 1024), (130, 21888, 2048)],
                         ids=lambda s: "x".join(map(str, s)))
def test_descriptor_fed_fp8_gemm_bf16_on_gpu(cfg, shape):
    """Each tile of the descriptor-fed (TMA) prequantized GEMM, compiled for the GPU, in bf16 with outliers."""
    x, wq, scale, bias = _fp8_operands(*shape)
    xq, _ = quant.prequantize_activations(x)
    assert quant._tma_fits(xq, wq, cfg, quant.DEFAULT_BLOCK)
    out = quant.quant_matmul(x, wq, scale, bias, "fp8-block", True, prequantize=True, config=cfg)
    ref = quant.reference(x.double(), wq, scale, bias.double(), "fp8-block", True, compute=torch.float64)
    assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("cfg", quant.DECODE_SWAP_CONFIGS, ids=lambda c: f"n{c['BLOCK_N']}/s{c['num_stages']}")
@pytest.mark.parametrize("shape", [(1, 3072, 2048), (16, 2048, 10944), (7, 4096, 512), (1, 21888, 2048),
                                   (3, 1000, 1000)], ids=lambda s: "x".join(map(str, s)))
def test_operand_swapped_decode_gemm_bf16_on_gpu(cfg, shape):
    """Each tile of the operand-swapped decode GEMM (weight rows on the FP8 MMA's M side), compiled for the GPU,
    bf16 with outliers, K split as the decode sizes split it."""
    x, wq, scale, bias = _fp8_operands(*shape)
    out = quant.quant_matmul(x, wq, scale, bias, "fp8-block", True, prequantize=False, config=cfg)
    ref = quant.reference(x.double(), wq, scale, bias.double(), "fp8-block", True, compute=torch.float64)
    assert out.shape == shape[:2] and rel_err(out, ref) < 1e-2


def test_fp8_quantization_error_against_bf16():
    """W8A8 block FP8 against the unquantized bf16 product: the error the format itself costs (~3%)."""
    x = torch.randn(256, 2048, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2048, 2048, device="cuda") / 2048 ** 0.5
    wq, scale = quant.quantize_weight(w, "fp8-block")
    out = quant.quant_matmul(x, wq, scale, None, "fp8-block", True)
    assert rel_err(out, x.double() @ w.double().t()) < 0.06


def test_bundled_fp8_model_on_gpu_with_cuda_graphs():
    """The bundled model in DeepSeek-V3's FP8 format, bf16 activations: every FP8 projection and the FP8 routed
    experts run the generated W8A8 kernels, under CUDA graphs. Measured against the same model in float64 beside bf16 eager's error: the
    activation quantization is a step function, so upstream rounding differences (Inductor keeps fused
    intermediates in fp32) move some values one FP8 step, in eager as in compiled code."""
    import deepfuse
    from deepfuse.models import DeepSeekForCausalLM, get_config

    cfg = get_config("v3-small", num_hidden_layers=2,
                     quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]})
    model = DeepSeekForCausalLM.from_config(cfg, device="cuda", dtype=torch.bfloat16, seed=3)
    ids = torch.randint(0, cfg.vocab_size, (2, 33), device="cuda")
    with torch.no_grad():
        ref = model(ids)
        report = deepfuse.Report()
        with deepfuse.collect(report):
            compiled = torch.compile(model, backend="deepfuse", mode="reduce-overhead")
            for _ in range(3):
                out = compiled(ids)
    rows = [m for m in report.matches if m.family == "quant"]
    assert rows and all(m.impl == "triton" for m in rows), str(report)
    # Every projection quantizes its activations, as the model does. Weight-only rows: the MLA kernel's own
    # product of the latent with kv_b_proj's dequantized value half (W_UV, in_features = kv_lora_rank), which
    # the model computes from the dequantized weight without quantizing activations, and so does deepfuse.
    weight_only = [m for m in rows if not m.params["act_quant"]]
    assert all(m.params["in_features"] == cfg.kv_lora_rank for m in weight_only), str(report)
    # v3-small's experts are whole 128-blocks: stored in FP8, run as the W8A8 expert kernels
    moes = [m for m in report.matches if m.family == "moe"]
    # q_a, q_b, kv_a, o and the 3 MLP linears per layer; FP8 experts take an FP8 shared MLP's three linears into
    # their launches (as test_quant_pass.py's CPU form counts them)
    fused_shared = sum(3 for m in moes if m.params.get("shared_experts", "").startswith("fused"))
    assert len(rows) - len(weight_only) == 7 * cfg.num_hidden_layers - fused_shared, str(report)
    assert cfg.fp8_experts and moes and all(m.params["expert_weights"].endswith("(W8A8)") for m in moes), str(report)
    ours, eager = fp64_errors(model, ids, out)
    assert ours < max(3e-2, 1.5 * eager), (ours, eager)
    assert rel_err(ref, out) < 0.2  # the same model, not another one


@pytest.mark.parametrize("fmt", ["fp8-block", "int8-weight"])
def test_quantize_option_on_gpu(fmt):
    """options["quantize"] on a bf16 model: the kernels agree with the plain quantized form compiled by Inductor
    alone (eager's form differs by FP8 steps where Inductor skips a bf16 rounding upstream), and the float
    weights go."""
    import deepfuse
    from deepfuse.quantize import fp8_block_linear, int8_weight_linear

    model = torch.nn.Sequential(torch.nn.Linear(2048, 3072), torch.nn.SiLU(), torch.nn.Linear(3072, 2048, bias=False))
    model = model.cuda().bfloat16()
    x = torch.randn(7, 2048, device="cuda", dtype=torch.bfloat16)
    kernel_fmt = "fp8-block" if fmt == "fp8-block" else "int8-channel"
    form = fp8_block_linear if fmt == "fp8-block" else int8_weight_linear
    with torch.no_grad():
        h = form(x, *quant.quantize_weight(model[0].weight, kernel_fmt), model[0].bias)
        eager = form(torch.nn.functional.silu(h), *quant.quantize_weight(model[2].weight, kernel_fmt), None)
        ref = torch.compile(model, backend="deepfuse", options={"quantize": fmt, "passes": []})(x)
        torch._dynamo.reset()
        report = deepfuse.Report()
        with deepfuse.collect(report):
            out = torch.compile(model, backend="deepfuse", options={"quantize": fmt, "release_float_weights": True})(x)
    assert len([m for m in report.matches if m.family == "quant"]) == 2, str(report)
    assert rel_err(out, ref) < 1e-2 and rel_err(out, eager) < 5e-2
    assert model[0].weight.untyped_storage().nbytes() == 0


def test_layers_of_one_input_share_its_quantization_on_gpu():
    """quant_matmuls in bf16 at a prefill's V2-Lite shapes (q_proj and kv_a_proj_with_mqa of 2048 tokens): each
    output equal to the layer's quant_matmul alone and within bf16 of float64; and compiled (an MLP's gate and up
    at 300 tokens, Inductor launching the kernels), one quant_matmuls for both, right against the plain form."""
    x, w1, s1, _ = _fp8_operands(2048, 3072, 2048)
    w2, s2 = quant.quantize_weight(torch.randn(576, 2048, device="cuda") / 2048 ** 0.5, "fp8-block")
    got = quant.quant_matmuls(x, [w1, w2], [s1, s2], [None, None])
    for y, w, s in zip(got, (w1, w2), (s1, s2)):
        assert torch.equal(y, quant.quant_matmul(x, w, s, None, "fp8-block", True, prequantize=True))
        assert rel_err(y, quant.reference(x.double(), w, s, None, "fp8-block", True, compute=torch.float64)) < 1e-2

    class GatedMLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate, self.up = torch.nn.Linear(2048, 1408, bias=False), torch.nn.Linear(2048, 1408, bias=False)
            self.down = torch.nn.Linear(1408, 2048, bias=False)

        def forward(self, x):
            return self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))

    ref, out, report = _plain_and_fused(GatedMLP().cuda().bfloat16(),
                                        torch.randn(300, 2048, device="cuda", dtype=torch.bfloat16))
    ops = {m.module: m.op for m in report.matches if m.family == "quant"}
    assert ops == {"gate": "deepfuse::quant_matmuls", "up": "deepfuse::quant_matmuls",
                   "down": "deepfuse::quant_matmul"}, str(report)
    assert rel_err(out, ref) < 2e-2  # (an element of the intermediate near an e4m3 boundary may land a step apart)


@pytest.mark.parametrize("tokens", [1, 64, 600])
def test_quantize_option_moe_block_on_gpu(tokens):
    """options["quantize"]="fp8-block" on Hugging Face's DeepseekV2Moe (V2-Lite shape, grouped_mm experts,
    bf16): the routed experts run as the W8A8 FP8 kernels and agree with the same quantized graph compiled by
    Inductor alone (moe pass off); against the unquantized block they differ by what FP8 costs, a few percent."""
    import deepfuse

    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe

    cfg = transformers.DeepseekV2Config(hidden_size=2048, moe_intermediate_size=1408, n_routed_experts=64,
                                        num_experts_per_tok=6, n_shared_experts=2, topk_method="greedy")
    cfg._experts_implementation = "grouped_mm"
    block = DeepseekV2Moe(cfg).cuda().bfloat16().eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, p.shape[-1] ** -0.5)
    x = torch.randn(1, tokens, 2048, device="cuda", dtype=torch.bfloat16)
    opts = {"quantize": "fp8-block", "autotune": False}
    with torch.no_grad():
        plain = block(x)
        ref = torch.compile(block, backend="deepfuse", options={**opts, "passes": ["quant"]})(x)
        torch._dynamo.reset()
        report = deepfuse.Report()
        with deepfuse.collect(report):
            out = torch.compile(block, backend="deepfuse", options=opts)(x)
        torch._dynamo.reset()
    (m,) = [m for m in report.matches if m.family == "moe"]
    assert m.params["expert_weights"].endswith("(W8A8)"), m.params
    err, cost = rel_err(out, ref), rel_err(out, plain)
    print(f"T={tokens}: against the quantized graph {err:.2e}, against bf16 {cost:.2e}")
    assert err < 3e-2 and 2e-2 < cost < 0.12


def test_descriptor_fed_gemm_launched_by_inductor_under_cuda_graphs(monkeypatch):
    """The descriptor-fed GEMM as the only candidate past decode sizes, in a model compiled with
    options["quantize"], then captured as a CUDA graph and replayed: Inductor's code launches it and hands it the
    descriptors' scratch memory, inside the captured graph, and it agrees with the same quantized form compiled by
    Inductor alone."""
    from deepfuse.runtime.cuda_graph import CapturedStep

    monkeypatch.delenv("DEEPFUSE_FP8_TMA", raising=False)  # on by default from compute capability 9
    monkeypatch.setattr(quant, "SMALL_CONFIGS", [])
    monkeypatch.setattr(quant, "SMALL_SPLIT_CONFIGS", [])

    def pointer_fed(*args, **kwargs):
        raise AssertionError("a descriptor-fed tile fell back to the pointer-fed GEMM")
    monkeypatch.setattr(quant, "_launch", pointer_fed)
    model = torch.nn.Sequential(torch.nn.Linear(2048, 3072, bias=False), torch.nn.SiLU(),
                                torch.nn.Linear(3072, 2048, bias=False)).cuda().bfloat16()
    x = torch.randn(100, 2048, device="cuda", dtype=torch.bfloat16)

    ref, (first, compiled), report = _plain_and_fused(model, x, lambda compiled, x: (compiled(x).clone(), compiled))
    with torch.no_grad():
        step = CapturedStep(lambda: compiled(x))
        outs = [first] + [step().clone() for _ in range(3)]
    assert quant.configs_for(100, tma=True) == quant.TMA_SMALL_CONFIGS
    assert len([m for m in report.matches if m.family == "quant"]) == 2, str(report)
    for out in outs:
        assert rel_err(out, ref) < 1e-2
