"""The fused MoE experts kernels against a float64 reference: interpreter on CPU (fp16/fp32), GPU (bf16 too)."""
import pytest
import torch

from deepfuse.runtime.kernels import moe, quant
from conftest import rel_err


def _inputs(t, hidden, inter, experts, k, dtype, device, route="random", gen=None):
    gen = gen or torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    rnd = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    x = rnd(t, hidden).to(device, dtype)
    w_gate_up = (rnd(experts, 2 * inter, hidden) / hidden**0.5).to(device, dtype)
    w_down = (rnd(experts, hidden, inter) / inter**0.5).to(device, dtype)
    if route == "one_expert":  # every token's first choice is expert 0
        ids = torch.stack([torch.randperm(experts - 1, generator=gen)[: k - 1] + 1 for _ in range(t)]) if k > 1 else torch.zeros(t, 0, dtype=torch.long)
        ids = torch.cat([torch.zeros(t, 1, dtype=torch.long), ids], dim=1) if t else torch.zeros(0, k, dtype=torch.long)
    else:
        ids = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(t)]) if t else torch.zeros(0, k, dtype=torch.long)
    weights = torch.rand(t, k, generator=gen).softmax(-1)
    return x, ids.to(device), weights.to(device), w_gate_up, w_down


def _stored_transposed(w: torch.Tensor) -> torch.Tensor:
    """The same values, the last two dims stored the other way round (Llama 4's [E, H, 2I] experts)."""
    return w.transpose(-1, -2).contiguous().transpose(-1, -2)


def _check(t, hidden, inter, experts, k, dtype, device, interpret, route="random", activation="silu", noncontig=False,
           deterministic=True, config=None, shared=0, gated=False, transposed=False, biases=False,
           interleaved=False, ungated=False, stacked=False):
    x, ids, weights, wgu, wd = _inputs(t, hidden, inter, experts, k, dtype, device, route)
    if ungated:  # up [E, I, H] alone (Nemotron-H's experts)
        wgu = wgu[:, :inter].contiguous()
    if "_clamped" in activation:  # gate and up values past the clamps' limit too
        x *= 0.75 * float(activation.split("limit=")[1].rstrip(")"))
    bias = None
    if biases:  # GPT-OSS's per-expert biases, of the size of the projections' outputs
        bias = tuple(torch.randn(experts, n).to(device, dtype) for n in ((1 if ungated else 2) * inter, hidden))
    if noncontig:
        x = torch.cat([x, x], dim=1)[:, ::2]
        assert t == 0 or not x.is_contiguous()
    sh = None
    if shared and stacked:  # shared experts stacked as Inkling stores them: [S, I, H] gate/up, [S, H, I] down
        sh = tuple((torch.randn(*shape) / shape[2] ** 0.5).to(device, dtype)
                   for shape in [(shared, inter, hidden), (shared, inter, hidden), (shared, hidden, inter)])
    elif shared:  # a shared MLP of intermediate shared * inter, as Linear layers store it
        sh = tuple((torch.randn(*shape) / shape[1] ** 0.5).to(device, dtype)
                   for shape in [(shared * inter, hidden), (shared * inter, hidden), (hidden, shared * inter)])
        sh = (None, *sh[1:]) if ungated else sh
    if transposed:  # the routed experts stored the other way round, and the shared MLP as its transposes
        wgu, wd = _stored_transposed(wgu), _stored_transposed(wd)
        sh = None if sh is None else tuple(w if w is None else _stored_transposed(w) for w in sh)
    # a gated shared MLP's per-token factor ([T, 1], as sigmoid(Linear(H, 1)) returns it), in a strided view;
    # stacked shared experts' factors per token and expert ([T, S], Inkling's router's), strided too
    scale = (torch.rand(t, 2 * shared).to(device, dtype)[:, ::2] if stacked
             else torch.rand(t, 2).to(device, dtype)[:, :1]) if gated else None
    out = moe.moe_experts(x, ids, weights, wgu, wd, activation=activation, interpret=interpret,
                          deterministic=deterministic, config=config, shared=sh, shared_scale=scale, biases=bias,
                          interleaved=interleaved, gated=not ungated)
    ref = moe.reference(x.double(), ids, weights.double(), wgu.double(), wd.double(), activation,
                        None if sh is None else tuple(w if w is None else w.double() for w in sh),
                        None if scale is None else scale.double(),
                        None if bias is None else tuple(b.double() for b in bias), interleaved, gated=not ungated)
    assert out.shape == (t, hidden) and out.dtype == dtype
    if t:
        assert torch.isfinite(out).all()
        assert rel_err(out, ref) < {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}[dtype]


CASES = [  # (tokens, hidden, inter, experts, k)
    (1, 64, 32, 8, 2),
    (5, 32, 48, 7, 3),     # expert count and intermediate size off the block sizes
    (33, 64, 32, 16, 1),   # k = 1
    (9, 32, 32, 8, 8),     # k = 8 = every expert
    (0, 32, 32, 4, 2),     # no tokens
    (3, 32, 32, 16, 2),    # most experts get no tokens
]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_interpreted_experts(case, dtype):
    _check(*case, dtype, "cpu", interpret=True)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_interpreted_activations(activation):
    _check(6, 32, 32, 4, 2, torch.float32, "cpu", interpret=True, activation=activation)


@pytest.mark.parametrize("case", [(1, 64, 32, 8, 2), (9, 32, 32, 8, 8), (0, 32, 32, 4, 2), (40, 32, 48, 7, 3)], ids=str)
def test_interpreted_atomic_combine(case):
    _check(*case, torch.float16, "cpu", interpret=True, deterministic=False)


DECODE_CANDIDATES = [c for c in moe.CANDIDATES if c.get("N_FASTEST")]


@pytest.mark.parametrize("config", DECODE_CANDIDATES, ids=lambda c: f"n{c['BLOCK_N']}-d{c['BLOCK_N_DOWN']}-k{c['BLOCK_K']}")
def test_interpreted_decode_tiles(config):
    """The decode candidates (down kernel's own N tile, N-fastest program order) at one and three tokens."""
    _check(1, 64, 48, 8, 3, torch.float32, "cpu", interpret=True, config=config)
    _check(3, 96, 32, 16, 2, torch.float16, "cpu", interpret=True, config=config, deterministic=False)


