"""Decode over a static latent cache (positions as device tensors, the whole preallocated cache attended with a
mask): the same logits as the growing-prefix form, and under deepfuse one compiled graph for every decode step
of a 64-token greedy generation, whose tokens equal eager float32's; compiled block by block, one graph per kind
of block whatever the number of layers."""
import pytest
import torch
from torch._dynamo.utils import counters

import deepfuse
from conftest import rel_err
from deepfuse.models import DeepSeekForCausalLM, get_config
from deepfuse.models.model import generate


def _model(seed=None):
    cfg = get_config("tiny")
    return DeepSeekForCausalLM.from_config(cfg, seed=int(torch.randint(0, 1000, ())) if seed is None else seed), cfg


def test_static_cache_steps_equal_prefix_steps():
    model, cfg = _model()
    prompt = torch.randint(0, cfg.vocab_size, (3, 9))
    steps = torch.randint(0, cfg.vocab_size, (3, 5))
    prefix, static = model.new_cache(3, 20), model.new_cache(3, 20)
    with torch.no_grad():
        outs = [(model(prompt, 0, prefix), model(prompt, torch.tensor(0), static))]
        for i in range(steps.shape[1]):
            outs.append((model(steps[:, i:i + 1], 9 + i, prefix), model(steps[:, i:i + 1], torch.tensor(9 + i), static)))
    for a, b in outs:
        assert rel_err(b, a) < 1e-5
    assert rel_err(static.kv[:, :, :14], prefix.kv[:, :, :14]) < 1e-5  # later layers: rounding of the wider softmax
    assert static.kv[:, :, 14:].abs().sum() == 0  # nothing written past the last position


def test_logits_of_the_last_positions_only():
    """logits_to_keep=N: the last N positions' logits, equal to those rows of the full output, eager and compiled
    by deepfuse; more than the sequence gives every position; a negative count or a float is a clear error."""
    model, cfg = _model()
    prompt = torch.randint(0, cfg.vocab_size, (2, 7))
    with torch.no_grad():
        full = model(prompt, 0, model.new_cache(2, 8))
        last = model(prompt, 0, model.new_cache(2, 8), logits_to_keep=1)
        three = model(prompt, 0, model.new_cache(2, 8), logits_to_keep=3)
        every = model(prompt, 0, model.new_cache(2, 8), logits_to_keep=50)
        compiled = torch.compile(model, backend="deepfuse", options={"interpret": True})
        compiled_last = compiled(prompt, 0, model.new_cache(2, 8), logits_to_keep=1)
    assert last.shape == (2, 1, cfg.vocab_size) and three.shape == (2, 3, cfg.vocab_size)
    assert rel_err(last, full[:, -1:]) < 1e-6 and rel_err(three, full[:, -3:]) < 1e-6
    assert every.shape == full.shape and rel_err(every, full) < 1e-6
    assert rel_err(compiled_last, full[:, -1:]) < 1e-5
    for bad in (-1, 1.0):
        with pytest.raises(ValueError, match="logits_to_keep must be an int >= 0"):
            model(prompt, 0, logits_to_keep=bad)


def test_fp8_cache_stores_each_token_at_its_own_scale():
    """The FP8 latent cache: one fp32 scale per token (its row's amax / 448), the rows round-trip within e4m3's
    grid (2^-4 relative, or half a subnormal step below 2^-6 of the scale), an all-zero row stays zero; static
    and prefix addressing write the same bytes; and a token costs 512 + 4 + 2 * 64 bytes per layer at V2 dims
    in bf16, against 1152 for the bf16 cache."""
    from deepfuse.runtime.latent_cache import FP8, LatentKVCache, LayerCache, dequantize_latent, quantize_latent

    x = torch.randn(2, 5, 96) * torch.logspace(-4, 3, 5)[None, :, None]
    x[1, 2] = 0
    q, s = quantize_latent(x)
    assert q.dtype == FP8 and s.shape == (2, 5, 1)
    assert torch.allclose(s[..., 0], (x.abs().amax(-1) / 448).clamp_min(1e-12 / 448))
    back = dequantize_latent(q, s, torch.float32)
    assert ((back - x).abs() <= torch.maximum(x.abs() * 2 ** -4, s * 2 ** -10)).all() and (back[1, 2] == 0).all()

    v2 = get_config("v2-lite")
    fp8 = LatentKVCache(v2, 1, 2, torch.bfloat16, "cpu", fp8=True)
    assert fp8.bytes_per_token_per_layer() == 644
    assert LatentKVCache(v2, 1, 2, torch.bfloat16, "cpu").bytes_per_token_per_layer() == 1152
    with pytest.raises(ValueError, match="per-token scales"):
        LayerCache(fp8.layers[0].kv, fp8.layers[0].pe)

    model, cfg = _model()
    prompt, step = torch.randint(0, cfg.vocab_size, (3, 6)), torch.randint(0, cfg.vocab_size, (3, 1))
    prefix, static = model.new_cache(3, 10, fp8=True), model.new_cache(3, 10, fp8=True)
    with torch.no_grad():
        outs = [(model(prompt, 0, prefix), model(prompt, torch.tensor(0), static)),
                (model(step, 6, prefix), model(step, torch.tensor(6), static))]
    assert all(rel_err(b, a) < 1e-5 for a, b in outs)
    a, b = prefix.layers[0], static.layers[0]  # the first layer's latent depends on the tokens alone: same bytes
    assert a.kv.dtype == FP8 and torch.equal(a.kv_scale, b.kv_scale)
    assert torch.equal(a.kv.view(torch.uint8), b.kv.view(torch.uint8))
    assert static.layers[0].kv_scale[:, 7:].abs().sum() == 0  # nothing written past the last position


