"""MoE routing: a router's logits to the (weights, expert ids) the experts take, in one generated kernel.

Every router deepfuse has seen is one point of this space (``RoutingSpec``):
1. scores = softmax(logits) | sigmoid(logits) | sqrt(softplus(logits)) (DeepSeek-V4) | logits itself (a bare top-k);
2. choice = scores (+ a per-expert score-correction bias that steers the choice but not the weights);
3. optionally group-limited: the experts split into ``groups``; each group scored by its best choice or the
   sum of its best two; the experts of all but the ``topk_group`` best groups set to ``fill`` (0 or -inf);
4. ids = the top-k of choice (ties to the lower index, NaN the largest, as torch.topk);
5. weights = scores at ids, optionally renormalized to sum to one, optionally times a per-expert scale at the ids
   (Gemma 4's), times a scale.
DeepSeek-V2 greedy and group-limited, V3's noaux_tc, Mixtral and Qwen-style routers are all here. The pass
checks a graph's router against ``reference`` on random inputs before it uses the kernel.

One program holds one token's whole score row (experts <= ``MAX_EXPERTS``), laid out [groups, per group].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton

from deepfuse.codegen import KernelTemplate, cache_dir, generate, memo
from deepfuse.runtime.kernels import TRITON_DTYPES

MAX_EXPERTS = 1024
# Tokens up to which the router matmul is split over the hidden size, each token reading the whole [E, H] router
# weight (from L2 after the first): at decode sizes that replaces a weight cast, a GEMV, its reduction and the
# logits' round trip (about 5 us per V2-Lite layer on H200, bench/RESULTS.md), and past a few dozen tokens costs
# more L2 traffic than one GEMM reading it once; past it the matmul is tiled (moe_router_logits_kernel: BLOCK_T
# tokens a program, tl.dot), the form for prefill. The pass times the chosen form against the graph's on the GPU
# at compile time and keeps the faster; the limit itself comes from that reasoning, not from a measurement.
ROUTER_MATMUL_MAX_TOKENS = 64
# And for the split form, a router weight up to V3's 256 x 7168 bf16 (3.5 MiB; V2-Lite's 64 x 2048 is 256 KiB):
# every token reads it all, at 64 tokens 224 MiB of L2 traffic where a GEMM reads it once, so the compile-time
# timing decides. On H200 the fused form took 6.7 against 13.7 us for V2-Lite's router at one token; V3's, split
# over the hidden size alone, 48 against 20 (bench/moe_router.py); the split over experts too that followed is
# unmeasured. The tiled form reads the weight once per BLOCK_T tokens and has no such limit.
ROUTER_MATMUL_MAX_WEIGHT_BYTES = 4 << 20
# The split form: programs per token, each reading a [E, BLOCK_K] weight tile per step. One program streaming all
# of V2-Lite's 256 KiB took 15.5 us per layer at 32 tokens (H200, in the decode step), more than cuBLAS's two
# launches. The routing kernel then adds the splits' partial sums up,
# ROUTER_SUM_VALUES at a time (V2-Lite 16 splits x 64 experts at once, V3 16 x 256 per step).
ROUTER_MAX_SPLITS = 64
ROUTER_SUM_VALUES = 4096
SCORINGS = ("softmax", "sigmoid", "sqrtsoftplus", "none")  # sqrtsoftplus: sqrt(softplus(x)), DeepSeek-V4's
GROUP_SCORES = ("max", "top2_sum")


@dataclass(frozen=True)
class RoutingSpec:
    top_k: int
    scoring: str = "softmax"
    bias: bool = False
    groups: int = 1
    topk_group: int = 1
    group_score: str = "max"
    fill: float = float("-inf")
    renormalize: bool = False
    scale: float = 1.0
    expert_scale: bool = False  # the weights times a learned [E] scale at their ids (Gemma 4's per_expert_scale)

    def check(self, experts: int) -> None:
        """A clear error for a configuration no router computes."""
        problems = []
        if self.scoring not in SCORINGS:
            problems.append(f"scoring {self.scoring!r} is not one of {SCORINGS}")
        if self.group_score not in GROUP_SCORES:
            problems.append(f"group score {self.group_score!r} is not one of {GROUP_SCORES}")
        if not 1 <= self.top_k <= experts:
            problems.append(f"top_k={self.top_k} is not between 1 and the {experts} experts")
        if self.groups < 1 or experts % self.groups:
            problems.append(f"{self.groups} groups do not divide {experts} experts")
        elif not 1 <= self.topk_group <= self.groups:
            problems.append(f"topk_group={self.topk_group} is not between 1 and the {self.groups} groups")
        elif self.groups > 1 and self.group_score == "top2_sum" and experts // self.groups < 2:
            problems.append("a top-2-sum group score needs at least 2 experts per group")
        if experts > MAX_EXPERTS:
            problems.append(f"{experts} experts: the kernel holds up to {MAX_EXPERTS} in one program")
        if problems:
            raise ValueError("moe routing: " + "; ".join(problems))

    def describe(self) -> str:
        parts = [self.scoring if self.scoring != "none" else "scores as given"]
        if self.bias:
            parts.append("score-correction bias")
        if self.groups > 1:
            parts.append(f"best {self.topk_group} of {self.groups} groups by {self.group_score} (others -> {self.fill})")
        parts.append(f"top-{self.top_k}")
        if self.renormalize:
            parts.append("renormalized")
        if self.expert_scale:
            parts.append("x a per-expert scale")
        if self.scale != 1.0:
            parts.append(f"x {self.scale:g}")
        return ", ".join(parts)


TEMPLATE = KernelTemplate(
    "moe_routing",
    '''
import triton
import triton.language as tl


${partial_kernel}
@triton.jit
def moe_routing_kernel(
    ${logits_arg}, Bias, ${expert_scale_arg}Weights, Ids,
    stride_l,
    ${router_matmul_args}
    GROUPS: tl.constexpr, PER_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, K: tl.constexpr,
    GROUPS_POW2: tl.constexpr, PER_GROUP_POW2: tl.constexpr, K_POW2: tl.constexpr, SCALE: tl.constexpr,
):
    """Weights[t, :K], Ids[t, :K] of token t: ${doc}.
    One program per token; its expert row is held as [GROUPS, PER_GROUP]."""
    t = tl.program_id(0).to(tl.int64)
    group = tl.arange(0, GROUPS_POW2)
    member = tl.arange(0, PER_GROUP_POW2)
    expert = group[:, None] * PER_GROUP + member[None, :]
    valid = (group[:, None] < GROUPS) & (member[None, :] < PER_GROUP)
    ${logits}
    ${scoring}
    ${choice}
    key = tl.where(choice != choice, float("inf"), choice)  # NaN counts as the largest, as in torch.topk
    key = tl.where(valid, key, float("-inf"))
    ${group_selection}
    # top-k of the choice, one pick per step: the largest left, ties to the lower expert index
    taken = ~valid
    slot = tl.arange(0, K_POW2)
    weights = tl.zeros([K_POW2], dtype=tl.float32)
    ids = tl.zeros([K_POW2], dtype=tl.int64)
    for j in tl.static_range(K):
        best = tl.max(tl.max(tl.where(taken, float("-inf"), key), axis=1), axis=0)
        pick = tl.min(tl.min(tl.where((key == best) & ~taken, expert, GROUPS_POW2 * PER_GROUP_POW2), axis=1), axis=0)
        chosen = (expert == pick) & valid
        weights = tl.where(slot == j, tl.sum(tl.sum(tl.where(chosen, scores, 0.0), axis=1), axis=0), weights)
        ids = tl.where(slot == j, pick.to(tl.int64), ids)
        taken = taken | chosen
    ${normalize}
    ${expert_scale}
    tl.store(Weights + t * K + slot, (weights * SCALE).to(Weights.dtype.element_ty), mask=slot < K)
    tl.store(Ids + t * K + slot, ids, mask=slot < K)
''',
)

_LOAD_LOGITS = 'logits = tl.load(Logits + t * stride_l + expert, mask=valid, other=float("-inf")).to(tl.float32)'
# The router's matmul in one launch before the routing, split over the hidden size per token (a few tokens) or
# tiled (many): both operands read as stored and rounded to the graph's matmul dtype (what its casts did),
# products accumulated in fp32 like cuBLAS's.
_ROUTER_PARTIAL_KERNEL = """
@triton.jit
def moe_router_partial_kernel(
    X, RouterWeight, Partials, stride_x, stride_we, stride_wk, HIDDEN, E, PER_SPLIT,
    BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    \"\"\"Partials[t, split, e] = sum over the split's PER_SPLIT hidden columns of x[t, k] * RouterWeight[e, k] for
    the BLOCK_E experts of program_id(2), in fp32 of operands rounded to ${mm_dtype}: a decode token's router
    weight read is spread over splits x expert blocks programs, and the routing kernel sums the splits in a
    fixed order.\"\"\"
    t = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    experts = tl.program_id(2) * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_E], dtype=tl.float32)
    k_end = tl.minimum(split * PER_SPLIT + PER_SPLIT, HIDDEN)
    for k0 in range(split * PER_SPLIT, k_end, BLOCK_K):
        k_ok = k0 + offs_k < k_end
        xk = tl.load(X + t * stride_x + k0 + offs_k, mask=k_ok, other=0.0).to(${mm_dtype}).to(tl.float32)
        wk = tl.load(RouterWeight + experts[:, None] * stride_we + (k0 + offs_k)[None, :] * stride_wk,
                     mask=(experts[:, None] < E) & k_ok[None, :], other=0.0).to(${mm_dtype}).to(tl.float32)
        acc += tl.sum(wk * xk[None, :], axis=1)
    tl.store(Partials + (t * tl.num_programs(1) + split) * E + experts, acc, mask=experts < E)


