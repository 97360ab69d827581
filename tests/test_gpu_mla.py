"""MLA on the GPU: the generated kernels in bf16/fp16 at V2-Lite attention dims against float64, the pass
on the bundled model and HF DeepseekV2 with the Triton kernels traced in, CUDA graphs over the latent cache."""
import pytest
import torch

import deepfuse
from conftest import rel_err
from deepfuse.models import DeepSeekForCausalLM, get_config
from deepfuse.runtime.kernels import mla

pytestmark = pytest.mark.gpu

V2 = dict(h=16, dn=128, r=64, dv=128, c=512)


def _inputs(b, s, t, dtype, h=16, dn=128, r=64, dv=128, c=512):
    q = torch.randn(b, s, h, dn + r, device="cuda", dtype=dtype)
    latent = torch.randn(b, t, c + r, device="cuda", dtype=dtype)
    w = (torch.randn(h * (dn + dv), c, device="cuda") / c ** 0.5).to(dtype)
    return q[..., :dn], q[..., dn:], latent[..., :c], latent[..., c:], w


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,s,t", [(1, 1, 1), (1, 1, 4097), (64, 1, 1000), (2, 4, 333), (1, 300, 300),
                                   (1, 4096, 4096), (2, 77, 1100), (1, 1, 32768), (8, 1, 20000)])
@pytest.mark.parametrize("path", ["absorbed", "expanded"])
def test_mla_kernels_match_float64(dtype, b, s, t, path):
    """(1, 1, 32768) decodes over 128 splits of 256 rows (mla.decode_splits' cap), (8, 1, 20000) over 40 of
    512 (its bound on a split's rows), the last one 32 rows; each merged by one reduce program per head and
    latent slice."""
    if path == "absorbed" and s * t > 2_000_000:
        pytest.skip("the absorbed path is for short queries")
    inputs = _inputs(b, s, t, dtype)
    scale = 192 ** -0.5
    ref = mla.reference(*(x.double() for x in inputs), scale, True)
    out = mla.mla_attention(*inputs, scale, True, path=path)
    assert out.shape == (b, s, 16, 128) and rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("b,s,t", [(1, 300, 300), (1, 4096, 4096), (2, 77, 1100)], ids=str)
@pytest.mark.parametrize("tile", [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 3)], ids=str)
def test_descriptor_fed_prefill_bf16_on_gpu(b, s, t, tile):
    """The prefill kernel with its key and value tiles through tensor descriptors, compiled for the GPU, in bf16:
    square and chunked causal prefill, a context off the tiles."""
    bm, bn, warps, stages = tile
    inputs = _inputs(b, s, t, torch.bfloat16)
    assert mla._descriptors_fit(inputs[3])  # the rope key: a slice of the latent rows, 1152 bytes apart
    scale = 192 ** -0.5
    ref = mla.reference(*(x.double() for x in inputs), scale, True)
    config = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages, "TMA": True}
    out = mla.mla_attention(*inputs, scale, True, path="expanded", config=config)
    assert rel_err(out, ref) < 1e-2


def test_mla_padding_mask_variable_lengths_bf16():
    b, s, t = 4, 1, 700
    inputs = _inputs(b, s, t, torch.bfloat16)
    lengths = torch.tensor([700, 1, 350, 64], device="cuda")
    mask = (torch.arange(t, device="cuda")[None, :] < lengths[:, None])[:, None, None, :]
    ref = mla.reference(*(x.double() for x in inputs), 0.07, False, mask)
    out = mla.mla_attention(*inputs, 0.07, False, mask)
    assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("b,s,t", [(1, 1, 4097), (64, 1, 1000), (2, 4, 333), (1, 300, 300), (1, 1, 32768)])