@pytest.mark.parametrize("config", moe.FUSED_CANDIDATES,
                         ids=lambda c: f"n{c['BLOCK_N']}-h{c['BLOCK_H']}-k{c['BLOCK_K']}-w{c['num_warps']}")
def test_interpreted_fused_experts(config, poisoned_empty):
    """Both projections in one launch (FUSED) at one token: each slot its own row block (the router's ids read
    directly) and aligned ("DIRECT": False); the hidden size off BLOCK_H; with a shared MLP, a gated one, GPT-OSS's
    and Nemotron's expert forms. Past FUSED_MAX_TOKENS the same config runs the two launches."""
    for cfg in (config, {**config, "DIRECT": False}):
        _check(1, 80, 48, 8, 3, torch.float32, "cpu", interpret=True, config=cfg)
        _check(1, 96, 32, 16, 2, torch.float16, "cpu", interpret=True, config=cfg)
        _check(1, 64, 32, 8, 2, torch.float32, "cpu", interpret=True, config=cfg, shared=2)
        _check(1, 64, 32, 8, 2, torch.float16, "cpu", interpret=True, config=cfg, shared=1, gated=True)
        _check(1, 64, 32, 8, 2, torch.float32, "cpu", interpret=True, config=cfg, activation=GPT_OSS,
               transposed=True, biases=True, interleaved=True)
        _check(1, 64, 32, 8, 2, torch.float16, "cpu", interpret=True, config=cfg, ungated=True, shared=1,
               activation="relu2")
    _check(moe.FUSED_MAX_TOKENS + 2, 64, 32, 8, 2, torch.float32, "cpu", interpret=True, config=config, shared=1)


@pytest.mark.parametrize("case,shared", [((5, 64, 32, 8, 2), 2), ((1, 32, 16, 4, 3), 1), ((0, 32, 32, 4, 2), 2),
                                         ((7, 48, 16, 5, 2), 3)], ids=str)
@pytest.mark.parametrize("deterministic", [True, False])
def test_interpreted_shared_experts_in_the_same_launches(case, shared, deterministic):
    """A shared MLP of intermediate S*I as S more experts every token takes with weight 1."""
    _check(*case, torch.float32, "cpu", interpret=True, deterministic=deterministic, shared=shared)
    _check(*case, torch.float16, "cpu", interpret=True, deterministic=deterministic, shared=shared,
           config=DECODE_CANDIDATES[0])


@pytest.mark.parametrize("case,shared", [((5, 64, 32, 8, 2), 2), ((1, 32, 16, 4, 3), 3), ((0, 32, 32, 4, 2), 2),
                                         ((40, 32, 16, 8, 4), 2)], ids=str)
def test_interpreted_stacked_shared_experts(case, shared, poisoned_empty):
    """Shared experts stacked [S, I, H] / [S, H, I] (Inkling's), each taken by every token with its own factor
    from a [T, S] view: one token (its slots read directly), a few (the single-program align), more (the parallel
    one); no tokens; stored transposed; the one-launch form at one token; unweighted too."""
    _check(*case, torch.float32, "cpu", interpret=True, shared=shared, stacked=True, gated=True)
    _check(*case, torch.float16, "cpu", interpret=True, shared=shared, stacked=True, gated=True, transposed=True,
           config=DECODE_CANDIDATES[0], deterministic=False)
    _check(*case, torch.float32, "cpu", interpret=True, shared=shared, stacked=True,
           config=moe.FUSED_CANDIDATES[0] if case[0] == 1 else None)


@pytest.mark.parametrize("case,shared", [((5, 64, 32, 8, 2), 2), ((1, 32, 16, 4, 3), 1), ((0, 32, 32, 4, 2), 1)],
                         ids=str)
@pytest.mark.parametrize("deterministic", [True, False])
def test_interpreted_gated_shared_experts(case, shared, deterministic):
    """A shared MLP whose output each token scales by its own factor (Qwen-MoE's sigmoid gate): the shared
    slots take that factor as their weight in the down kernel."""
    _check(*case, torch.float32, "cpu", interpret=True, deterministic=deterministic, shared=shared, gated=True)
    _check(*case, torch.float16, "cpu", interpret=True, deterministic=deterministic, shared=shared, gated=True,
           config=DECODE_CANDIDATES[0])


GPT_OSS = moe.clamped_swiglu(1.702, 7.0)


@pytest.mark.parametrize("case", [(1, 64, 32, 8, 2), (7, 48, 16, 5, 3), (33, 64, 32, 16, 4), (0, 32, 32, 4, 2)],
                         ids=str)
def test_interpreted_gpt_oss_experts(case):
    """GPT-OSS's experts: stored [E, H, 2I] with gate and up rows interleaved, a bias on each projection, the
    clamped SwiGLU (values past its limits included)."""
    gpt_oss = dict(activation=GPT_OSS, transposed=True, biases=True, interleaved=True)
    _check(*case, torch.float32, "cpu", interpret=True, **gpt_oss)
    _check(*case, torch.float16, "cpu", interpret=True, config=DECODE_CANDIDATES[0], deterministic=False, **gpt_oss)
    _check(*case, torch.float32, "cpu", interpret=True, biases=True)  # the parts one at a time
    _check(*case, torch.float32, "cpu", interpret=True, interleaved=True)
    _check(*case, torch.float32, "cpu", interpret=True, activation=GPT_OSS)
    _check(*case, torch.float32, "cpu", interpret=True, activation=moe.clamped_silu(3.0), shared=1)  # DeepSeek-V4's
    _check(*case, torch.float32, "cpu", interpret=True, activation=moe.clamped_silu_output(3.0), shared=1)  # Step-3.7's


