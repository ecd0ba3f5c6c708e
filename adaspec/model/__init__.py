"""Our own Llama-family forward and Hugging Face checkpoint loader (Llama, Mistral, Qwen2, Qwen3)."""

from .config import SUPPORTED_ARCHITECTURES, ModelConfig, check_max_model_len
from .llama import KVCache, LlamaModel
from .loader import check_same_vocab, load_model, load_tokenizer

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "KVCache",
    "LlamaModel",
    "ModelConfig",
    "check_max_model_len",
    "check_same_vocab",
    "load_model",
    "load_tokenizer",
]