@pytest.mark.parametrize("path", ["absorbed", "expanded"])
@pytest.mark.parametrize("as_fp16", [False, True], ids=["bf16-widening", "fp16-widening"])
def test_fp8_latent_kernels_match_float64(b, s, t, path, as_fp16):
    """bf16 queries over an FP8 latent (per-token scales, as the FP8 cache stores it), against float64 over
    the dequantized latent. The rows' sizes span three decades up to an RMS-normed latent's (1): rows ten
    times that gave scores of std ~8, where the expanded path's bf16 keys alone cost 1.0% (1.007e-2 once)."""
    from deepfuse.runtime.latent_cache import dequantize_latent, quantize_latent

    if as_fp16 and path == "expanded":
        pytest.skip("the FP8_AS_FP16 candidate is the absorbed decode kernel's")
    q_nope, q_pe, c_kv, k_pe, w = _inputs(b, s, t, torch.bfloat16)
    kv8, kv_scale = quantize_latent(c_kv * torch.logspace(-3, 0, t, device="cuda")[None, :, None])
    exact = dequantize_latent(kv8, kv_scale.double(), torch.float64)
    ref = mla.reference(q_nope.double(), q_pe.double(), exact, k_pe.double(), w.double(), 192 ** -0.5, True)
    config = {**mla.DECODE_CONFIG, "BLOCK_T": 32, "FP8_AS_FP16": True} if as_fp16 else None
    out = mla.mla_attention(q_nope, q_pe, kv8, k_pe, w, 192 ** -0.5, True, kv_scale=kv_scale, path=path,
                            config=config)
    assert rel_err(out, ref) < 1e-2


def _check_against_float64(out, eager, ref):
    """A prefill and decode steps (``run`` below) against float64, token by token: each within twice bf16 eager's
    error or 5e-2. A bf16 router near a tie can pick another expert than float64 for one token, whose logits
    are then off by far more than rounding (at 5368800 one decode row of three was 0.135 off while the other two
    and eager matched), so up to 1 in 20 prefill tokens and one decode (step, sequence) pair may be outside. A
    wrong kernel misses everywhere; one wrong for one sequence misses at every decode step."""
    outside = []
    for step, (o, e, r) in enumerate(zip(out, eager, ref)):
        for b in range(o.shape[0]):
            for s in range(o.shape[1]):
                err, bound = rel_err(o[b, s], r[b, s]), max(2 * rel_err(e[b, s], r[b, s]), 5e-2)
                if err >= bound:
                    outside.append((step, b, s, round(err, 4), round(bound, 4)))
    prefill = [p for p in outside if p[0] == 0]
    assert len(prefill) <= out[0].shape[0] * out[0].shape[1] // 20 and len(outside) - len(prefill) <= 1, outside
    if outside:
        print(f"(step, sequence, token) outside the bound (router near-ties): {outside}")


def test_bundled_model_over_an_fp8_cache_with_cuda_graphs():
    """Prefill and three decode steps over the FP8 latent cache, CUDA graphs on, against the same weights in
    float64 over an FP8 cache of their own (compared as ``_check_against_float64`` says). The kernels read the
    FP8 rows where eager dequantizes them first."""
    cfg = get_config("v2-tiny")
    model = DeepSeekForCausalLM.from_config(cfg, device="cuda", dtype=torch.bfloat16,
                                            seed=int(torch.randint(0, 1000, ())))
    exact = DeepSeekForCausalLM.from_config(cfg, device="cuda", dtype=torch.float64)
    exact.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    ids = torch.randint(0, cfg.vocab_size, (3, 40), device="cuda")

    def run(m, cache):
        return [m(ids, 0, cache).clone()] + [m(ids[:, i:i + 1], 40 + i, cache).clone() for i in range(3)]

    torch._dynamo.reset()
    report = deepfuse.Report()
    with torch.no_grad(), deepfuse.collect(report):
        ref = run(exact, exact.new_cache(3, 48, fp8=True))
        eager = run(model, model.new_cache(3, 48, fp8=True))
        out = run(torch.compile(model, backend="deepfuse", mode="reduce-overhead"), model.new_cache(3, 48, fp8=True))
    _check_against_float64(out, eager, ref)
    mlas = [m for m in report.matches if m.family == "mla"]
    assert len(mlas) >= 2 * cfg.num_hidden_layers and all("latent_format" in m.params for m in mlas), str(report)