@triton.jit
def moe_router_logits_kernel(
    X, RouterWeight, Logits, T, stride_x, stride_we, stride_wk, HIDDEN, E,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    \"\"\"Logits[t, e] = sum over k of x[t, k] * RouterWeight[e, k] in the graph's ${mm_dtype} matmul, for a
    BLOCK_T x BLOCK_E tile of tokens and experts (many tokens: the weight read once per BLOCK_T of them),
    accumulated in fp32.
    Operands: ${dot_note}.\"\"\"
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    experts = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_k = tl.arange(0, BLOCK_K)
    rows = tokens.to(tl.int64)[:, None] * stride_x
    acc = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    for k0 in range(0, HIDDEN, BLOCK_K):
        k_ok = k0 + offs_k < HIDDEN
        xk = tl.load(X + rows + (k0 + offs_k)[None, :], mask=(tokens[:, None] < T) & k_ok[None, :], other=0.0)
        wk = tl.load(RouterWeight + experts[None, :] * stride_we + (k0 + offs_k)[:, None] * stride_wk,
                     mask=(experts[None, :] < E) & k_ok[:, None], other=0.0)
        acc = tl.dot(xk.to(${dot_dtype}), wk.to(${dot_dtype}), acc${precision})
    tl.store(Logits + tokens.to(tl.int64)[:, None] * E + experts[None, :], acc,
             mask=(tokens[:, None] < T) & (experts[None, :] < E))


# The routing, over the sum of the splits above (the tiled kernel's logits: one split).
"""
# The routing kernel then takes the logits as the splits' sum (SPLIT_CHUNK splits at a time, in order), rounded
# to the matmul dtype as its output is.
_SUM_PARTIALS = """\
logits = tl.zeros([GROUPS_POW2, PER_GROUP_POW2], dtype=tl.float32)
splits = tl.arange(0, SPLIT_CHUNK)
for s0 in tl.static_range(0, NUM_SPLITS, SPLIT_CHUNK):
    partials = tl.load(Partials + t * stride_l + (s0 + splits)[:, None, None] * (GROUPS * PER_GROUP)
                       + expert[None, :, :], mask=(s0 + splits < NUM_SPLITS)[:, None, None] & valid[None, :, :],
                       other=0.0)
    logits += tl.sum(partials, axis=0)
logits = tl.where(valid, logits.to(${mm_dtype}).to(tl.float32), float("-inf"))"""

_SCORING = {
    "softmax": """\
top = tl.max(tl.max(logits, axis=1), axis=0)
exps = tl.exp(logits - top)  # padding lanes: exp(-inf) = 0
scores = exps / tl.sum(tl.sum(exps, axis=1), axis=0)""",
    "sigmoid": "scores = tl.sigmoid(logits)",
    # torch's softplus: x itself past 20 (its threshold), else log1p(exp(x)), taken as u - u^2 / 2 for a small
    # u = exp(x), where log(1 + u) would round to 0 in fp32; padding lanes (-inf) score 0
    "sqrtsoftplus": """\
u = tl.exp(logits)
scores = tl.sqrt(tl.where(logits > 20.0, logits, tl.where(u < 1e-4, u * (1.0 - 0.5 * u), tl.log(1.0 + u))))""",
    "none": "scores = logits",
}

_GROUP_SCORE = {
    "max": "group_score = tl.max(key, axis=1)",
    "top2_sum": """\
first = tl.max(key, axis=1)
first_at = tl.min(tl.where(key == first[:, None], member[None, :], PER_GROUP_POW2), axis=1)
group_score = first + tl.max(tl.where(member[None, :] == first_at[:, None], float("-inf"), key), axis=1)""",
}

_GROUP_SELECTION = """\
# group-limited: keep the TOPK_GROUP best groups, set the others' experts to {fill}
{group_score}
kept = group >= GROUPS
for i in tl.static_range(TOPK_GROUP):
    best_group = tl.max(tl.where(kept, float("-inf"), group_score), axis=0)
    kept = kept | (group == tl.min(tl.where((group_score == best_group) & ~kept, group, GROUPS_POW2), axis=0))
kept = kept & (group < GROUPS)
key = tl.where(valid, tl.where(kept[:, None], key, {fill}), float("-inf"))"""

_generated = memo()


def kernel_for(spec: RoutingSpec, origin: str = "", router_matmul: Optional[torch.dtype] = None,
               operands: Optional[tuple[torch.dtype, torch.dtype]] = None):
    """The generated source for ``spec``'s structure (its sizes and scale are constexprs of the launch); with
    ``router_matmul`` (the matmul's dtype) the kernel computes the logits itself from the hidden states and the
    router weight, whose stored dtypes (``operands``) decide what the tiled form's ``tl.dot`` multiplies
    (``dot_dtype_for``)."""
    dot_dtype = None
    if router_matmul is not None:
        if operands is None:
            raise ValueError("moe routing: the router matmul's kernels need its operands' dtypes")
        dot_dtype = dot_dtype_for(*operands, router_matmul)
    structure = {"scoring": spec.scoring, "bias": spec.bias, "renormalize": spec.renormalize,
                 **({"expert_scale": True} if spec.expert_scale else {}),
                 "group_score": spec.group_score if spec.groups > 1 else None,
                 "fill": spec.fill if spec.groups > 1 else None,
                 **({"router_matmul": str(router_matmul), "dot": str(dot_dtype)} if router_matmul else {})}
    key = (str(cache_dir()), tuple(structure.items()))
    if key not in _generated:
        fill = "float(\"-inf\")" if spec.fill == float("-inf") else repr(float(spec.fill))
        slots = {
            "doc": spec.describe(),
            "scoring": _SCORING[spec.scoring],
            "choice": ("choice = scores + tl.load(Bias + expert, mask=valid, other=0.0).to(tl.float32)  "
                       "# the bias steers the choice, not the weights") if spec.bias else "choice = scores",
            "group_selection": _GROUP_SELECTION.format(group_score=_GROUP_SCORE[spec.group_score], fill=fill)
            if spec.groups > 1 else "",
            "normalize": "weights = weights / (tl.sum(weights, axis=0) + 1e-20)" if spec.renormalize else "",
            "expert_scale_arg": "ExpertScale, " if spec.expert_scale else "",
            "expert_scale": ("weights = weights * tl.load(ExpertScale + ids, mask=slot < K, other=0.0).to(tl.float32)"
                             "  # each chosen expert's own scale") if spec.expert_scale else "",
            "logits_arg": "Partials" if router_matmul else "Logits",
            "router_matmul_args": "NUM_SPLITS: tl.constexpr, SPLIT_CHUNK: tl.constexpr," if router_matmul else "",
            "logits": (_SUM_PARTIALS.replace("${mm_dtype}", TRITON_DTYPES[router_matmul]) if router_matmul
                       else _LOAD_LOGITS),
            "partial_kernel": _router_kernels(router_matmul, dot_dtype) if router_matmul else "",
        }
        what = "hidden states (the router matmul included)" if router_matmul else "logits"
        header = ("Pattern family: moe (router).\n"
                  f"Computes: a router's {what} to its top-k routing weights and expert ids: {spec.describe()}.\n"
                  + (f"First generated for: {origin}" if origin else ""))
        _generated[key] = generate(TEMPLATE, structure, slots, header)
    return _generated[key]


def dot_dtype_for(x_dtype: torch.dtype, w_dtype: torch.dtype, mm_dtype: torch.dtype) -> torch.dtype:
    """The operand dtype of the tiled router matmul's ``tl.dot``, which must give the graph's products: a half
    matmul dtype rounds both operands to it; an fp32 matmul of operands both stored in one half dtype multiplies
    values that half dtype holds exactly, and their product is exact in fp32 (8- or 11-bit significands), so the
    tensor cores compute it in that dtype (DeepSeek's and HF's ``F.linear(x.float(), w.float())``); anything else
    is an fp32 dot in IEEE precision, no TF32."""
    if mm_dtype != torch.float32:
        return mm_dtype
    if x_dtype == w_dtype and x_dtype in (torch.float16, torch.bfloat16):
        return x_dtype
    return torch.float32


_HALF_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16"}


def uses_tiled_matmul(tokens: int) -> bool:
    """Whether route_hidden's matmul at this many tokens is the tiled form (else split over the hidden size)."""
    return tokens > ROUTER_MATMUL_MAX_TOKENS


def describe_matmul(tokens: int, x_dtype: torch.dtype, w_dtype: torch.dtype, mm_dtype: torch.dtype) -> str:
    """How route_hidden computes the router matmul at this many tokens, for explain."""
    if not uses_tiled_matmul(tokens):
        return "split over the hidden size, every token reading the whole weight"
    dot = dot_dtype_for(x_dtype, w_dtype, mm_dtype)
    products = ("fp32 products in IEEE precision" if dot == torch.float32
                else f"{_HALF_NAMES[dot]} products on the tensor cores")
    return f"tiled over tokens and experts, {products}"


def _router_kernels(mm_dtype: torch.dtype, dot_dtype: torch.dtype) -> str:
    """Both router matmul kernels' source, for the graph's matmul dtype and the tiled one's dot operand dtype."""
    if dot_dtype == torch.float32:
        note = "fp32, multiplied in IEEE precision (no TF32)"
    elif mm_dtype == dot_dtype:
        note = f"rounded to {_HALF_NAMES[dot_dtype]}, multiplied on the tensor cores"
    else:
        note = (f"{_HALF_NAMES[dot_dtype]} values as stored, multiplied on the tensor cores, products exact in "
                "fp32, as the graph's")
    return (_ROUTER_PARTIAL_KERNEL.replace("${mm_dtype}", TRITON_DTYPES[mm_dtype])
            .replace("${dot_dtype}", TRITON_DTYPES[dot_dtype]).replace("${dot_note}", note)
            .replace("${precision}", ', input_precision="ieee"' if dot_dtype == torch.float32 else ""))


def route(logits: torch.Tensor, bias: Optional[torch.Tensor], spec: RoutingSpec, out_dtype: torch.dtype,
          interpret: bool = False, origin: str = "",
          expert_scale: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] in ``out_dtype``, int64 ids [T, k]) of ``spec`` over ``logits`` [T, E], in one launch
    (``expert_scale`` [E] with ``spec.expert_scale``). Slots come sorted by choice, descending. Traceable into a
    graph like the experts kernels."""
    t, e = logits.shape
    _check(spec, e, logits.dtype, bias, out_dtype, expert_scale)
    fn = kernel_for(spec, origin).function("moe_routing_kernel", interpret=interpret)
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    return _launch(fn, logits, (logits.stride(0),), {}, t, e, bias, spec, out_dtype, interpret, expert_scale)


def route_hidden(x: torch.Tensor, router_weight: torch.Tensor, bias: Optional[torch.Tensor], spec: RoutingSpec,
                 out_dtype: torch.dtype, mm_dtype: torch.dtype, interpret: bool = False, origin: str = "",
                 expert_scale: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``route`` of the logits ``x.to(mm_dtype) @ router_weight.to(mm_dtype).T`` (x [T, K], router_weight [E, K],
    each in any float dtype; the product in ``mm_dtype`` as a matmul computes it: fp32 accumulation, the
    result rounded to ``mm_dtype``) in two launches: the matmul, then the routing kernel over its fp32 sums. Up to
    ROUTER_MATMUL_MAX_TOKENS tokens the matmul is split over K, every token reading the whole router weight, and
    the routing kernel adds the splits up; past it, tiled over tokens and experts on the tensor cores."""
    t, k = x.shape
    e = router_weight.shape[0]
    _check(spec, e, mm_dtype, bias, out_dtype, expert_scale)
    if router_weight.dim() != 2 or router_weight.shape[1] != k:
        raise ValueError(f"moe routing: hidden states [T, {k}] and router weight {tuple(router_weight.shape)} do "
                         "not chain (the weight is [experts, hidden])")
    if x.dtype not in TRITON_DTYPES or router_weight.dtype not in TRITON_DTYPES:
        raise ValueError(f"moe routing: hidden states in {x.dtype} and router weight in {router_weight.dtype}: "
                         "the kernel takes fp16, bf16 or fp32")
    tiled = uses_tiled_matmul(t)
    gen = kernel_for(spec, origin, router_matmul=mm_dtype, operands=(x.dtype, router_weight.dtype))
    fn = gen.function("moe_routing_kernel", interpret=interpret)
    matmul = gen.function("moe_router_logits_kernel" if tiled else "moe_router_partial_kernel", interpret=interpret)
    if not interpret:
        matmul = torch.library.wrap_triton(matmul)
    x = x if x.stride(-1) == 1 else x.contiguous()
    if tiled:
        # 16 x 64 tiles of tokens x experts at V2-Lite's 2048 tokens (128 programs); 64-token tiles from 8192
        block_e = max(16, min(64, triton.next_power_of_2(e)))
        blocks_e = triton.cdiv(e, block_e)
        block_t = next((b for b in (64, 32) if triton.cdiv(t, b) * blocks_e >= 128), 16)
        logits = torch.empty((t, e), dtype=torch.float32, device=x.device)
        matmul[(triton.cdiv(t, block_t), blocks_e)](
            x, router_weight, logits, t, x.stride(0), router_weight.stride(0), router_weight.stride(1), k, e,
            BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=64, num_warps=4, num_stages=3)
        return _launch(fn, logits, (e,), {"NUM_SPLITS": 1, "SPLIT_CHUNK": 1}, t, e, bias, spec, out_dtype,
                       interpret, expert_scale)
    # One [BLOCK_E, BLOCK_K] weight tile of 8192 values per program and step: V2-Lite's router is 16 programs per
    # token of one 64 x 128 tile each, V3's 56 splits x 4 expert blocks of one tile each.
    block_e = min(64, triton.next_power_of_2(e))
    block_k = max(16, min(8192 // block_e, triton.next_power_of_2(max(k, 1))))
    max_splits = max(1, min(ROUTER_MAX_SPLITS, triton.cdiv(k, block_k)))
    per_split = triton.cdiv(triton.cdiv(k, max_splits), block_k) * block_k
    splits = max(1, triton.cdiv(k, per_split))
    partials = torch.empty((t, splits, e), dtype=torch.float32, device=x.device)
    if t:
        matmul[(t, splits, triton.cdiv(e, block_e))](
            x, router_weight, partials, x.stride(0), router_weight.stride(0), router_weight.stride(1), k, e,
            per_split, BLOCK_E=block_e, BLOCK_K=block_k)
    chunk = min(triton.next_power_of_2(splits), max(1, ROUTER_SUM_VALUES // triton.next_power_of_2(e)))
    return _launch(fn, partials, (splits * e,), {"NUM_SPLITS": splits, "SPLIT_CHUNK": chunk}, t, e, bias, spec,
                   out_dtype, interpret, expert_scale)


def _check(spec: RoutingSpec, e: int, logits_dtype, bias, out_dtype, expert_scale=None) -> None:
    spec.check(e)
    if logits_dtype not in TRITON_DTYPES or out_dtype not in TRITON_DTYPES:
        raise ValueError(f"moe routing: logits in {logits_dtype} to weights in {out_dtype}: "
                         "the kernel takes fp16, bf16 or fp32")
    if spec.bias != (bias is not None) or (bias is not None and tuple(bias.shape) != (e,)):
        raise ValueError(f"moe routing: the spec {'takes' if spec.bias else 'has no'} a bias of shape ({e},), "
                         f"got {None if bias is None else tuple(bias.shape)}")
    if spec.expert_scale != (expert_scale is not None) or (expert_scale is not None and (
            tuple(expert_scale.shape) != (e,) or expert_scale.dtype not in TRITON_DTYPES)):
        raise ValueError(f"moe routing: the spec {'takes a' if spec.expert_scale else 'has no'} per-expert scale "
                         f"of shape ({e},) in fp16/bf16/fp32, got "
                         f"{None if expert_scale is None else (tuple(expert_scale.shape), expert_scale.dtype)}")


def _launch(fn, source, strides, matmul: dict, t, e, bias, spec, out_dtype, interpret, expert_scale=None):
    """One program per token over ``source`` (the logits, or the router matmul's partial sums with ``matmul``'s
    split counts)."""
    if not interpret:
        fn = torch.library.wrap_triton(fn)
    bias = bias.contiguous() if bias is not None else source  # never read without a bias
    scale_arg = (expert_scale.contiguous(),) if expert_scale is not None else ()
    weights = torch.empty((t, spec.top_k), dtype=out_dtype, device=source.device)
    ids = torch.empty((t, spec.top_k), dtype=torch.int64, device=source.device)
    if t:
        per_group = e // spec.groups
        fn[(t,)](source, bias, *scale_arg, weights, ids, *strides, **matmul,
                 GROUPS=spec.groups, PER_GROUP=per_group, TOPK_GROUP=spec.topk_group, K=spec.top_k,
                 GROUPS_POW2=triton.next_power_of_2(spec.groups), PER_GROUP_POW2=triton.next_power_of_2(per_group),
                 K_POW2=triton.next_power_of_2(spec.top_k), SCALE=float(spec.scale))
    return weights, ids


def reference_scores(logits: torch.Tensor, spec: RoutingSpec) -> torch.Tensor:
    """The spec's scoring of [T, E] logits in plain torch."""
    if spec.scoring == "softmax":
        return logits.softmax(dim=-1)
    if spec.scoring == "sigmoid":
        return logits.sigmoid()
    if spec.scoring == "sqrtsoftplus":
        return torch.nn.functional.softplus(logits).sqrt()
    return logits


def reference(logits: torch.Tensor, bias: Optional[torch.Tensor], spec: RoutingSpec,
              out_dtype: Optional[torch.dtype] = None,
              expert_scale: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``spec`` in plain torch, in the logits' dtype (float64 in the checks); ``expert_scale`` [E] with
    ``spec.expert_scale``. Ties: torch.topk's order."""
    t, e = logits.shape
    spec.check(e)
    scores = reference_scores(logits, spec)
    choice = scores + bias.to(scores.dtype) if spec.bias else scores
    if spec.groups > 1:
        grouped = choice.view(t, spec.groups, e // spec.groups)
        if spec.group_score == "max":
            group_score = grouped.amax(dim=-1)
        else:
            group_score = grouped.topk(2, dim=-1).values.sum(dim=-1)
        keep = torch.zeros_like(group_score, dtype=torch.bool)
        keep.scatter_(1, group_score.topk(spec.topk_group, dim=-1).indices, True)
        choice = grouped.masked_fill(~keep.unsqueeze(-1), spec.fill).flatten(1)
    ids = choice.topk(spec.top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if spec.renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    if spec.expert_scale:
        weights = weights * expert_scale.to(weights.dtype)[ids]
    weights = weights * spec.scale
    return weights.to(out_dtype or logits.dtype), ids


def same_routing(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor], rtol: float,
                 ids_only: bool = False) -> bool:
    """Do two (weights, ids) results route every token to the same experts (with the same weights, unless
    ``ids_only``), whatever order each lists a token's k slots in?"""
    (wa, ia), (wb, ib) = a, b
    if ia.shape != ib.shape:
        return False
    ia, oa = ia.cpu().sort(dim=-1)
    ib, ob = ib.cpu().sort(dim=-1)
    if not torch.equal(ia, ib):
        return False
    if ids_only:
        return True
    wa, wb = wa.cpu(), wb.cpu()
    wa, wb = wa.double().gather(1, oa), wb.double().gather(1, ob)
    if not (wa.isfinite().all() and wb.isfinite().all()):
        return torch.equal(wa.isnan(), wb.isnan()) and torch.allclose(wa, wb, rtol=rtol, atol=0, equal_nan=True)
    return bool(((wa - wb).abs() <= rtol * wb.abs() + 1e-30).all()) if wa.numel() else True