def test_interleaved_columns_stored_contiguous_are_read_as_one_tile(monkeypatch):
    """GPT-OSS's [E, H, 2I] gate/up (interleaved, contiguous along the rows of the [E, 2I, H] view): one
    [BLOCK_K, 2 BLOCK_N] tile and one dot per K step, split into gate and up after the loop; interleaved rows stored
    [E, 2I, H] keep the two tiles (each row contiguous along K already)."""
    seen = []
    real = moe.kernels_for
    monkeypatch.setattr(moe, "kernels_for", lambda *a, **kw: ("paired" in kw and seen.append(kw["paired"]))
                        or real(*a, **kw))  # (the align's calls name no experts' form)
    _check(5, 32, 16, 4, 2, torch.float32, "cpu", interpret=True, interleaved=True, transposed=True)
    _check(5, 32, 16, 4, 2, torch.float32, "cpu", interpret=True, interleaved=True)
    assert seen == [True, False]
    src = open(real(torch.float32, "silu", paired=True).path).read()
    gate_up = src[src.index("def moe_gate_up_act_kernel"):src.index("def moe_down_weighted_kernel")]
    assert gate_up.count("tl.dot(") == 1 and "tl.split(tl.reshape(acc_pair, (BLOCK_M, BLOCK_N, 2)))" in gate_up
    with pytest.raises(ValueError, match="paired"):
        real(torch.float32, "silu", shared=True, paired=True)


@pytest.mark.parametrize("case", [(1, 64, 32, 8, 2), (7, 48, 16, 5, 3), (33, 64, 32, 16, 1), (0, 32, 32, 4, 2)],
                         ids=str)
def test_interpreted_ungated_experts(case):
    """Ungated experts, down(relu(up(x))^2) (Nemotron-H's): the up rows alone, no gate accumulator; with an
    ungated shared MLP in the same launches, stored transposed, with biases, and the other activations."""
    ungated = dict(activation="relu2", ungated=True)
    _check(*case, torch.float32, "cpu", interpret=True, **ungated)
    _check(*case, torch.float16, "cpu", interpret=True, config=DECODE_CANDIDATES[0], deterministic=False, shared=2,
           **ungated)
    _check(*case, torch.float32, "cpu", interpret=True, transposed=True, shared=1, gated=True, **ungated)
    _check(*case, torch.float32, "cpu", interpret=True, biases=True, **ungated)
    _check(*case, torch.float32, "cpu", interpret=True, activation="gelu", ungated=True)


def test_ungated_experts_source_has_no_gate():
    """The generated ungated kernel computes what it says: no gate tile loaded, one accumulator."""
    source = moe.kernels_for(torch.float16, "relu2", gated=False).path.read_text()
    assert "acc_gate" not in source and "g_ptrs" not in source and "ungated" in source
    assert "glu = tl.maximum(up, 0.0) * tl.maximum(up, 0.0)" in source
    with pytest.raises(ValueError, match="ungated"):
        moe.kernels_for(torch.float16, moe.clamped_silu(7.0), gated=False)


def test_clamped_swiglu_is_what_gpt_oss_computes():
    """``moe.glu`` for the clamped SwiGLU against transformers' own GptOssExperts._apply_gate."""
    gpt_oss = pytest.importorskip("transformers.models.gpt_oss.modeling_gpt_oss")
    config = pytest.importorskip("transformers").GptOssConfig(hidden_size=8, intermediate_size=8, num_local_experts=2)
    experts = gpt_oss.GptOssExperts(config)
    both = torch.randn(5, 16, dtype=torch.float64) * 6
    want = experts._apply_gate(both)
    got = moe.glu(moe.clamped_swiglu(experts.alpha, experts.limit), both[:, 0::2], both[:, 1::2])
    assert torch.equal(got, want)


