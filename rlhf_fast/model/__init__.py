"""The minimal GPT that the RLHF pipeline trains and samples from, on rlhf_fast's fused ops."""
from .config import GPTConfig
from .generate import GenerationOutput, decode_n_tokens, decode_one_token, generate, prefill
from .gpt import GPT
from .layers import KVCache
from .lora import LoRAConfig, adapters_disabled, apply_lora, merge_lora
from .lora_peft import load_adapters, save_adapters

__all__ = ["GPT", "GPTConfig", "GenerationOutput", "KVCache", "generate", "prefill", "decode_one_token",
           "decode_n_tokens", "LoRAConfig", "apply_lora", "adapters_disabled", "merge_lora", "save_adapters",
           "load_adapters"]