@pytest.mark.parametrize("attn_impl", ["absorb", "naive"])
def test_bundled_model_mla_on_gpu_with_cuda_graphs(attn_impl):
    """Prefill and three decode steps, CUDA graphs on, against the same weights in float64. bf16 eager is
    itself off float64 by a few percent here. deepfuse's prefill expands k and v to bf16 and rounds the
    probabilities to bf16 before P.V (as FlashAttention and HF's SDPA path do), which the absorbed eager
    form does not: at 2de6afb one seed gave 0.040 against absorbed eager's 0.026. The bound is twice
    eager's error or 5e-2, token by token (``_check_against_float64``)."""
    cfg = get_config("v2-tiny")
    model = DeepSeekForCausalLM.from_config(cfg, device="cuda", dtype=torch.bfloat16, attn_impl=attn_impl,
                                            seed=int(torch.randint(0, 1000, ())))
    exact = DeepSeekForCausalLM.from_config(cfg, device="cuda", dtype=torch.float64, attn_impl=attn_impl)
    exact.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    ids = torch.randint(0, cfg.vocab_size, (3, 40), device="cuda")

    def run(m, cache):  # (CUDA graphs reuse their output buffers: each step's logits are copied out)
        return [m(ids, 0, cache).clone()] + [m(ids[:, i:i + 1], 40 + i, cache).clone() for i in range(3)]

    report = deepfuse.Report()
    with torch.no_grad(), deepfuse.collect(report):
        ref = run(exact, exact.new_cache(3, 48))
        eager = run(model, model.new_cache(3, 48))
        out = run(torch.compile(model, backend="deepfuse", mode="reduce-overhead"), model.new_cache(3, 48))
    _check_against_float64(out, eager, ref)
    mlas = [m for m in report.matches if m.family == "mla"]
    assert len(mlas) >= 2 * cfg.num_hidden_layers and all(m.impl == "triton" and m.kernel_file for m in mlas), \
        str(report)


def _v2_tiny_bf16_and_float64():
    """v2-tiny in bf16 (fresh seed), the same weights in float64, a 4x11 prompt; Dynamo reset."""
    cfg = get_config("v2-tiny")
    model = DeepSeekForCausalLM.from_config(cfg, device="cuda", dtype=torch.bfloat16,
                                            seed=int(torch.randint(0, 1000, ())))
    exact = DeepSeekForCausalLM.from_config(cfg, device="cuda", dtype=torch.float64)
    exact.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    torch._dynamo.reset()
    return cfg, model, exact, torch.randint(0, cfg.vocab_size, (4, 11), device="cuda")


def test_static_cache_decode_is_one_cuda_graph():
    """Greedy decode of 40 tokens with mode="reduce-overhead" over the static cache: two compiled graphs
    (prefill, decode), CUDA graphs not skipped. Teacher-forced on eager bf16's tokens, every step's logits stay
    as close to float64 as eager's are (bound: twice eager's error, or 5e-2)."""
    from torch._dynamo.utils import counters

    from deepfuse.models.model import generate

    cfg, model, exact, prompt = _v2_tiny_bf16_and_float64()
    counters.clear()
    with torch.no_grad():
        tokens = generate(model, prompt, 40)
        compiled = torch.compile(model, backend="deepfuse", mode="reduce-overhead")
        fused_tokens = generate(model, prompt, 40, forward=compiled, static_cache=True)
        assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
        assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
        seq = torch.cat([prompt, tokens], dim=1)
        caches = [model.new_cache(4, 51), exact.new_cache(4, 51), model.new_cache(4, 51)]
        for pos in [0] + list(range(11, 50)):  # the prompt, then every generated token in turn
            chunk = seq[:, :11] if pos == 0 else seq[:, pos:pos + 1]
            eager, ref = model(chunk, pos, caches[0]), exact(chunk, pos, caches[1])
            out = compiled(chunk, torch.tensor(pos, device="cuda"), caches[2])
            if pos % 10 == 0:
                assert rel_err(out, ref) < max(2 * rel_err(eager, ref), 5e-2), pos
    agree = int((fused_tokens == tokens).cumprod(dim=1).sum(dim=1).min())
    print(f"greedy tokens equal to eager bf16 before the first divergence: {agree} of 40")