def test_clamped_silu_is_what_deepseek_v4_computes():
    """``moe.glu`` for the clamped SiLU unit against transformers' own DeepseekV4Experts._apply_gate."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "DeepseekV4Config"):
        pytest.skip("this transformers has no DeepseekV4")
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4Experts

    experts = DeepseekV4Experts(transformers.DeepseekV4Config(hidden_size=8, moe_intermediate_size=8,
                                                              n_routed_experts=2))
    both = torch.randn(5, 16, dtype=torch.float64) * 12
    got = moe.glu(moe.clamped_silu(experts.limit), *both.chunk(2, dim=-1))
    assert torch.equal(got, experts._apply_gate(both))


def test_clamped_silu_output_is_what_step3p7_computes():
    """``moe.glu`` for the SiLU clamped after it (Step-3.7-Flash's) against transformers' own
    Step3p7Experts._apply_gate, and unlike DeepSeek-V4's unit, which clamps the gate before the SiLU."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Step3p7TextConfig"):
        pytest.skip("this transformers has no Step3p7")
    from transformers.models.step3p7.modeling_step3p7 import Step3p7Experts

    config = transformers.Step3p7TextConfig(hidden_size=8, moe_intermediate_size=8, n_routed_experts=2)
    experts = Step3p7Experts(config, swiglu_limit=7.0)
    both = torch.randn(5, 16, dtype=torch.float64) * 12
    got = moe.glu(moe.clamped_silu_output(7.0), *both.chunk(2, dim=-1))
    assert torch.equal(got, experts._apply_gate(both))
    assert not torch.equal(got, moe.glu(moe.clamped_silu(7.0), *both.chunk(2, dim=-1)))


def test_bad_biases_are_clear_errors():
    x, ids, w, wgu, wd = _inputs(2, 32, 16, 4, 2, torch.float32, "cpu")
    with pytest.raises(ValueError, match="expert biases must be"):
        moe.moe_experts(x, ids, w, wgu, wd, interpret=True, biases=(torch.zeros(4, 16), torch.zeros(4, 32)))
    with pytest.raises(ValueError, match="unsupported activation"):
        moe.moe_experts(x, ids, w, wgu, wd, activation="swiglu_clamped(alpha=1.7)", interpret=True)


class _Copies(torch.utils._python_dispatch.TorchDispatchMode):
    """The clones (``.contiguous()`` of a strided tensor) of ``numels`` elements: copies of a weight. (The
    interpreter's own write-back of the kernels' arguments is a ``copy_``, not counted.)"""

    def __init__(self, numels):
        super().__init__()
        self.numels, self.seen = set(numels), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._opname == "clone" and out.numel() in self.numels:
            self.seen.append(func._opname)
        return out


@pytest.mark.parametrize("shared", [0, 2])
@pytest.mark.parametrize("case", [(1, 64, 32, 8, 2), (7, 48, 16, 5, 3)], ids=str)
def test_interpreted_weights_stored_transposed(case, shared):
    """Experts stored [E, H, 2I] / [E, I, H] (Llama 4) and a shared MLP stored as its transposes: read through
    their strides, the same result, and no weight copied on the way (a copy would move every expert's bytes twice
    per call)."""
    _check(*case, torch.float32, "cpu", interpret=True, shared=shared, transposed=True)
    _check(*case, torch.float16, "cpu", interpret=True, shared=shared, transposed=True, config=DECODE_CANDIDATES[0],
           deterministic=False)
    t, hidden, inter, experts, k = case
    x, ids, weights, wgu, wd = _inputs(t, hidden, inter, experts, k, torch.float32, "cpu")
    sh = tuple(_stored_transposed(torch.randn(*shape)) for shape in
               [(shared * inter, hidden), (shared * inter, hidden), (hidden, shared * inter)]) if shared else None
    wgu, wd = _stored_transposed(wgu), _stored_transposed(wd)
    with _Copies([w.numel() for w in (wgu, wd, *(sh or ()))]) as copies:
        moe.moe_experts(x, ids, weights, wgu, wd, interpret=True, shared=sh)
    assert copies.seen == []


def _check_fp8(t, hidden, inter, experts, k, dtype, device, interpret, route="random", deterministic=True,
               outliers=False, config=None, act_quant=True, shared=0, transposed=False):
    """FP8 experts (weights quantized in 128 x 128 blocks, activations per row and 128-wide tile in the
    kernels), with ``shared`` FP8 shared experts in the same launches, against the same quantization written
    out in float64; and, as a bound on what quantization costs, against the float weights."""
    x, ids, weights, wgu, wd = _inputs(t, hidden, inter, experts, k, dtype, device, route)
    sh = sh_q = sh_s = None
    if shared:  # a shared MLP of intermediate shared * inter, as FP8 Linear layers store it
        sh = tuple((torch.randn(*shape) / shape[1] ** 0.5).to(device, dtype)
                   for shape in [(shared * inter, hidden), (shared * inter, hidden), (hidden, shared * inter)])
        parts = [quant.quantize_weight(w, "fp8-block") for w in sh]
        sh_q, sh_s = tuple(q for q, _ in parts), tuple(s_ for _, s_ in parts)
    if outliers:  # a few values 100x the rest, in the activations and in some weight blocks
        if dtype == torch.float16:  # an activation outlier meeting a weight outlier must not overflow fp16
            x /= 16
        x.view(-1)[:: 97] *= 100
        wgu.view(-1)[:: 1013] *= 100
        wd.view(-1)[:: 1009] *= 100
    (q1, s1), (q2, s2) = moe.quantize_experts(wgu), moe.quantize_experts(wd)
    if transposed:  # the FP8 experts and their scale grids stored the other way round
        q1, s1, q2, s2 = (_stored_transposed(w) for w in (q1, s1, q2, s2))
    out = moe.moe_experts(x, ids, weights, q1, q2, interpret=interpret, deterministic=deterministic,
                          weight_scales=(s1, s2), config=config, act_quant=act_quant, shared=sh_q, shared_scales=sh_s)
    assert out.shape == (t, hidden) and out.dtype == dtype
    if not t:
        return
    want = moe.reference_fp8(x, ids, weights, q1, q2, (s1, s2), act_quant=act_quant, shared=sh_q, shared_scales=sh_s)
    assert torch.isfinite(out).all()
    tol = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]
    if act_quant:
        # The kernel's activation scales are fp32, the reference's float64: a value within an ulp of an e4m3
        # rounding boundary rounds the other way now and then. In fp32 the error is ~1e-7 otherwise, and one such
        # step reached 2.3e-4 in 600 runs of (9, 128, 128, 8, 8), and 1.2e-3 once in a suite run (a large
        # intermediate value's step); a wrong or missing scale is off by 1e-2 and more.
        tol = max(tol, 2e-3)
    if outliers and act_quant:
        # The kernel's intermediate and the float64 one differ by rounding, and now and then an outlier crosses an
        # e4m3 rounding boundary: one FP8 step of a 100x value (once 2.3e-3 in fp32). Unquantized activations
        # miss by 3e-2, a wrong scale by far more.
        tol = max(tol, 5e-3 if dtype == torch.float32 else 1e-2)
    assert rel_err(out, want) < tol
    exact = moe.reference(x.double(), ids, weights.double(), wgu.double(), wd.double(),
                          shared=None if sh is None else tuple(w.double() for w in sh))
    # two e4m3 roundings of each operand pair: a few percent; with outliers the tiles they share lose most of
    # their other values' precision (0.20 seen once in fp16 with the intermediate quantized too, PREQUANT)
    assert rel_err(out, exact) < (0.3 if outliers else 0.15)


FP8_CASES = [  # (tokens, hidden, inter, experts, k)
    (5, 256, 128, 4, 2),
    (3, 200, 72, 5, 3),    # hidden and intermediate off the 128 blocks: ragged last scale blocks
    (9, 128, 128, 8, 8),   # k = 8 = every expert
    (0, 128, 128, 4, 2),   # no tokens
]


# W8A8 with the activations quantized once: x by the pre-kernel, the intermediate by the gate/up epilogue
PREQUANT = {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128, "PREQUANT": True, "num_warps": 4, "num_stages": 3}
# the same with each program's 128 intermediate columns computed as two column tiles of 64
PREQUANT_SPLIT = {**PREQUANT, "BLOCK_N": 64, "SPLIT_N": 2}
# W8A8 with the products transposed (the weight tiles on the FP8 MMA's M side)
SWAP_AB = next(c for c in moe.FP8_CANDIDATES if c.get("SWAP_AB"))
FP8_FORMS = {"w8a8": (True, None), "w8a8-prequant": (True, PREQUANT), "w8a8-prequant-split": (True, PREQUANT_SPLIT),
             "w8a8-swap": (True, SWAP_AB), "w8a16": (False, None)}