def test_compiled_greedy_generation_is_one_decode_graph_and_equals_eager():
    """64 greedy tokens at batch 1 through the generated kernels (Triton's interpreter): the tokens eager float32
    picks, and two graphs in all (prefill, and one decode step for every context length). Batch 1 keeps the
    interpreter's share of the suite down (118 s against 184 at batch 2); batched decode steps are checked
    against eager in test_static_cache_steps_equal_prefix_steps and the mla pass tests."""
    model, cfg = _model()
    prompt = torch.randint(0, cfg.vocab_size, (1, 7))
    torch._dynamo.reset()
    counters.clear()
    report = deepfuse.Report()
    with torch.no_grad(), deepfuse.collect(report):
        expected = generate(model, prompt, 64)
        compiled = torch.compile(model, backend="deepfuse", options={"interpret": True})
        tokens = generate(model, prompt, 64, forward=compiled, static_cache=True)
    assert torch.equal(tokens, expected)
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    mla = [m for m in report.matches if m.family == "mla"]
    assert len(mla) == 2 * cfg.num_hidden_layers, str(report)
    for m in mla:  # the prefill's causal mask is the kernels' causality; a decode step's mask is read
        assert m.params["mask"] is (m.params["queries"] == 1) and m.params["causal"] is (m.params["queries"] > 1)


def test_block_by_block_compilation_is_one_graph_per_kind_of_block():
    """Regional compilation: each decoder block compiled on its own. A block reads its layer's part of the cache
    and no layer index, so 6 layers give 4 graphs (dense and MoE blocks, prefill and decode), not 6 per step.
    The prefill's causal mask is built inside each block, so the blocks' attention applies causality and reads
    no mask (passed in from outside, it would be data to the block's graph)."""
    cfg = get_config("tiny", num_hidden_layers=6)
    model = DeepSeekForCausalLM.from_config(cfg, seed=int(torch.randint(0, 1000, ())))
    prompt = torch.randint(0, cfg.vocab_size, (2, 5))
    torch._dynamo.reset()
    counters.clear()
    report = deepfuse.Report()
    with torch.no_grad(), deepfuse.collect(report):
        expected = generate(model, prompt, 12)
        for layer in model.model.layers:
            layer.compile(backend="deepfuse", options={"kernels": "reference"})
        tokens = generate(model, prompt, 12, static_cache=True)
    assert torch.equal(tokens, expected)
    assert counters["stats"]["unique_graphs"] == 4, dict(counters["stats"])
    mla = [m for m in report.matches if m.family == "mla"]
    assert {m.params["queries"] for m in mla} == {1, 5}, str(report)
    for m in mla:
        assert m.params["mask"] is (m.params["queries"] == 1) and m.params["causal"] is (m.params["queries"] > 1)


def test_tensor_position_needs_a_cache():
    model, cfg = _model(seed=0)
    with pytest.raises(ValueError, match="preallocated cache"):
        model(torch.zeros(1, 1, dtype=torch.long), torch.tensor(3))


def test_captured_step_rejects_what_it_cannot_capture():
    from deepfuse.runtime.cuda_graph import CapturedStep

    with pytest.raises(ValueError, match="warm-up"):
        CapturedStep(lambda x: x, warmup=0)
    with pytest.raises(ValueError, match="CUDA work"):
        CapturedStep(lambda x: x)(torch.ones(2))
    model = DeepSeekForCausalLM.from_config(get_config("tiny"), seed=0)
    with pytest.raises(ValueError, match="static_cache"):
        generate(model, torch.zeros(1, 3, dtype=torch.long), 2, cuda_graph=True)
