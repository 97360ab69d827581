"""Load and save Hugging Face style checkpoint directories (``config.json`` + ``*.safetensors``).

Parameter names are DeepSeek-V2's. Routed experts may be stored per expert, as DeepSeek's checkpoints do
(``mlp.experts.{j}.gate_proj.weight`` / ``up_proj`` / ``down_proj``), or stacked, as transformers >= 5 keeps them
in memory (``mlp.experts.gate_up_proj`` [E, 2I, H], ``mlp.experts.down_proj`` [E, H, I]); both load.
``save_checkpoint`` writes the per-expert form, which every DeepSeek loader reads.

DeepSeek-V3 FP8 checkpoints (``quantization_config`` in config.json; float8_e4m3fn weights, each with a
``weight_scale_inv`` of 128 x 128 block scales) load as they are into the model's FP8 ``Linear`` layers; routed
expert weights are dequantized to bf16 at load.
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
    keep = {k for k, v in state.items() if k.endswith(("e_score_correction_bias", "weight_scale_inv"))
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
        """One expert matrix; an FP8 one (V3 checkpoints) is dequantized with its block scales: the grouped
        expert kernels run float weights (FP8 grouped kernels are not built yet)."""
        w = per_expert[prefix][(j, name)]
        if w.dtype != torch.float8_e4m3fn:
            return w
        if (prefix, j, name) not in scales:
            raise DeepfuseError(f"checkpoint has an FP8 expert weight {prefix}.{j}.{name} without weight_scale_inv")
        return quant.dequantize_weight(w, scales[prefix, j, name], "fp8-block", config.fp8_block or (128, 128),
                                       dtype=torch.float32)

    for prefix, parts in per_expert.items():
        n = config.n_routed_experts
        try:
            gate_up = [torch.cat([expert(prefix, j, "gate_proj"), expert(prefix, j, "up_proj")]) for j in range(n)]
            down = [expert(prefix, j, "down_proj") for j in range(n)]
        except KeyError as e:
            raise DeepfuseError(f"checkpoint is missing expert weight {prefix}.{e.args[0][0]}.{e.args[0][1]}") from None
        state[f"{prefix}.gate_up_proj"] = torch.stack(gate_up)
        state[f"{prefix}.down_proj"] = torch.stack(down)
    return state


def save_checkpoint(model: DeepSeekForCausalLM, path: Union[str, Path]) -> None:
    """Write ``model`` as a DeepSeek-V2 style checkpoint directory (per-expert names)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    out = {}
    inter = model.config.moe_intermediate_size
    for k, v in model.state_dict().items():
        if k.endswith("experts.gate_up_proj"):
            prefix = k[: -len(".gate_up_proj")]
            for j in range(v.shape[0]):
                out[f"{prefix}.{j}.gate_proj.weight"] = v[j, :inter].contiguous()
                out[f"{prefix}.{j}.up_proj.weight"] = v[j, inter:].contiguous()
        elif k.endswith("experts.down_proj"):
            prefix = k[: -len(".down_proj")]
            for j in range(v.shape[0]):
                out[f"{prefix}.{j}.down_proj.weight"] = v[j].contiguous()
        else:
            out[k] = v.contiguous()
    save_file(out, str(path / "model.safetensors"))
    cfg = model.config.to_dict()
    cfg["model_type"] = "deepseek_v2" if model.config.topk_method != "noaux_tc" else "deepseek_v3"
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