@pytest.mark.parametrize("case", FP8_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("form", FP8_FORMS)
def test_interpreted_fp8_experts_equal_their_float64_form(case, dtype, form):
    act_quant, config = FP8_FORMS[form]
    _check_fp8(*case, dtype, "cpu", interpret=True, act_quant=act_quant, config=config)


@pytest.mark.parametrize("form", FP8_FORMS)
def test_interpreted_fp8_experts_with_fp8_shared_experts(form):
    """An FP8 shared MLP (intermediate 2 x 128, ragged hidden) in the FP8 routed experts' launches."""
    act_quant, config = FP8_FORMS[form]
    _check_fp8(5, 200, 128, 5, 3, torch.float16, "cpu", interpret=True, act_quant=act_quant, config=config, shared=2)


def test_interpreted_one_token_reads_the_router_ids_directly(monkeypatch):
    """At one token no align runs (it would fail here): each slot is its own row block, its expert read from
    the router's ids or, past them, a shared expert. Every form at T=1: float with plain, shared and gated
    shared experts, the atomic combine, FP8 W8A8 (in-loop and prequantized), W8A16 and FP8 shared experts."""
    def no_align(*args, **kwargs):
        raise AssertionError("align ran at one token")

    monkeypatch.setattr(moe, "align", no_align)
    monkeypatch.setattr(moe, "align_fused", no_align)
    _check(1, 64, 32, 8, 3, torch.float32, "cpu", interpret=True)
    _check(1, 64, 32, 8, 3, torch.float16, "cpu", interpret=True, shared=2, deterministic=False)
    _check(1, 48, 16, 5, 2, torch.float32, "cpu", interpret=True, shared=1, gated=True)
    _check_fp8(1, 200, 128, 5, 3, torch.float16, "cpu", interpret=True, shared=2)
    _check_fp8(1, 256, 128, 4, 2, torch.float16, "cpu", interpret=True, config=PREQUANT, deterministic=False)
    _check_fp8(1, 256, 128, 4, 4, torch.float32, "cpu", interpret=True, act_quant=False)
    _check_fp8(1, 200, 128, 5, 3, torch.float16, "cpu", interpret=True, config=SWAP_AB, shared=2)
    _check_fp8(1, 256, 128, 4, 2, torch.float32, "cpu", interpret=True, act_quant=False, config=SWAP_AB)
    _check(1, 64, 32, 8, 3, torch.float32, "cpu", interpret=True, config=SWAP_AB)  # float experts: not swapped


def test_interpreted_one_token_aligned_on_request(monkeypatch):
    """``"DIRECT": False`` in the tile config aligns even one token (what bench/moe_fp8.py compares against)."""
    calls = []
    real = moe.align_fused

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(moe, "align_fused", counted)
    _check(1, 64, 32, 8, 3, torch.float16, "cpu", interpret=True, shared=2,
           config={**DECODE_CANDIDATES[0], "DIRECT": False})
    assert calls


def test_interpreted_prefill_sizes_align_in_parallel(monkeypatch):
    """Past ALIGN_FUSED_MAX_SLOTS the experts take align_parallel's segments (here past 16 slots, in chunks of 16):
    routed alone, with shared experts, all to one expert, FP8."""
    calls = []
    real = moe.align_parallel

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(moe, "ALIGN_FUSED_MAX_SLOTS", 16)
    monkeypatch.setattr(moe, "ALIGN_CHUNK_SLOTS", 16)
    monkeypatch.setattr(moe, "align_parallel", counted)
    _check(40, 32, 48, 7, 3, torch.float32, "cpu", interpret=True)
    _check(33, 64, 32, 8, 2, torch.float16, "cpu", interpret=True, shared=2, gated=True, deterministic=False)
    _check(37, 64, 32, 8, 3, torch.float16, "cpu", interpret=True, route="one_expert")
    _check_fp8(9, 256, 128, 4, 2, torch.float16, "cpu", interpret=True)
    assert len(calls) == 4


@pytest.mark.parametrize("form", FP8_FORMS)
def test_interpreted_fp8_experts_stored_transposed(form):
    """FP8 experts and their block scales stored [E, H, 2I] / [E, I, H], read through their strides."""
    act_quant, config = FP8_FORMS[form]
    _check_fp8(3, 256, 128, 4, 2, torch.float16, "cpu", interpret=True, act_quant=act_quant, config=config,
               transposed=True)


@pytest.mark.parametrize("form", ["w8a8", "w8a8-prequant-split", "w8a16"])
def test_interpreted_fp8_experts_up_rows_inside_a_scale_block(form):
    """Intermediate 192 (1.5 scale blocks): the up rows begin halfway into a 128-row block, so a 64-column tile
    still lies in one block (one scalar weight scale per K tile: UNIFORM_W_SCALE) though the intermediate is not
    whole blocks."""
    act_quant, config = FP8_FORMS[form]
    config = {**(config or {"BLOCK_M": 16, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}), "BLOCK_N": 64}
    _check_fp8(4, 256, 192, 4, 2, torch.float16, "cpu", interpret=True, act_quant=act_quant, config=config)


def test_interpreted_fp8_experts_edges():
    """Outliers per block, every token's first choice one expert, the atomic combine, a decode tile."""
    _check_fp8(6, 256, 128, 4, 2, torch.float32, "cpu", interpret=True, outliers=True)
    _check_fp8(7, 128, 128, 6, 2, torch.float16, "cpu", interpret=True, route="one_expert", deterministic=False)
    _check_fp8(1, 256, 256, 8, 2, torch.float16, "cpu", interpret=True, config=DECODE_CANDIDATES[0])
    _check_fp8(6, 256, 128, 4, 2, torch.float16, "cpu", interpret=True, outliers=True, act_quant=False,
               deterministic=False)
    _check_fp8(6, 256, 128, 4, 2, torch.float16, "cpu", interpret=True, outliers=True, config=PREQUANT,
               route="one_expert", deterministic=False)


def test_fp8_experts_misuse_is_a_clear_error():
    x, ids, weights, wgu, wd = _inputs(3, 128, 128, 4, 2, torch.float32, "cpu", "random")
    (q1, s1), (q2, s2) = moe.quantize_experts(wgu), moe.quantize_experts(wd)
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        moe.moe_experts(x, ids, weights, wgu, wd, interpret=True, weight_scales=(s1, s2))
    with pytest.raises(ValueError, match="one per 128 x 128 block"):
        moe.moe_experts(x, ids, weights, q1, q2, interpret=True, weight_scales=(s1, s1))
    sh = (torch.randn(128, 128), torch.randn(128, 128), torch.randn(128, 128))
    sh_parts = [quant.quantize_weight(w, "fp8-block") for w in sh]
    sh_q, sh_s = tuple(q for q, _ in sh_parts), tuple(s_ for _, s_ in sh_parts)
    with pytest.raises(ValueError, match="pass their shared_scales"):
        moe.moe_experts(x, ids, weights, q1, q2, interpret=True, weight_scales=(s1, s2), shared=sh_q)
    with pytest.raises(ValueError, match="shared_scales without FP8 routed experts"):
        moe.moe_experts(x, ids, weights, wgu, wd, interpret=True, shared=sh, shared_scales=sh_s)
    with pytest.raises(TypeError, match="FP8 shared experts must be float8_e4m3fn"):
        moe.moe_experts(x, ids, weights, q1, q2, interpret=True, weight_scales=(s1, s2), shared=sh, shared_scales=sh_s)
    with pytest.raises(ValueError, match=r"PREQUANT takes BLOCK_N \* SPLIT_N = 128"):
        moe.moe_experts(x, ids, weights, q1, q2, interpret=True, weight_scales=(s1, s2),
                        config={**PREQUANT, "BLOCK_N": 64})
    with pytest.raises(ValueError, match=r"PREQUANT takes BLOCK_N \* SPLIT_N = 128"):
        moe.moe_experts(x, ids, weights, q1, q2, interpret=True, weight_scales=(s1, s2),
                        config={**PREQUANT_SPLIT, "SPLIT_N": 4})


def test_shared_scale_misuse_is_a_clear_error():
    x, ids, weights, wgu, wd = _inputs(3, 32, 16, 4, 2, torch.float32, "cpu", "random")
    sh = (torch.randn(16, 32), torch.randn(16, 32), torch.randn(32, 16))
    with pytest.raises(ValueError, match="without shared expert weights"):
        moe.moe_experts(x, ids, weights, wgu, wd, interpret=True, shared_scale=torch.rand(3))
    with pytest.raises(ValueError, match=r"shared_scale must be \[tokens\]"):
        moe.moe_experts(x, ids, weights, wgu, wd, interpret=True, shared=sh, shared_scale=torch.rand(3, 2))
    stacked = (torch.randn(2, 16, 32), torch.randn(2, 16, 32), torch.randn(2, 32, 16))
    with pytest.raises(ValueError, match=r"or \[tokens, 2\] \(one per stacked shared expert\)"):
        moe.moe_experts(x, ids, weights, wgu, wd, interpret=True, shared=stacked, shared_scale=torch.rand(3, 3))
    with pytest.raises(ValueError, match=r"not gate/up \[S, I, H\] and down \[S, H, I\]"):
        moe.moe_experts(x, ids, weights, wgu, wd, interpret=True, shared=stacked[:2] + (stacked[2][:, :, :8],))


@pytest.mark.parametrize("shared", [0, 2])
def test_interpreted_routing_outputs_taken_as_given(shared):
    """int32 ids and fp16 weights in a non-contiguous [T, k] view are read as they are (no cast launches),
    with shared experts' slots weighted 1 by the down kernel itself."""
    t, hidden, inter, experts, k = 6, 32, 16, 8, 3
    x, ids, weights, wgu, wd = _inputs(t, hidden, inter, experts, k, torch.float32, "cpu")
    weights_t = torch.empty(k, t, dtype=torch.float16).copy_(weights.t()).t()  # [T, k], strides (1, T)
    assert not weights_t.is_contiguous()
    sh = None
    if shared:
        sh = tuple(torch.randn(*shape) / shape[1] ** 0.5
                   for shape in [(shared * inter, hidden), (shared * inter, hidden), (hidden, shared * inter)])
    out = moe.moe_experts(x, ids.to(torch.int32), weights_t, wgu, wd, interpret=True, shared=sh)
    ref = moe.reference(x.double(), ids, weights_t.double(), wgu.double(), wd.double(), "silu",
                        None if sh is None else tuple(w.double() for w in sh))
    assert rel_err(out, ref) < 1e-4


def test_interpreted_all_tokens_to_one_expert_and_noncontiguous_input():
    _check(40, 32, 32, 8, 2, torch.float16, "cpu", interpret=True, route="one_expert", noncontig=True)


@pytest.mark.parametrize("t,k,e,bm", [(4, 2, 5, 4), (1, 6, 64, 16), (70, 3, 7, 16), (0, 2, 4, 16), (300, 2, 3, 32)])
def test_fused_align_kernel_equals_torch_align(t, k, e, bm):
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(t)]) if t else torch.zeros(0, k, dtype=torch.long)
    got = moe.align_fused(ids, e, bm, interpret=True)
    want = moe.align(ids, e, bm)
    used = int(want[2])
    assert int(got[2]) == used
    assert torch.equal(got[0][:used], want[0][:used])  # stable order within each expert, padding marked
    assert torch.equal(got[0][used:], want[0][used:])
    assert torch.equal(got[1][: used // bm], want[1][: used // bm])


@pytest.mark.parametrize("t,k,e,shared,bm", [(4, 2, 5, 2, 4), (1, 6, 64, 2, 16), (33, 3, 7, 1, 16), (0, 2, 4, 1, 16)])
def test_fused_align_makes_the_shared_slots_itself(t, k, e, shared, bm):
    """With shared experts the kernel reads only the routed ids: the same as aligning every token's routed ids
    followed by the shared ones."""
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(t)]) if t else torch.zeros(0, k, dtype=torch.long)
    got = moe.align_fused(ids, e + shared, bm, interpret=True, shared=shared)
    want = moe.align(torch.cat([ids, torch.arange(e, e + shared).expand(t, shared)], dim=1), e + shared, bm)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("t,k,e,shared,bm,chunk", [
    (4, 2, 5, 2, 4, 16),      # a handful of slots, one chunk
    (70, 3, 7, 0, 16, 16),    # 14 chunks, no shared experts
    (150, 6, 64, 2, 16, 32),  # V2-Lite's routing: 29 chunks, more than CHUNK_ROWS chunk rows a step
    (33, 3, 7, 1, 16, 96),    # chunks of 96 (3 steps of SLOT_CHUNK), 99 routed slots: a 3-slot last chunk
    (64, 2, 4, 3, 32, 16),    # slots exactly 8 chunks (a ninth, empty, program), every expert padded
    (0, 2, 4, 1, 16, 16),     # no tokens: the one program writes the padding and the owners alone
    (0, 5, 21, 2, 16, 32),    # no tokens, two shared experts
    (1, 6, 64, 2, 16, 16),
], ids=str)
@pytest.mark.parametrize("route", ["random", "one_expert"])
def test_parallel_align_equals_torch_align(t, k, e, shared, bm, chunk, route):
    """align_parallel, its slots split over programs (CHUNK_SLOTS ``chunk``): the alignment of every token's routed ids
    followed by its shared ones, stable within each expert (``_same_alignment``)."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    ids = (torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)]) if t
           else torch.zeros(0, k, dtype=torch.long))
    if route == "one_expert" and t:
        ids[:, 0] = e - 1  # every token's first choice: one expert's segment spans every chunk
        ids[:, 1:] = torch.stack([torch.randperm(e - 1, generator=gen)[: k - 1] for _ in range(t)])
    got = moe.align_parallel(ids.to(torch.int32), e + shared, bm, interpret=True, shared=shared,
                             tiling={"CHUNK_SLOTS": chunk, "SLOT_CHUNK": 16, "CHUNK": 32, "CHUNK_ROWS": 4})
    every = torch.cat([ids, torch.arange(e, e + shared).expand(t, shared)], dim=1) if shared else ids
    _same_alignment(got, moe.align(every, e + shared, bm), bm)


def _same_alignment(got, want, bm):
    """The same rows in use and every slot in its row; the owners of the row blocks in use (the kernels read no
    other: a block past them may name any expert)."""
    used = int(want[2])
    assert int(got[2]) == used and torch.equal(got[0], want[0].to(got[0].dtype))
    assert torch.equal(got[1][: used // bm], want[1][: used // bm].to(got[1].dtype))


def test_align_segments_are_block_aligned_and_complete():
    ids = torch.tensor([[3, 0], [3, 1], [0, 3], [3, 2]])
    slots, block_expert, num_padded = moe.align(ids, 5, 4)
    used = int(num_padded)
    assert used == 4 * 4  # experts 0, 1, 2, 3 each padded to one block of 4; expert 4 has none
    real = slots[:used][slots[:used] < ids.numel()]
    assert sorted(real.tolist()) == list(range(ids.numel()))
    for b in range(used // 4):
        rows = slots[b * 4 : (b + 1) * 4]
        rows = rows[rows < ids.numel()]
        assert (ids.flatten()[rows.long()] == block_expert[b]).all()


@pytest.mark.parametrize("e", [8, 256, 257, 300])
def test_align_sorts_on_a_narrow_key_stably(e):
    """The sort key is uint8 up to 256 experts and int16 past them: every slot lands once, in its expert's block,
    in slot order within the expert (the stable order an int64 sort gives)."""
    t, k, bm = 500, 4, 16
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(t)])
    ids[::7, 0] = e - 1  # the largest id, often: it must not wrap in the narrow key
    slots, block_expert, num_padded = moe.align(ids, e, bm)
    flat, used = ids.flatten(), int(num_padded)
    real = slots[:used][slots[:used] < flat.numel()].long()
    assert sorted(real.tolist()) == list(range(flat.numel()))
    assert torch.equal(real, torch.argsort(flat, stable=True))  # experts ascending, slots ascending within
    for b in range(used // bm):
        rows = slots[b * bm:(b + 1) * bm]
        rows = rows[rows < flat.numel()].long()
        assert (flat[rows] == block_expert[b]).all()


def test_bad_shapes_are_clear_errors():
    x, ids, w, wgu, wd = _inputs(2, 32, 16, 4, 2, torch.float32, "cpu")
    with pytest.raises(ValueError, match="do not fit"):
        moe.moe_experts(x, ids, w, wgu, wd[:, :, :8], interpret=True)
    with pytest.raises(ValueError, match="unsupported activation"):
        moe.moe_experts(x, ids, w, wgu, wd, activation="relu6", interpret=True)
    with pytest.raises(ValueError, match="shared expert weights"):  # 24 is not a multiple of I = 16
        moe.moe_experts(x, ids, w, wgu, wd, interpret=True,
                        shared=(torch.randn(24, 32), torch.randn(24, 32), torch.randn(32, 24)))


@pytest.mark.gpu
@pytest.mark.parametrize("t", [0, 1, 7, 64, 513, 4096])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_experts_v2_lite_shape(t, dtype):
    _check(t, 2048, 1408, 64, 6, dtype, "cuda", interpret=False)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 64, 4096])
def test_gpu_experts_atomic_combine(t):
    _check(t, 2048, 1408, 64, 6, torch.bfloat16, "cuda", interpret=False, deterministic=False)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 64, 4096])
def test_gpu_experts_with_shared_v2_lite_shape(t):
    _check(t, 2048, 1408, 64, 6, torch.bfloat16, "cuda", interpret=False, shared=2)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 64])
def test_gpu_experts_with_gated_shared_v2_lite_shape(t):
    _check(t, 2048, 1408, 64, 6, torch.bfloat16, "cuda", interpret=False, shared=2, gated=True)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 64, 2048])
def test_gpu_experts_with_stacked_shared_v2_lite_shape(t):
    """Stacked shared experts (Inkling's form) each weighted per token, at V2-Lite's expert shape."""
    _check(t, 2048, 1408, 64, 6, torch.bfloat16, "cuda", interpret=False, shared=2, gated=True, stacked=True)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 64, 4096])
@pytest.mark.parametrize("form", FP8_FORMS)
def test_gpu_fp8_experts_v2_lite_shape(t, form, shared=0):
    act_quant, config = FP8_FORMS[form]
    if config is not None and t == 4096:  # the prefill tile the candidates hold
        config = {**config, "BLOCK_M": 128, "num_warps": 8}
    _check_fp8(t, 2048, 1408, 64, 6, torch.bfloat16, "cuda", interpret=False, outliers=t == 64, act_quant=act_quant,
               config=config, shared=shared)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 64])
@pytest.mark.parametrize("form", ["w8a8", "w8a8-prequant"])
def test_gpu_fp8_experts_with_fp8_shared_v2_lite_shape(t, form):
    test_gpu_fp8_experts_v2_lite_shape(t, form, shared=2)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 64, 2048])
def test_gpu_experts_stored_transposed(t):
    """Experts stored [E, H, 2I] / [E, I, H] as Llama 4 stores them (with a transposed shared MLP beside them, and
    as FP8), read through their strides at decode and prefill sizes."""
    _check(t, 2048, 1408, 16, 1, torch.bfloat16, "cuda", interpret=False, transposed=True)
    _check(t, 2048, 1408, 64, 6, torch.bfloat16, "cuda", interpret=False, transposed=True, shared=2)
    _check_fp8(t, 2048, 1408, 64, 6, torch.bfloat16, "cuda", interpret=False, transposed=True)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 64, 2048])
def test_gpu_gpt_oss_experts(t):
    """GPT-OSS-20B's experts (hidden and intermediate 2880, 32 experts, top-4) as the model stores them."""
    _check(t, 2880, 2880, 32, 4, torch.bfloat16, "cuda", interpret=False, activation=GPT_OSS, transposed=True,
           biases=True, interleaved=True)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 64, 2048])
