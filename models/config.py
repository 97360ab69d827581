"""DeepSeek-family model configurations (field names follow the DeepSeek-V2/V3 ``config.json``)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from deepfuse.errors import DeepfuseError

SCORING = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


@dataclass
class DeepSeekConfig:
    vocab_size: int = 102400
    hidden_size: int = 2048
    intermediate_size: int = 10944  # dense MLP (the first_k_dense_replace layers)
    moe_intermediate_size: int = 1408  # one routed or shared expert
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    # MLA
    q_lora_rank: Optional[int] = None  # None: q is one projection (V2-Lite); else down-proj, RMSNorm, up-proj
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # DeepSeekMoE
    n_routed_experts: int = 64
    n_shared_experts: int = 2
    num_experts_per_tok: int = 6
    first_k_dense_replace: int = 1
    scoring_func: str = "softmax"
    topk_method: str = "greedy"  # greedy (V2-Lite), group_limited_greedy (V2), noaux_tc (V3: bias + groups)
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    # the rest
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict[str, Any]] = None  # {"type": "yarn", "factor", "original_max_position_embeddings", ...}
    max_position_embeddings: int = 163840
    tie_word_embeddings: bool = False
    # DeepSeek-V3's FP8 checkpoints: {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
    # "weight_block_size": [128, 128]}. The attention and dense/shared MLP projections hold FP8 weights; routed
    # experts are dequantized to the model dtype at load (FP8 grouped expert kernels are not built yet).
    quantization_config: Optional[dict[str, Any]] = None
    initializer_range: float = 0.02

    def __post_init__(self):
        self.validate()

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def validate(self) -> None:
        def need(cond, msg):
            if not cond:
                raise DeepfuseError(f"invalid DeepSeek config: {msg}")

        need(self.scoring_func in SCORING, f"scoring_func must be one of {SCORING}")
        need(self.topk_method in TOPK_METHODS, f"topk_method must be one of {TOPK_METHODS}")
        need(0 < self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok must be in 1..n_routed_experts")
        need(self.n_group >= 1 and self.n_routed_experts % self.n_group == 0, "n_group must divide n_routed_experts")
        need(1 <= self.topk_group <= self.n_group, "topk_group must be in 1..n_group")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim must be even")
        if self.topk_method == "noaux_tc":
            need(self.n_routed_experts // self.n_group >= 2, "noaux_tc scores groups by their top-2 experts")
        qc = self.quantization_config
        if qc is not None:
            need(qc.get("quant_method") == "fp8" and qc.get("fmt", "e4m3") == "e4m3",
                 f"quantization_config: only DeepSeek-V3's fp8 e4m3 format is supported, got {qc}")
            need(qc.get("activation_scheme", "dynamic") == "dynamic",
                 "quantization_config: activations are quantized dynamically (per token and tile)")
            block = qc.get("weight_block_size") or [128, 128]
            need(len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block) and block[1] % 16 == 0,
                 f"quantization_config: weight_block_size must be two positive ints, K a multiple of 16, got {block}")
        if self.n_group > 1:
            per_group = self.n_routed_experts // self.n_group
            need(self.num_experts_per_tok <= self.topk_group * per_group, "top-k exceeds the experts in the kept groups")

    @property
    def fp8_block(self) -> Optional[tuple[int, int]]:
        """The FP8 weight block [bn, bk] of a quantized config, else None."""
        qc = self.quantization_config
        return tuple(qc.get("weight_block_size") or (128, 128)) if qc else None

    @property
    def fp8_experts(self) -> bool:
        """Routed experts stored in FP8 too: a quantized config whose 128 x 128 blocks tile the expert matrices
        (gate and up are stacked, so the intermediate size must be whole blocks; other configs keep float
        experts, dequantized at load)."""
        return self.fp8_block == (128, 128) and self.moe_intermediate_size % 128 == 0

    @property
    def latent_cache_width(self) -> int:
        """Values stored per token and layer in the latent KV cache: c_kv and the roped k_pe."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DeepSeekConfig":
        """From a DeepSeek/HF ``config.json`` (unknown keys are ignored; HF's newer names are understood)."""
        d = dict(d)
        if d.get("model_type") == "deepseek_v3":  # V3's routing is implied by the model type in HF configs
            d.setdefault("scoring_func", "sigmoid")
            d.setdefault("topk_method", "noaux_tc")
        if "rope_parameters" in d and d.get("rope_scaling") is None:
            rp = dict(d["rope_parameters"] or {})
            d.setdefault("rope_theta", rp.get("rope_theta", 10000.0))
            if rp.get("rope_type", "default") != "default":
                rp["type"] = rp.pop("rope_type")
                d["rope_scaling"] = rp
        if d.get("rope_scaling") and "rope_type" in d["rope_scaling"]:
            d["rope_scaling"] = dict(d["rope_scaling"], type=d["rope_scaling"]["rope_type"])
        if "n_routed_experts" not in d and "num_local_experts" in d:
            d["n_routed_experts"] = d["num_local_experts"]
        if d.get("q_lora_rank") == 0:
            d["q_lora_rank"] = None
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and (v is not None or k == "q_lora_rank")})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_V2_LITE_YARN = {
    "type": "yarn",
    "factor": 40,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
}

CONFIGS: dict[str, DeepSeekConfig] = {
    # The real DeepSeek-V2-Lite shape: 15.7B parameters, 64 routed experts (top-6, softmax greedy), 2 shared.
    "v2-lite": DeepSeekConfig(rope_scaling=_V2_LITE_YARN),
    # CI-sized, V2-Lite routing, q LoRA on so both q paths are exercised across configs.
    "tiny": DeepSeekConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, max_position_embeddings=512,
    ),
    # CI-sized, V2 routing: group-limited greedy over softmax scores, routed scaling.
    "v2-tiny": DeepSeekConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3, topk_method="group_limited_greedy",
        n_group=4, topk_group=2, routed_scaling_factor=16.0, max_position_embeddings=512,
        rope_scaling=dict(_V2_LITE_YARN, factor=4, original_max_position_embeddings=128),
    ),
    # CI-sized, V3 routing: sigmoid scores, score-correction bias, group top-2 selection, renormalized, scaled.
    "v3-tiny": DeepSeekConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, scoring_func="sigmoid",
        topk_method="noaux_tc", n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
        max_position_embeddings=512,
    ),
    # A GPU-sized V3-routing model (~1.3B parameters) for benchmarks.
    "v3-small": DeepSeekConfig(
        vocab_size=32000, hidden_size=1024, intermediate_size=4096, moe_intermediate_size=512, num_hidden_layers=8,
        num_attention_heads=8, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
        v_head_dim=64, n_routed_experts=64, n_shared_experts=1, num_experts_per_tok=8, scoring_func="sigmoid",
        topk_method="noaux_tc", n_group=8, topk_group=4, norm_topk_prob=True, routed_scaling_factor=2.5,
        max_position_embeddings=16384,
    ),
}


def get_config(name: str, **overrides) -> DeepSeekConfig:
    if name not in CONFIGS:
        raise DeepfuseError(f"unknown model config {name!r}; available: {', '.join(CONFIGS)}")
    return dataclasses.replace(CONFIGS[name], **overrides)
