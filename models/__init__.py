"""The bundled DeepSeek-family model (plain torch, the readable reference), its configs and loader."""
from deepfuse.runtime.latent_cache import LatentKVCache
from .config import CONFIGS, DeepSeekConfig, get_config
from .loader import load_checkpoint, save_checkpoint
from .model import DeepSeekForCausalLM, generate

__all__ = [
    "CONFIGS", "DeepSeekConfig", "DeepSeekForCausalLM", "LatentKVCache", "generate", "get_config",
    "load_checkpoint", "save_checkpoint",
]