@pytest.mark.parametrize("activation", [moe.clamped_silu(10.0), moe.clamped_silu_output(7.0)])
def test_gpu_clamped_silu_experts_with_shared(t, activation):
    """DeepSeek-V4's clamped SiLU unit (limit 10) and Step-3.7's (the SiLU's output clamped at 7), the limits
    crossed (x scaled up), at V2-Lite's expert shape, a shared expert in the same launches."""
    _check(t, 2048, 1408, 64, 6, torch.bfloat16, "cuda", interpret=False, activation=activation, shared=1)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 64, 2048])
def test_gpu_ungated_experts_with_shared(t):
    """Nemotron-3-Nano's ungated experts (hidden 2688, 128 experts of 1856, top-6, squared ReLU), its ungated shared
    MLP of 3712 (two experts' worth) in the same launches."""
    _check(t, 2688, 1856, 128, 6, torch.bfloat16, "cuda", interpret=False, activation="relu2", ungated=True, shared=2)


@pytest.mark.gpu
def test_gpu_experts_edge_routes():
    _check(300, 512, 256, 16, 8, torch.bfloat16, "cuda", interpret=False, route="one_expert", noncontig=True)
    _check(3, 512, 256, 64, 1, torch.bfloat16, "cuda", interpret=False)


@pytest.mark.gpu
@pytest.mark.parametrize("t,k,e,shared,bm", [(513, 6, 64, 2, 64), (4096, 6, 64, 2, 128), (16384, 8, 256, 1, 128),
                                             (4096, 6, 64, 0, 128)])
