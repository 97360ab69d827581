"""Load and save Hugging Face style checkpoint directories (``config.json`` + ``*.safetensors``).

Parameter names are DeepSeek-V2's. Routed experts may be stored per expert, as DeepSeek's checkpoints do
(``mlp.experts.{j}.gate_proj.weight`` / ``up_proj`` / ``down_proj``), or stacked, as transformers >= 5 keeps them
in memory (``mlp.experts.gate_up_proj`` [E, 2I, H], ``mlp.experts.down_proj`` [E, H, I]); both load.
``save_checkpoint`` writes the per-expert form, which every DeepSeek loader reads.

DeepSeek-V3 FP8 checkpoints (``quantization_config`` in config.json; float8_e4m3fn weights, each with a
``weight_scale_inv`` of 128 x 128 block scales) load as they are into the model's FP8 ``Linear`` layers, and the
routed experts' FP8 weights stack as stored into FP8 ``Experts`` (``config.fp8_experts``: 128 x 128 blocks and
an intermediate size of whole blocks; otherwise they are dequantized at load).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional, Union

import torch

from deepfuse.errors import DeepfuseError
from deepfuse.runtime.kernels import quant

from .config import DeepSeekConfig
from .model import DeepSeekForCausalLM

_PER_EXPERT = re.compile(
    r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.(weight|weight_scale_inv)$"
)


def load_checkpoint(
    path: Union[str, Path], dtype: Optional[torch.dtype] = None, device=None, attn_impl: str = "absorb"
) -> DeepSeekForCausalLM:
    from safetensors.torch import load_file

    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise DeepfuseError(f"{path} is not a checkpoint directory: no config.json")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise DeepfuseError(f"{path} has no *.safetensors files")
    config = DeepSeekConfig.from_dict(json.loads(config_file.read_text()))
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f), device=str(device) if device is not None else "cpu"))
    state = _stack_experts(tensors, config)
    dtype = dtype or next(t.dtype for k, t in state.items() if k.endswith("embed_tokens.weight"))
    with torch.device("meta"):
        model = DeepSeekForCausalLM(config, attn_impl)
    expected = model.state_dict()
    if config.tie_word_embeddings and "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise DeepfuseError(f"checkpoint does not fit the model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    for k, t in expected.items():
        if tuple(state[k].shape) != tuple(t.shape):
            raise DeepfuseError(f"checkpoint tensor {k} has shape {tuple(state[k].shape)}, model wants {tuple(t.shape)}")
    # FP8 weights and their scales stay as stored; the router bias stays fp32.
    keep = {k for k, v in state.items() if k.endswith(("e_score_correction_bias", "_scale_inv"))
            or v.dtype == torch.float8_e4m3fn}
    state = {k: v if k in keep else v.to(dtype) for k, v in state.items()}
    model.load_state_dict(state, assign=True)
    return model.eval()


def _stack_experts(tensors: dict[str, torch.Tensor], config: DeepSeekConfig) -> dict[str, torch.Tensor]:
    state, per_expert = {}, {}
    scales = {}
    for k, v in tensors.items():
        m = _PER_EXPERT.match(k)
        if m and m.group(4) == "weight":
            per_expert.setdefault(m.group(1), {})[(int(m.group(2)), m.group(3))] = v
        elif m:
            scales[m.group(1), int(m.group(2)), m.group(3)] = v
        else:
            state[k] = v

    def expert(prefix, j, name):
        """One expert matrix, and its block scales if it is FP8 (V3 checkpoints)."""
        w = per_expert[prefix][(j, name)]
        if w.dtype != torch.float8_e4m3fn:
            return w, None
        if (prefix, j, name) not in scales:
            raise DeepfuseError(f"checkpoint has an FP8 expert weight {prefix}.{j}.{name} without weight_scale_inv")
        return w, scales[prefix, j, name]

    def as_float(w, s):  # an FP8 expert in a config whose experts stay float: dequantized with its scales
        if s is None:
            return w
        return quant.dequantize_weight(w, s, "fp8-block", config.fp8_block or (128, 128), dtype=torch.float32)

    for prefix, parts in per_expert.items():
        n = config.n_routed_experts
        try:
            gate_up = [[expert(prefix, j, "gate_proj"), expert(prefix, j, "up_proj")] for j in range(n)]
            down = [expert(prefix, j, "down_proj") for j in range(n)]
        except KeyError as e:
            raise DeepfuseError(f"checkpoint is missing expert weight {prefix}.{e.args[0][0]}.{e.args[0][1]}") from None
        stored_fp8 = [s is not None for pair in gate_up for _, s in pair] + [s is not None for _, s in down]
        if config.fp8_experts and all(stored_fp8):
            # Kept as stored: gate's and up's block rows stack (the intermediate size is whole blocks).
            state[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([g[0], u[0]]) for g, u in gate_up])
            state[f"{prefix}.gate_up_proj_scale_inv"] = torch.stack([torch.cat([g[1], u[1]]) for g, u in gate_up])
            state[f"{prefix}.down_proj"] = torch.stack([w for w, _ in down])
            state[f"{prefix}.down_proj_scale_inv"] = torch.stack([s for _, s in down])
            continue
        gate_up_f = torch.stack([torch.cat([as_float(*g), as_float(*u)]) for g, u in gate_up])
        down_f = torch.stack([as_float(*d) for d in down])
        if config.fp8_experts:  # float experts in a config whose experts are FP8: quantized here, once
            from deepfuse.runtime.kernels import moe

            (state[f"{prefix}.gate_up_proj"], state[f"{prefix}.gate_up_proj_scale_inv"]) = moe.quantize_experts(gate_up_f.float())
            (state[f"{prefix}.down_proj"], state[f"{prefix}.down_proj_scale_inv"]) = moe.quantize_experts(down_f.float())
            continue
        state[f"{prefix}.gate_up_proj"], state[f"{prefix}.down_proj"] = gate_up_f, down_f
    return state


def save_checkpoint(model: DeepSeekForCausalLM, path: Union[str, Path]) -> None:
    """Write ``model`` as a DeepSeek-V2 style checkpoint directory (per-expert names)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    out = {}
    inter = model.config.moe_intermediate_size
    for k, v in model.state_dict().items():
        # Stacked experts, FP8 ones with their block scales, written per expert (V3's weight_scale_inv names).
        suffix = "_scale_inv" if k.endswith("_scale_inv") else ""
        stem = k[: len(k) - len(suffix)]
        rows = inter // 128 if suffix else inter  # the scales' block rows of gate, then up
        if stem.endswith("experts.gate_up_proj"):
            prefix = stem[: -len(".gate_up_proj")]
            for j in range(v.shape[0]):
                out[f"{prefix}.{j}.gate_proj.weight{suffix}"] = v[j, :rows].contiguous()
                out[f"{prefix}.{j}.up_proj.weight{suffix}"] = v[j, rows:].contiguous()
        elif stem.endswith("experts.down_proj"):
            prefix = stem[: -len(".down_proj")]
            for j in range(v.shape[0]):
                out[f"{prefix}.{j}.down_proj.weight{suffix}"] = v[j].contiguous()
        else:
            out[k] = v.contiguous()
    save_file(out, str(path / "model.safetensors"))
    cfg = model.config.to_dict()
    cfg["model_type"] = "deepseek_v2" if model.config.topk_method != "noaux_tc" else "deepseek_v3"
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