def test_block_by_block_decode_captured_whole():
    """Each decoder block compiled alone (default mode), the decode step captured whole by CapturedStep: every
    block's MLA, MoE and norms fused, one capture per batch size, logits after replays as close to float64 as
    eager bf16's at every position (so the captured inputs are refreshed on each call), and greedy tokens through
    generate(cuda_graph=True).

    Compared per sequence: a bf16 router near a tie can pick another expert than float64 for one token, and
    that row's logits are then off by far more than rounding (at 874f71d, step 16 failed at 0.094 against
    eager's 0.0065 while the steps before it had passed; in the printed logits one row differed, the others
    matched to bf16 rounding). Up to 1 in 20 (step, sequence) pairs may be
    outside the bound; a wrong kernel or a stale captured input misses it everywhere."""
    from deepfuse.models.model import generate
    from deepfuse.runtime.cuda_graph import CapturedStep

    cfg, model, exact, prompt = _v2_tiny_bf16_and_float64()
    report = deepfuse.Report()
    with torch.no_grad():
        tokens = generate(model, prompt, 24)
        with deepfuse.collect(report):
            for layer in model.model.layers:
                layer.compile(backend="deepfuse")
            step = CapturedStep(model)
            seq = torch.cat([prompt, tokens], dim=1)
            caches = [model.new_cache(4, 40), exact.new_cache(4, 40), model.new_cache(4, 40)]
            def eager():  # the model's layers are compiled in place
                return torch.compiler.set_stance("force_eager")

            with eager():
                model(seq[:, :11], 0, caches[0])
            exact(seq[:, :11], 0, caches[1])
            model(seq[:, :11], torch.tensor(0, device="cuda"), caches[2])
            outside = []
            for pos in range(11, 34):
                chunk = seq[:, pos:pos + 1]
                with eager():
                    eager_out = model(chunk, pos, caches[0])
                ref = exact(chunk, pos, caches[1])
                out = step(chunk, torch.tensor(pos, device="cuda"), caches[2]).clone()
                for row in range(seq.shape[0]):
                    err, bound = rel_err(out[row], ref[row]), max(2 * rel_err(eager_out[row], ref[row]), 5e-2)
                    if err >= bound:
                        outside.append((pos, row, round(err, 4), round(bound, 4)))
        assert len(outside) <= 23 * seq.shape[0] // 20, outside
        if outside:
            print(f"(step, sequence) pairs outside the bound (router near-ties): {outside}")
        assert len(step.graphs) == 1
        fused_tokens = generate(model, prompt, 24, static_cache=True, cuda_graph=True)
    families = [m.family for m in report.matches]
    assert families.count("mla") >= cfg.num_hidden_layers and "moe" in families, str(report)
    agree = int((fused_tokens == tokens).cumprod(dim=1).sum(dim=1).min())
    print(f"greedy tokens equal to eager bf16 before the first divergence: {agree} of 24")


def test_hf_deepseek_v2_attention_on_gpu():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.DeepseekV2Config(vocab_size=256, hidden_size=256, intermediate_size=256, num_hidden_layers=1,
                                        num_attention_heads=8, num_key_value_heads=8, kv_lora_rank=64,
                                        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, q_lora_rank=None,
                                        first_k_dense_replace=1)
    model = transformers.DeepseekV2ForCausalLM(cfg).cuda().bfloat16().eval()
    model.config._attn_implementation = "sdpa"  # the SDPA op path (CPU tests see it decomposed)
    ids = torch.randint(0, 256, (2, 33), device="cuda")
    report = deepfuse.Report()
    with torch.no_grad(), deepfuse.collect(report):
        ref = model(ids).logits
        out = torch.compile(model, backend="deepfuse")(ids).logits
    assert rel_err(out, ref) < 3e-2
    assert [m.impl for m in report.matches if m.family == "mla"] == ["triton"], str(report)