def test_gpu_parallel_align_equals_torch_align(t, k, e, shared, bm):
    """The parallel align on the GPU (programs running at once) at V2-Lite's and V3's routing, prefill sizes."""
    ids = torch.rand(t, e, device="cuda").argsort(dim=-1)[:, :k]
    ids[: t // 2, 0] = 3  # half the tokens' first choice one expert: a segment across many chunks
    ids[: t // 2, 1:] = torch.where(ids[: t // 2, 1:] == 3, e - 1, ids[: t // 2, 1:])
    got = moe.align_parallel(ids, e + shared, bm, shared=shared)
    every = torch.cat([ids, torch.arange(e, e + shared, device="cuda").expand(t, shared)], dim=1)
    _same_alignment(got, moe.align(every, e + shared, bm), bm)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 64])
def test_gpu_every_autotune_candidate(t):
    for config in moe.CANDIDATES + (moe.FUSED_CANDIDATES if t <= moe.FUSED_MAX_TOKENS else []):
        _check(t, 2048, 1408, 64, 6, torch.bfloat16, "cuda", interpret=False, config=config)


@pytest.mark.gpu
@pytest.mark.parametrize("direct", [True, False])
def test_gpu_fused_experts(direct, poisoned_empty):
    """The one-launch experts at V2-Lite's shape with its two shared experts, bf16, every fused candidate, at one
    token (each slot its own row block, and aligned)."""
    for config in moe.FUSED_CANDIDATES:
        _check(1, 2048, 1408, 64, 6, torch.bfloat16, "cuda", interpret=False, config={**config, "DIRECT": direct},
               shared=2)


