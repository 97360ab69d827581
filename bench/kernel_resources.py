"""Registers, spills and shared memory of deepfuse's generated kernels per tile configuration, compiled for a
Hopper GPU (sm_90a) on any machine: Triton lowers the kernel to PTX without a GPU and its bundled ptxas reports
what one thread uses. Pointers and stride arguments are taken as 16-divisible, as Triton specializes a launch
at V2-Lite's shapes; the count of asynchronous global-to-shared copies says whether the loop is pipelined, and
--sass counts the instructions by opcode (nvdisasm). No timing: a spill-free tile is not necessarily the
fastest (occupancy falls as registers rise), but spills and conversions are costs the timing sweeps
(bench/mla_decode_tiles.py, bench/mla_prefill_tiles.py, bench/moe_fp8.py) can then explain. Prints a table,
writes JSON with --out.

    python3 bench/kernel_resources.py [--kernels mla_decode,mla_decode_fp8,mla_prefill,moe_gate_up,...] [--sass]
        [--out DIR]
"""
import argparse
import collections
import inspect
import itertools
import json
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from deepfuse.runtime.kernels import mla

# V2-Lite attention: kv rank 512, rope 64, nope 128, v 128, 16 heads
C, R, DN, DV = 512, 64, 128, 128


def _nvidia_tool(name: str) -> str:
    """A CUDA tool Triton ships (ptxas, nvdisasm): the versions that build its kernels."""
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def sass_opcodes(cubin: bytes) -> list[str]:
    """The kernel's SASS instructions' opcodes in program order (nvdisasm), predicates left out."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        sass = subprocess.run([_nvidia_tool("nvdisasm"), "-c", f.name], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(f.name)
    return [m.group(1) for m in re.finditer(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", sass, re.M)]


# The instructions whose order says how many memory round trips a kernel waits for: global loads and stores,
# asynchronous copies and their waits, shared-memory stores and loads, shuffles and barriers.
ORDER_OPS = re.compile(r"^(LDG|STG|LDGSTS|LDGDEPBAR|DEPBAR|BAR|SHFL|STS|LDS|LDSM)(\.|$)")


def sass_order(opcodes: list[str]) -> str:
    """The memory and barrier instructions among ``opcodes`` in program order, runs counted: "LDG.E.128 x2,
    SHFL.BFLY x5, BAR.SYNC.DEFER_BLOCKING, ...". A load listed after a barrier or a shuffle of loaded data issues
    only once that wait is over: a second memory round trip."""
    ops = [op for op in opcodes if ORDER_OPS.match(op)]
    return ", ".join(op if n == 1 else f"{op} x{n}" for op, n in
                     ((op, len(list(run))) for op, run in itertools.groupby(ops)))


def loop_loads(ttgir: str) -> int:
    """Synchronous global loads (``tt.load``) inside loops of the TTGIR: each one waits a memory round trip in every
    iteration, where the pipelined ones (asynchronous copies) were issued stages ahead. A plain ``range`` pipelines
    only the loads that feed a dot; a ``tl.range(..., num_stages=...)`` loop the others too, where their values are
    at least 4 contiguous bytes a thread."""
    depth, loops, count = 0, [], 0
    for line in ttgir.splitlines():
        if loops and re.search(r"= tt\.load ", line):
            count += 1
        if re.search(r"\bscf\.for\b", line):
            loops.append(depth)
        depth += line.count("{") - line.count("}")
        while loops and depth <= loops[-1]:
            loops.pop()
    return count


def resources(fn, pointers: dict, scalars: dict, constexprs: dict, num_warps: int, num_stages: int,
              arch: int = 90, divisible: tuple = ()) -> dict:
    """Compile the ``@triton.jit`` ``fn`` for ``sm_{arch}a``: pointer arguments typed by ``pointers``
    ("*bf16", ...), scalar ones by ``scalars`` (default i32), the rest the ``constexprs``; ptxas -v's counts.
    Integer arguments named in ``divisible`` are taken as 16-divisible (a size a launch specializes so)."""
    if "STAGES" in inspect.signature(fn.fn).parameters:  # a tl.range loop's stage count: the launch's, as launched
        constexprs = {"STAGES": num_stages, **constexprs}
    sig = {}
    for p in inspect.signature(fn.fn).parameters:
        sig[p] = pointers.get(p) or ("constexpr" if p in constexprs else scalars.get(p, "i32"))
    # What a launch specializes on: torch's pointers are 16-byte aligned, Triton marks integer arguments
    # divisible by 16 as such and makes a 1 a constant (callers pass those in ``constexprs``). Without it no load
    # is known to be aligned, none becomes an asynchronous copy, and no loop is pipelined (the shared memory
    # then reads the same at every num_stages).
    names = list(sig)
    attrs = {(names.index(p),): [["tt.divisibility", 16]] for p in names
             if p in pointers or (p.startswith("stride_") and p not in constexprs) or p in divisible}
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                            target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(kernel.asm["ptx"])
    try:
        info = subprocess.run([_nvidia_tool("ptxas"), "-v", f"--gpu-name=sm_{arch}a", f.name, "-o", os.devnull],
                              capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(f.name)
    opcodes = sass_opcodes(kernel.asm["cubin"])  # static counts: the loop body's make up most of them
    regs = re.search(r"Used (\d+) registers", info)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    return {"registers": int(regs.group(1)), "spill_stores": int(spills.group(1)), "spill_loads": int(spills.group(2)),
            "shared_bytes": kernel.metadata.shared,
            "async_copies": len(re.findall(r"async_copy_global_to_local", kernel.asm["ttgir"])),
            "loop_loads": loop_loads(kernel.asm["ttgir"]),
            "sass": dict(collections.Counter(opcodes).most_common(12)), "order": sass_order(opcodes)}


def mla_decode(fp8: bool, as_fp16: bool = False):
    fn = mla.kernels_for(torch.bfloat16, "bench/kernel_resources.py").function("mla_decode_partial_kernel")
    pointers = {"QLat": "*bf16", "QPe": "*bf16", "KV": "*fp8e4nv" if fp8 else "*bf16",
                "KVScale": "*fp32" if fp8 else "*bf16", "KPe": "*bf16", "Mask": "*fp32", "PartOut": "*fp32",
                "PartLse": "*fp32"}
    for mask, bt, warps, stages in itertools.product((False, True), (16, 32, 64), (4, 8), (2, 3)):
        constexprs = {"C": C, "C_POW2": C, "R": R, "R_POW2": R, "BLOCK_H": 16, "BLOCK_T": bt, "NUM_SPLITS": 8,
                      "HAS_MASK": mask, "CAUSAL": True, "KV_FP8": fp8, "FP8_AS_FP16": as_fp16}
        yield ({"BLOCK_T": bt, "num_warps": warps, "num_stages": stages, "HAS_MASK": mask}, fn, pointers,
               {"scale": "fp32"}, constexprs)


def mla_prefill():
    """The expanded (prefill) flash kernel at V2-Lite dims over its tiles, the key and value tiles pointer-fed and
    through tensor descriptors (TMA: their loads count as no asynchronous copy)."""
    fn = mla.kernels_for(torch.bfloat16, "bench/kernel_resources.py").function("mla_prefill_kernel")
    pointers = {name: "*bf16" for name in ("QN", "QP", "KN", "KP", "V", "Mask", "Out")}
    for tma, bm, bn, warps, stages in itertools.product((False, True), (64, 128), (32, 64, 128), (4, 8), (2, 3)):
        constexprs = {"DN": DN, "DN_POW2": DN, "R": R, "R_POW2": R, "DV": DV, "DV_POW2": DV, "BLOCK_M": bm,
                      "BLOCK_N": bn, "HAS_MASK": False, "CAUSAL": True, "TMA": tma}
        yield ({"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages, "TMA": tma}, fn, pointers,
               {"scale": "fp32"}, constexprs)


def moe_experts(weight_format: str, kind: str = "gate_up", gated: bool = True, uniform: bool = True):
    """The experts' gate/up (or down) kernel at V2-Lite's MoE (hidden 2048, intermediate 1408, top-6 of 64 plus
    2 shared experts in the same launch), one token (DIRECT), over each decode tile candidate of its format; with
    ``gated=False`` the ungated experts' up kernel (squared ReLU) at the same shape."""
    from deepfuse.runtime.kernels import moe

    fp8 = weight_format != "float"
    name = "moe_gate_up_act_kernel" if kind == "gate_up" else "moe_down_weighted_kernel"
    fn = moe.kernels_for(torch.bfloat16, "silu" if gated else "relu2", "bench/kernel_resources.py", shared=True,
                         weight_format=weight_format, gated=gated).function(name)
    w = "*fp8e4nv" if fp8 else "*bf16"
    pointers = {"X": "*bf16", "H": "*bf16", "W": w, "SharedGate": w, "SharedUp": w, "SharedDown": w,
                "Out": "*bf16", "SortedSlots": "*i64", "BlockExpert": "*i64", "NumPadded": "*i64",
                "TopkWeights": "*fp32", "SharedScale": "*fp32", "WScale": "*fp32", "SharedGateScale": "*fp32",
                "SharedUpScale": "*fp32", "SharedDownScale": "*fp32"}
    n, k = (1408, 2048) if kind == "gate_up" else (2048, 1408)
    candidates = moe.FP8_CANDIDATES if fp8 else moe.CANDIDATES
    for c in (c for c in candidates if c.get("N_FASTEST") and not c.get("PREQUANT")):
        bn = c["BLOCK_N"] if kind == "gate_up" else c.get("BLOCK_N_DOWN", c["BLOCK_N"])
        # stride_wk and the shared weights' stride_sk are 1 (K innermost, as the pass hands the weights over): a
        # launch specializes a 1 as a constant
        constexprs = {"N": n, "K": k, "TOP_K": 8, "ROUTED_K": 6, "BLOCK_M": c["BLOCK_M"], "BLOCK_N": bn,
                      "BLOCK_K": c["BLOCK_K"], "N_FASTEST": True, "DIRECT": True, "EXACT_FP8_ROUNDING": False,
                      # V2-Lite's intermediate (11 x 128) and hidden: a tile that divides 128 has one scale
                      "UNIFORM_W_SCALE": uniform and 128 % bn == 0,
                      "ATOMIC": False, "SHARED_SCALED": False, "SWAP_AB": c.get("SWAP_AB", False), "stride_wk": 1,
                      "stride_sk": 1}
        constexprs = {key: v for key, v in constexprs.items() if key in inspect.signature(fn.fn).parameters}
        config = {"BLOCK_N": bn, "BLOCK_K": c["BLOCK_K"], "num_warps": c["num_warps"], "num_stages": c["num_stages"],
                  **({"SWAP_AB": True} if c.get("SWAP_AB") else {})}
        yield config, fn, pointers, {}, constexprs, ("up_offset",)  # (the up rows' offset: a multiple of 16)


