"""Checkpoint directories the test writes itself: per-expert (DeepSeek) and stacked (transformers 5) names."""
import json

import pytest
import torch
from safetensors.torch import save_file

from deepfuse import DeepfuseError
from deepfuse.models import DeepSeekForCausalLM, get_config, load_checkpoint, save_checkpoint


@pytest.mark.parametrize("config", ["tiny", "v2-tiny", "v3-tiny"])
def test_save_then_load_roundtrip(config, tmp_path):
    model = DeepSeekForCausalLM.from_config(get_config(config), seed=int(torch.randint(0, 10**6, ())))
    save_checkpoint(model, tmp_path)
    names = json.loads((tmp_path / "config.json").read_text())
    assert names["n_routed_experts"] == model.config.n_routed_experts
    loaded = load_checkpoint(tmp_path)
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_stacked_expert_names_load(tmp_path):
    model = DeepSeekForCausalLM.from_config(get_config("tiny"), seed=1)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    loaded = load_checkpoint(tmp_path, dtype=torch.float16)
    assert loaded.lm_head.weight.dtype == torch.float16
    torch.testing.assert_close(loaded.model.layers[1].mlp.experts.down_proj.float(),
                               model.model.layers[1].mlp.experts.down_proj.half().float())


def test_bad_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(DeepfuseError, match="no config.json"):
        load_checkpoint(tmp_path)
    model = DeepSeekForCausalLM.from_config(get_config("tiny"), seed=1)
    save_checkpoint(model, tmp_path)
    state = {k: v for k, v in model.state_dict().items() if "experts" not in k}
    state["model.layers.1.mlp.experts.0.gate_proj.weight"] = torch.zeros(32, 64)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(DeepfuseError, match="missing expert weight"):
        load_checkpoint(tmp_path)


def test_invalid_configs_are_clear_errors():
    with pytest.raises(DeepfuseError, match="n_group must divide"):
        get_config("v3-tiny", n_group=5)
    with pytest.raises(DeepfuseError, match="num_experts_per_tok"):
        get_config("tiny", num_experts_per_tok=9)
    with pytest.raises(DeepfuseError, match="unknown model config"):
        get_config("v9")


def test_latent_cache_is_576_values_per_token_for_v2_dims():
    cfg = get_config("v2-lite")
    assert cfg.latent_cache_width == 576
    mha = 2 * cfg.num_attention_heads * cfg.qk_head_dim  # K and V per head, uncompressed
    assert 1 - cfg.latent_cache_width / mha > 0.9


def test_sampled_generation_is_reproducible_and_in_vocab():
    from deepfuse.models import generate

    model = DeepSeekForCausalLM.from_config(get_config("tiny"), seed=2)
    prompt = torch.randint(0, 512, (2, 4))
    a = generate(model, prompt, 6, temperature=0.8, top_k=20, generator=torch.Generator().manual_seed(5))
    b = generate(model, prompt, 6, temperature=0.8, top_k=20, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == (2, 6) and int(a.max()) < 512