@pytest.mark.parametrize("t,e,k", [(5, 64, 6), (3, 7, 7), (1, 160, 1), (0, 8, 2), (4, 1024, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_interpreted_router_topk_equals_torch(t, e, k, dtype):
    scores = torch.randn(t, 2 * e).to(dtype)[:, ::2]  # non-contiguous rows
    values, indices = moe.router_topk(scores, k, interpret=True)
    want_v, _ = torch.topk(scores.double(), k, dim=-1)
    assert indices.dtype == torch.int64 and values.dtype == dtype and values.shape == (t, k)
    assert torch.equal(values.double(), want_v)  # the same k values, sorted
    assert torch.equal(scores.gather(1, indices), values)  # at those indices
    assert all(len(set(row)) == k for row in indices.tolist())  # each expert once
    # equal scores (fp16 has ties among 1024 of them) in ascending index order; torch.topk promises no order
    tied = values[:, 1:] == values[:, :-1]
    assert (indices[:, 1:] > indices[:, :-1])[tied].all()


def test_interpreted_router_topk_ties_nan_and_infinities():
    scores = torch.tensor([[1.0, 3.0, 3.0, 0.5, 3.0],  # ties: lower index first
                           [float("-inf")] * 4 + [2.0],  # fewer finite scores than k
                           [0.0, float("nan"), 5.0, 1.0, float("inf")]])  # NaN counts as the largest
    values, indices = moe.router_topk(scores, 3, interpret=True)
    assert indices.tolist() == [[1, 2, 4], [4, 0, 1], [1, 4, 2]]
    assert values[0].tolist() == [3.0, 3.0, 3.0] and values[1].tolist() == [2.0, float("-inf"), float("-inf")]
    assert values[2, 0].isnan() and values[2, 1:].tolist() == [float("inf"), 5.0]


def test_router_topk_rejects_what_it_cannot_do():
    with pytest.raises(ValueError, match="not supported"):
        moe.router_topk(torch.randn(2, 2048), 4, interpret=True)
    with pytest.raises(ValueError, match="not supported"):
        moe.router_topk(torch.randn(2, 8), 9, interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 64, 4096])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_router_topk_equals_torch(t, dtype):
    scores = torch.randn(t, 64, device="cuda").softmax(-1).to(dtype)
    values, indices = moe.router_topk(scores, 6)
    want_v, _ = torch.topk(scores, 6, dim=-1)
    assert torch.equal(values, want_v)  # the same k values in the same order (bf16 ties may swap indices)
    assert torch.equal(scores.gather(1, indices), values)