def moe_fused():
    """The one-launch experts (FUSED) at V2-Lite's MoE, one token (DIRECT): top-6 of 64 plus 2 shared experts,
    hidden 2048, intermediate 1408, bf16, over each fused candidate."""
    from deepfuse.runtime.kernels import moe

    fn = moe.kernels_for(torch.bfloat16, "silu", "bench/kernel_resources.py", shared=True).function(
        "moe_experts_fused_kernel")
    pointers = {"X": "*bf16", "W": "*bf16", "SharedGate": "*bf16", "SharedUp": "*bf16", "WDown": "*bf16",
                "SharedDown": "*bf16", "Partials": "*fp32", "SortedSlots": "*i64", "BlockExpert": "*i64",
                "NumPadded": "*i64", "TopkWeights": "*bf16", "SharedScale": "*bf16"}
    for c in moe.FUSED_CANDIDATES:
        # K innermost in the routed and shared weights (stride 1), as the pass hands them over
        constexprs = {"N": 1408, "K": 2048, "TOP_K": 8, "ROUTED_K": 6, "SHARED_SCALED": False,
                      **{key: c[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_H")}, "N_FASTEST": True,
                      "DIRECT": True, "stride_wk": 1, "stride_sk": 1, "stride_dk": 1, "stride_dsk": 1}
        config = {key: c[key] for key in ("BLOCK_N", "BLOCK_H", "BLOCK_K", "num_warps", "num_stages")}
        yield config, fn, pointers, {}, constexprs, ("up_offset",)


def moe_prefill(kind: str, prequant: bool = False, uniform: bool = True):
    """The experts' gate/up (or down) kernel at V2-Lite's MoE in prefill (hidden 2048, intermediate 1408, top-6 of
    64, aligned row blocks, no shared experts: past SHARED_FUSED_MAX_TOKENS they run apart), over each bf16
    candidate of 64 rows and more; with ``prequant`` the FP8 W8A8 kernels over activations quantized once
    (PREQUANT: x by a pre-kernel, the intermediate by the gate/up epilogue), over each PREQUANT candidate."""
    from deepfuse.runtime.kernels import moe

    name = "moe_gate_up_act_kernel" if kind == "gate_up" else "moe_down_weighted_kernel"
    w = "*fp8e4nv" if prequant else "*bf16"
    a = "*fp8e4nv" if prequant else "*bf16"
    pointers = {"X": a, "H": a, "W": w, "SharedGate": w, "SharedUp": w, "SharedDown": w,
                "Out": "*fp8e4nv" if prequant and kind == "gate_up" else "*bf16", "SortedSlots": "*i32",
                "BlockExpert": "*i32", "NumPadded": "*i32", "TopkWeights": "*bf16", "SharedScale": "*bf16",
                "WScale": "*fp32", "AScale": "*fp32", "OutScale": "*fp32"}
    n, k = (1408, 2048) if kind == "gate_up" else (2048, 1408)
    fn = moe.kernels_for(torch.bfloat16, "silu", "bench/kernel_resources.py",
                         weight_format="fp8-block-prequant" if prequant else "float").function(name)
    candidates = ([c for c in moe.FP8_CANDIDATES if c.get("PREQUANT") and c["BLOCK_M"] >= 64] if prequant
                  else [c for c in moe.CANDIDATES if c["BLOCK_M"] >= 64])
    for c in candidates:
        bn = c["BLOCK_N"] if kind == "gate_up" else c.get("BLOCK_N_DOWN", c["BLOCK_N"])
        constexprs = {"N": n, "K": k, "TOP_K": 6, "ROUTED_K": 6, "BLOCK_M": c["BLOCK_M"], "BLOCK_N": bn,
                      "BLOCK_K": c["BLOCK_K"], "N_FASTEST": False, "DIRECT": False, "ATOMIC": False,
                      "SHARED_SCALED": False, "EXACT_FP8_ROUNDING": False, "SPLIT_N": c.get("SPLIT_N", 1),
                      "UNIFORM_W_SCALE": uniform and 128 % bn == 0,
                      "stride_wk": 1, "stride_sk": 1}
        constexprs = {key: v for key, v in constexprs.items() if key in inspect.signature(fn.fn).parameters}
        config = {"BLOCK_M": c["BLOCK_M"], "BLOCK_N": bn, "BLOCK_K": c["BLOCK_K"], "num_warps": c["num_warps"],
                  "num_stages": c["num_stages"], **({"SPLIT_N": c["SPLIT_N"]} if "SPLIT_N" in c else {})}
        yield config, fn, pointers, {}, constexprs, ("up_offset",)


def moe_gpt_oss_gate_up():
    """GPT-OSS-20B's gate/up kernel (hidden 2880, intermediate 2880, top-4, biases, clamped SwiGLU) over its weight
    as HF stores it, [E, H, 2I] with gate and up columns interleaved: read as two tiles of every other column (the
    form before PAIRED) and as one tile of both (PAIRED), at a decode tile and two prefill tiles."""
    from deepfuse.runtime.kernels import moe

    pointers = {"X": "*bf16", "W": "*bf16", "SharedGate": "*bf16", "SharedUp": "*bf16", "Out": "*bf16",
                "SortedSlots": "*i32", "BlockExpert": "*i32", "NumPadded": "*i32", "GateUpBias": "*bf16"}
    for paired in (False, True):
        fn = moe.kernels_for(torch.bfloat16, moe.clamped_swiglu(1.702, 7.0), "bench/kernel_resources.py", biases=True,
                             paired=paired).function("moe_gate_up_act_kernel")
        for bm, bn, bk, w, st, decode in [(16, 64, 128, 4, 4, True), (64, 128, 64, 4, 3, False),
                                          (128, 128, 64, 8, 4, False)]:
            # the [E, 2I, H] view of the [E, H, 2I] weight: rows 2 apart for the gate's, the up's one after each
            constexprs = {"N": 2880, "K": 2880, "TOP_K": 4, "ROUTED_K": 4, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk,
                          "N_FASTEST": decode, "DIRECT": decode, "stride_gn": 2, "up_offset": 1, "stride_gbn": 2,
                          "bias_up_offset": 1}
            constexprs = {key: v for key, v in constexprs.items() if key in inspect.signature(fn.fn).parameters}
            config = {"PAIRED": paired, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": w, "num_stages": st}
            yield config, fn, pointers, {}, constexprs, ("stride_wk",)


def rms_norm(residual: bool):
    """The RMSNorm kernel over V2-Lite's hidden size (2048, bf16), one row per program, at each warp count."""
    from deepfuse.runtime.kernels import rms_norm as kernels

    gen, name = kernels.kernel_for(2048, torch.bfloat16, torch.bfloat16, torch.bfloat16, residual, True)
    pointers = {p: "*bf16" for p in ("X", "R", "W", "Y", "H")}
    for warps in (1, 2, 4, 8):
        yield ({"num_warps": warps, "num_stages": 1}, gen.function(name), pointers, {"eps": "fp32"},
               {"BLOCK_N": 2048}, ("N",))


def mla_reduce():
    """The MLA decode's split merge at V2's latent (512, slices of REDUCE_BLOCK_C) over 64, 65 and 128 splits."""
    fn = mla.kernels_for(torch.bfloat16, "bench/kernel_resources.py").function("mla_decode_reduce_kernel")
    pointers = {"PartOut": "*fp32", "PartLse": "*fp32", "Out": "*bf16"}
    for splits in (64, 65, 128):
        constexprs = {"C": C, "C_POW2": C, "NUM_SPLITS": splits, "SPLITS_POW2": triton.next_power_of_2(splits),
                      "BLOCK_C": mla.REDUCE_BLOCK_C}
        yield {"NUM_SPLITS": splits, "num_warps": 4, "num_stages": 1}, fn, pointers, {}, constexprs, ("H",)


def mla_absorb(side: str = "query"):
    """W_UK into the query (nope 128) or W_UV into the output (v 128) at V2 dims (latent 512), one query block, at
    the launch's and fewer stages."""
    if side == "query":
        name, pointers = "mla_absorb_query_kernel", {"QNope": "*bf16", "W": "*bf16", "QLat": "*bf16"}
        constexprs, divisible = {"DN": DN, "BLOCK_C": mla.ABSORB_BLOCK_C, "BLOCK_D": mla.ABSORB_BLOCK_D}, ()
    else:
        name, pointers = "mla_absorb_output_kernel", {"OutLat": "*bf16", "W": "*bf16", "Out": "*bf16"}
        constexprs, divisible = {"DV": DV, "BLOCK_V": mla.ABSORB_BLOCK_V, "BLOCK_C": mla.ABSORB_OUT_BLOCK_C}, ("DN",)
    fn = mla.kernels_for(torch.bfloat16, "bench/kernel_resources.py").function(name)
    constexprs.update({"stride_wc": 1, "C": C, "BLOCK_Q": mla.ABSORB_BLOCK_Q})
    for stages in sorted({1, 4, mla.ABSORB_STAGES}):
        yield {"num_warps": 4, "num_stages": stages}, fn, pointers, {}, constexprs, divisible


def linear_group():
    """The grouped decode projections at V2-Lite's q_proj + kv_a_proj (K 2048), each candidate tile, plain and with
    the input's RMSNorm in the launch (NORM)."""
    from deepfuse.runtime.kernels import linear_group as kernels

    fn = kernels.kernels_for(torch.bfloat16, "bench/kernel_resources.py").function("linear_group_kernel")
    pointers = {p: "*bf16" for p in ("X", "W0", "W1", "W2", "W3", "Y0", "Y1", "Y2", "Y3", "NormW")}
    pointers.update({f"S{g}": "*fp32" for g in range(4)})
    forms = [(False, False, c) for c in kernels.CONFIGS] + [(True, False, c) for c in kernels.CONFIGS]
    forms += [(False, True, c) for c in kernels.FP8_CONFIGS]  # FP8 W8A8 weights
    for norm, fp8, c in forms:
        c = dict(c)
        config = {"num_warps": c.pop("num_warps"), "num_stages": c.pop("num_stages"), **c, "NORM": norm,
                  **({"FP8": True} if fp8 else {})}
        constexprs = {"GROUPS": 2, "EVEN_K": True, "NORM": norm, "FP8": fp8, "EXACT_FP8_ROUNDING": False, **c}
        ptrs = {**pointers, **({f"W{g}": "*fp8e4nv" for g in range(4)} if fp8 else {})}
        yield config, fn, ptrs, {"eps": "fp32"}, constexprs, ("K",)


def fp8_gemm():
    """The prequantized block-scaled FP8 GEMM (quant_matmul past 16 rows) at its large-M tiles: the pointer-fed
    loop and the descriptor-fed one (tensor-memory copies; its descriptors' TMA loads count as no async copy)."""
    from deepfuse.runtime.kernels import quant

    gen, name = quant.kernels_for("prequantized", torch.bfloat16, "bench/kernel_resources.py")
    pointers = {"X": "*fp8e4nv", "XS": "*fp32", "W": "*fp8e4nv", "WS": "*fp32", "Bias": "*bf16", "Y": "*bf16"}
    for c in quant.LARGE_CONFIGS + quant.TMA_LARGE_CONFIGS + quant.RESCALE_CONFIGS:
        c = dict(c)
        tma = c.pop("TMA", False)
        config = {"num_warps": c.pop("num_warps"), "num_stages": c.pop("num_stages"), "TMA": tma, **c}
        # the unit strides (scales' K tile, y's columns) a launch specializes as constants
        constexprs = {"SCALE_BLOCK_N": 128, "HAS_BIAS": False, "GROUP_M": 8, "stride_xsk": 1, "stride_wsk": 1,
                      "stride_yn": 1, **c}
        if tma:
            constexprs.update(RESCALE=constexprs.pop("RESCALE", False), M_HALVES=constexprs.pop("M_HALVES", False))
            yield config, gen.function("fp8_block_prequantized_matmul_tma_kernel"), pointers, {}, constexprs, \
                ("M", "N", "K")
        else:  # K innermost in both operands: a launch specializes those unit strides as constants
            constexprs.update(SCALE_BLOCK_K=128, EVEN_K=True, EXACT_FP8_ROUNDING=False,
                              UNIFORM_W_SCALE=c["BLOCK_N"] <= 128, stride_xk=1, stride_wk=1)
            yield config, gen.function(name), pointers, {}, constexprs, ("M", "N", "K", "k_per_split")


def fp8_decode():
    """The FP8 GEMM at decode sizes, activations quantized in the K loop (quant_matmul up to 16 rows), at V2-Lite's
    MLP gate+up (K 2048): every decode tile, the operand-swapped kernel's among them (weight rows on the MMA's M
    side). QGMMA in --sass is Hopper's FP8 warpgroup MMA; F2FP...UNPACK_B the FP8 -> fp16 widening the 16-row
    tiles need."""
    from deepfuse.runtime.kernels import quant

    gen, name = quant.kernels_for("quantize", torch.bfloat16, "bench/kernel_resources.py")
    pointers = {"X": "*bf16", "XS": "*fp32", "W": "*fp8e4nv", "WS": "*fp32", "Bias": "*bf16", "Y": "*fp32"}
    for c in quant.configs_for(1) + quant.DECODE_SWAP_CONFIGS:
        c = {key: v for key, v in c.items() if key != "SPLIT_K"}
        swap = c.pop("SWAP", False)
        config = {"num_warps": c.pop("num_warps"), "num_stages": c.pop("num_stages"), "SWAP": swap, **c}
        constexprs = {"SCALE_BLOCK_N": 128, "SCALE_BLOCK_K": 128, "HAS_BIAS": False, "EVEN_K": True,
                      "EXACT_FP8_ROUNDING": False, "UNIFORM_W_SCALE": c["BLOCK_N"] <= 128, "stride_xk": 1,
                      "stride_wk": 1, "stride_wsk": 1, "stride_yn": 1, **c, **({} if swap else {"GROUP_M": 8})}
        fn = gen.function("fp8_block_quantize_decode_kernel" if swap else name)
        constexprs = {key: v for key, v in constexprs.items() if key in inspect.signature(fn.fn).parameters}
        yield config, fn, pointers, {}, constexprs, ("N", "K", "k_per_split")


def act_quant():
    """The activation pre-kernel (per token and 128-wide tile), bf16 in, at its launch's tile."""
    from deepfuse.runtime.kernels import quant

    gen, _ = quant.kernels_for("prequantized", torch.bfloat16, "bench/kernel_resources.py")
    pointers = {"X": "*bf16", "XQ": "*fp8e4nv", "XS": "*fp32"}
    constexprs = {"GROUP_K": 128, "BLOCK_R": quant.ACT_QUANT_ROWS, "EXACT_FP8_ROUNDING": False, "stride_xk": 1}
    yield {"BLOCK_R": quant.ACT_QUANT_ROWS, "num_warps": 4, "num_stages": 1}, gen.function("act_quant_kernel"), \
        pointers, {}, constexprs, ("M", "K")


def moe_router_logits():
    """The tiled router matmul past the split form's token limit, V2-Lite's router (64 experts, hidden 2048, bf16
    operands of an fp32 matmul), at the token tiles route_hidden picks from."""
    from deepfuse.runtime.kernels import routing

    gen = routing.kernel_for(routing.RoutingSpec(6), "bench/kernel_resources.py", router_matmul=torch.float32,
                             operands=(torch.bfloat16, torch.bfloat16))
    pointers = {"X": "*bf16", "RouterWeight": "*bf16", "Logits": "*fp32"}
    for block_t in (16, 32, 64):
        constexprs = {"BLOCK_T": block_t, "BLOCK_E": 64, "BLOCK_K": 64, "stride_wk": 1}
        yield {"BLOCK_T": block_t, "num_warps": 4, "num_stages": 3}, gen.function("moe_router_logits_kernel"), \
            pointers, {}, constexprs, ("HIDDEN", "E")


KERNELS = {"mla_decode": lambda: mla_decode(False), "mla_decode_fp8": lambda: mla_decode(True),
           "mla_decode_fp8_as_fp16": lambda: mla_decode(True, as_fp16=True), "mla_prefill": mla_prefill,
           "mla_reduce": mla_reduce, "mla_absorb": mla_absorb, "mla_absorb_output": lambda: mla_absorb("output"),
           "rms_norm": lambda: rms_norm(False), "add_rms_norm": lambda: rms_norm(True), "linear_group": linear_group,
           "fp8_gemm": fp8_gemm, "fp8_decode": fp8_decode, "act_quant": act_quant,
           **{f"moe_{kind}{suffix}": (lambda fmt=fmt, kind=kind: moe_experts(fmt, kind))
              for kind in ("gate_up", "down")
              for suffix, fmt in (("", "float"), ("_w8a8", "fp8-block"), ("_w8a16", "fp8-block-weight"))},
           "moe_up_ungated": lambda: moe_experts("float", "gate_up", gated=False),
           "moe_prefill_gate_up": lambda: moe_prefill("gate_up"), "moe_prefill_down": lambda: moe_prefill("down"),
           "moe_prefill_gate_up_fp8": lambda: moe_prefill("gate_up", True),
           "moe_prefill_down_fp8": lambda: moe_prefill("down", True),
           # the FP8 kernels with a weight scale per column (UNIFORM_W_SCALE off: what they ran before 2026-12-07)
           "moe_prefill_gate_up_fp8_per_column": lambda: moe_prefill("gate_up", True, uniform=False),
           "moe_gate_up_w8a8_per_column": lambda: moe_experts("fp8-block", "gate_up", uniform=False),
           "moe_gpt_oss_gate_up": moe_gpt_oss_gate_up, "moe_fused": moe_fused,
           "moe_router_logits": moe_router_logits}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--kernels", default=",".join(KERNELS))
    parser.add_argument("--out", default=None)
    parser.add_argument("--sass", action="store_true", help="also print each one's most frequent SASS opcodes")
    parser.add_argument("--order", action="store_true",
                        help="also print each one's memory and barrier instructions in program order")
    args = parser.parse_args()
    rows = []
    for name in args.kernels.split(","):
        for config, fn, pointers, scalars, constexprs, *divisible in KERNELS[name]():
            try:
                got = resources(fn, pointers, scalars, constexprs, config["num_warps"], config["num_stages"],
                                divisible=divisible[0] if divisible else ())
            except Exception as err:  # a tile past the chip's shared memory, say
                print(f"{name:<15} {str(config):<70} {type(err).__name__}: {str(err).splitlines()[0][:80]}")
                continue
            rows.append({"kernel": name, "config": config, **got})
            print(f"{name:<15} {str(config):<70} {got['registers']:>4} regs  spills {got['spill_stores']:>5} / "
                  f"{got['spill_loads']:>5} B  shared {got['shared_bytes']:>6} B  async copies {got['async_copies']}  "
                  f"loads waited in loops {got['loop_loads']}",
                  flush=True)
            if args.sass:
                print("    " + ", ".join(f"{op} {n}" for op, n in got["sass"].items()))
            if args.order:
                print("    order: " + got["order"])
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "kernel_resources.json"), "w") as f:
            json.dump({"triton": triton.__version__, "arch": "sm_90a", "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
